"""`lmflax viz`: pictures of what a trained run learned, and of how it trained.

  lmflax viz curves runs/gpt_tiny                       # -> runs/gpt_tiny/curves.png
  lmflax viz curves runs/a runs/b --out=compare.png     # several runs on one plot
  lmflax viz attention --workdir=runs/gpt_tiny --sentence="def add(a, b): return a + b"
  lmflax viz attention --workdir=runs/gpt_tiny --sentence="..." --layer=all   # every head, a grid
  lmflax viz attention --workdir=runs/word2vec --words=list,tuple,dict,str,int,float,bytes

`curves` draws loss (training and eval), learning rate and an eval metric against the step,
from each run's metrics.jsonl and eval_metrics.jsonl (a run also writes its own curves.png when
it ends). `attention`, for a Transformer run, writes one heatmap PNG per chosen layer and head
(queries down, keys across, tokens on both axes), or with --layer=all and no --head one grid of
every head of every layer (attention_grid.png), and a PCA projection of the sentence's token
embeddings; for a word2vec run, the PCA projection of the chosen words' vectors (drawing:
`lmflax.viz`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lmflax import storage
from lmflax.cli import common
from lmflax.config import ConfigError
from lmflax.data.word2vec import split_words
from lmflax.train import Run
from lmflax.viz import (
    plot_attention,
    plot_attention_grid,
    plot_pca,
    plot_workdir_curves,
    run_with_attention,
)

log = logging.getLogger("lmflax")


def _token_ids(tokenizer: Any, sentence: str) -> list[int]:
    ids = tokenizer.encode(sentence)
    if getattr(tokenizer, "cls_id", None) is not None and tokenizer.sep_id is not None:
        return [tokenizer.cls_id, *ids, tokenizer.sep_id]  # BERT's framing
    if getattr(tokenizer, "eos_id", None) is not None:
        return [tokenizer.eos_id, *ids]  # GPT's: documents start with <eos>
    return ids


def _token_table(params: Any) -> np.ndarray | None:
    """The token embedding table ([V, D], the first 'token_embed' in the tree)."""
    stack = [params]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict) or hasattr(node, "items"):
            if "token_embed" in node:
                return np.asarray(jax.device_get(node["token_embed"]["embedding"]))
            stack.extend(node.values())
    return None


def _select(spec: str, count: int, what: str) -> list[int]:
    if spec == "all":
        return list(range(count))
    try:
        picks = [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"--{what} takes 'all' or comma-separated numbers, got {spec!r}") from None
    for p in picks:
        if not -count <= p < count:
            raise ValueError(f"--{what} {p} is out of range: the model has {count}")
    return [p % count for p in picks]


def visualize(
    workdir: str | Path,
    sentence: str | None = None,
    *,
    out: str | Path | None = None,
    layers: str = "0",
    heads: str | None = None,
    words: Sequence[str] | None = None,
    size: tuple[int, int] | None = None,
) -> list[Path]:
    """Writes the pictures for the run in `workdir` (see the module docstring); returns them.

    layers / heads: index lists ('0', '0,2') or 'all'. heads=None: head 0, except with
    layers='all', which draws every head of every layer as one grid."""
    grid = heads is None and layers == "all"
    grid_size = size
    size = size or (640, 640)
    run = Run.open(workdir, local_devices=True)
    # The pictures go to `out` (default workdir/viz), drawn locally first when that is a URL.
    target = storage.to_path(out) if out is not None else run.workdir / "viz"
    with storage.local_staging(target) as staged:
        local = Path(staged)
        local.mkdir(parents=True, exist_ok=True)
        written = _draw(run, local, sentence, layers, heads, words, size, grid, grid_size)
    if storage.is_local(target):
        return written
    return [target / p.name for p in written]  # type: ignore[misc]


def _draw(
    run: Run,
    out: Path,
    sentence: str | None,
    layers: str,
    heads: str | None,
    words: Sequence[str] | None,
    size: tuple[int, int],
    grid: bool,
    grid_size: tuple[int, int] | None,
) -> list[Path]:
    written: list[Path] = []
    task, params = run.task, run.params
    if hasattr(task, "word_vectors"):  # word2vec: vectors only
        wv = task.word_vectors(params)
        lowercase = bool(getattr(task.cfg.model, "lowercase", True))
        chosen = list(words) if words else split_words(sentence or "", lowercase)
        known = [w for w in dict.fromkeys(chosen) if w in wv]
        if len(known) < 2:
            known = list(wv.words[:30])
            log.warning("fewer than 2 chosen words have vectors; showing the 30 most frequent")
        written.append(
            plot_pca(
                np.stack([wv[w] for w in known]),
                known,
                out / "word_vectors_pca.png",
                title=f"word2vec vectors, step {run.step} (PCA)",
                size=size,
            )
        )
        return written
    if not sentence:
        raise ValueError("a Transformer run needs --sentence to draw its attention")
    tok = task.tokenizer
    ids = _token_ids(tok, sentence)
    tokens = [tok.decode([i], skip_special_tokens=False) for i in ids]
    arr = jnp.asarray([ids], jnp.int32)
    _, maps = run_with_attention(task.model, params, arr)
    if not maps:
        raise ValueError(f"the {type(task.model).__name__} model sowed no attention weights")
    if grid:
        written.append(
            plot_attention_grid(
                [(name, w[0]) for name, w in maps],
                tokens,
                out / "attention_grid.png",
                title=f"attention of every layer and head (step {run.step})",
                size=grid_size,
            )
        )
    for l in [] if grid else _select(layers, len(maps), "layer"):
        name, w = maps[l]
        for h in _select(heads or "0", w.shape[1], "head"):
            written.append(
                plot_attention(
                    w[0, h],
                    tokens,
                    tokens,
                    out / f"attention_layer{l}_head{h}.png",
                    title=f"{name}, head {h} (step {run.step})",
                    size=size,
                )
            )
    table = _token_table(params)
    chosen = [tokens[i] for i in range(len(ids))]
    uniq = list(dict.fromkeys(zip(ids, chosen)))
    if table is not None and len(uniq) >= 2:
        written.append(
            plot_pca(
                table[[i for i, _ in uniq]],
                [t for _, t in uniq],
                out / "token_embeddings_pca.png",
                title=f"token embeddings of the sentence, step {run.step} (PCA)",
                size=size,
            )
        )
    return written


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `lmflax viz`."""
    sub = parser.add_subparsers(dest="picture", required=True, metavar="PICTURE")
    att = sub.add_parser(
        "attention",
        help="attention heatmaps and PCA of embeddings (or of word2vec vectors)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    att.add_argument(
        "--workdir",
        required=True,
        type=common.workdir_arg,
        help="a run directory (lmflax train --workdir)",
    )
    att.add_argument("--sentence", default=None, help="the text to run through the model")
    att.add_argument("--out", default=None, help="where to write (default WORKDIR/viz)")
    att.add_argument("--layer", default="0", help="layer index(es) or 'all' (default 0)")
    att.add_argument(
        "--head",
        default=None,
        help="head index(es) or 'all' (default 0; with --layer=all, every head in one grid)",
    )
    att.add_argument("--words", default=None, help="comma-separated words for the PCA plot")
    att.add_argument("--size", default=None, help="image size in pixels, WxH (default 640x640)")
    cur = sub.add_parser(
        "curves",
        help="loss, learning rate and eval curves of one or several runs as a PNG",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cur.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="run directories")
    cur.add_argument(
        "--out",
        default=None,
        help="the PNG to write (default WORKDIR/curves.png for one run, curves.png for several)",
    )
    cur.add_argument("--size", default=None, help="image size in pixels, WxH (default 1200x420)")
    return parser


def _size(spec: str | None) -> tuple[int, int] | None:
    if spec is None:
        return None
    w, _, h = spec.partition("x")
    try:
        size = (int(w), int(h))
    except ValueError:
        raise ConfigError(f"--size takes WxH in pixels, got {spec!r}") from None
    if min(size) < 16:
        raise ConfigError(f"--size {spec!r} is too small: at least 16x16 pixels")
    return size


def main(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    del overrides
    logging.basicConfig(level=logging.WARNING, format="%(levelname).1s %(message)s", force=True)
    if args.picture == "curves":
        out = args.out or (
            Path(args.workdirs[0]) / "curves.png" if len(args.workdirs) == 1 else "curves.png"
        )
        missing = [w for w in args.workdirs if not (Path(w) / "metrics.jsonl").exists()]
        if missing:
            raise ConfigError(
                f"no run in {', '.join(missing)}: no metrics.jsonl (a run writes it as it trains)"
            )
        print(plot_workdir_curves(args.workdirs, out, size=_size(args.size) or (1200, 420)))
        return 0
    common.start_backends()
    size = _size(args.size)
    words = [x for x in args.words.split(",") if x] if args.words else None
    paths = visualize(
        args.workdir,
        args.sentence,
        out=args.out,
        layers=args.layer,
        heads=args.head,
        words=words,
        size=size,
    )
    for p in paths:
        print(p)
    return 0
