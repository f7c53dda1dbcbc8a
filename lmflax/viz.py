"""Pictures of what a model learned: attention heatmaps and 2-D projections of word vectors.

  python -m lmflax.viz --workdir=runs/gpt_tiny --sentence="def add(a, b): return a + b"
  python -m lmflax.viz --workdir=runs/word2vec --words=list,tuple,dict,str,int,float,bytes

For a Transformer run it writes one heatmap PNG per chosen layer and head (queries down, keys
across, tokens on both axes) and a PCA projection of the sentence's token embeddings; for a
word2vec run, the PCA projection of the chosen words' vectors. Drawing uses matplotlib's Agg
backend (no display). Attention weights come from the modules' 'intermediates' (see
`lmflax.nn.MultiHeadAttention`), so they are exactly the weights that produced the output.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Collecting attention weights


def attention_maps(intermediates: Any) -> list[tuple[str, np.ndarray]]:
    """Every sown attention_weights in an 'intermediates' tree as (layer name, [B, N, T, S]),
    in layer order. A scanned stack's [L, B, N, T, S] entry becomes L entries, 'layers_0'..."""
    found: list[tuple[tuple[str, ...], np.ndarray]] = []

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, dict) or hasattr(node, "items"):
            for key, value in node.items():
                if key == "attention_weights":
                    arr = np.asarray(jax.device_get(value[0]))
                    if "layers" in path and arr.ndim == 5:
                        i = path.index("layers")
                        for l in range(arr.shape[0]):
                            found.append(((*path[:i], f"layers_{l}", *path[i + 1 :]), arr[l]))
                    else:
                        found.append((path, arr))
                else:
                    walk(value, (*path, str(key)))

    walk(intermediates, ())

    def order(item: tuple[tuple[str, ...], np.ndarray]) -> tuple:
        return tuple((int(p[7:]), "") if p.startswith("layers_") else (-1, p) for p in item[0])

    found.sort(key=order)
    return [("/".join(p), a) for p, a in found]


def run_with_attention(model: Any, params: Any, *args: jax.Array) -> tuple[Any, list]:
    """model.apply(params, *args, deterministic=True) with the attention weights sown, compiled:
    (output, attention_maps(...))."""

    def apply(params: Any, *args: jax.Array) -> Any:
        return model.apply({"params": params}, *args, deterministic=True, mutable=["intermediates"])

    out, state = jax.jit(apply)(params, *args)
    return out, attention_maps(state.get("intermediates", {}))


# ---------------------------------------------------------------------------------------------
# Drawing


def _figure(size: tuple[int, int], dpi: int) -> Figure:
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_attention(
    weights: np.ndarray,
    query_tokens: Sequence[str],
    key_tokens: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    size: tuple[int, int] = (640, 640),
    dpi: int = 100,
) -> Path:
    """A heatmap of one head's weights [T, S] (row t: how query token t spreads its attention
    over the keys), labelled with the tokens; written as a PNG of exactly `size` pixels."""
    weights = np.asarray(weights, np.float32)
    if weights.shape != (len(query_tokens), len(key_tokens)):
        raise ValueError(
            f"weights of shape {weights.shape} need {weights.shape[0]} query and "
            f"{weights.shape[1]} key tokens; got {len(query_tokens)} and {len(key_tokens)}"
        )
    fig = _figure(size, dpi)
    ax = fig.add_subplot()
    im = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=max(float(weights.max()), 1e-6))
    fontsize = max(4, min(9, int(220 / max(len(key_tokens), len(query_tokens), 1))))
    ax.set_xticks(range(len(key_tokens)), [_label(t) for t in key_tokens], rotation=90)
    ax.set_yticks(range(len(query_tokens)), [_label(t) for t in query_tokens])
    ax.tick_params(labelsize=fontsize)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


def _label(token: str) -> str:
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    return text if text.strip() else repr(text)


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The rows' coordinates on the top two principal components, [n, D] -> [n, 2]."""
    x = np.asarray(vectors, np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:2]
    if comps.shape[0] < 2:  # fewer than two directions of variation (e.g. one word)
        comps = np.vstack([comps, np.zeros((2 - comps.shape[0], x.shape[1]))])
    return x @ comps.T


def plot_pca(
    vectors: np.ndarray,
    words: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    size: tuple[int, int] = (640, 640),
    dpi: int = 100,
) -> Path:
    """A scatter of the words' vectors [n, D] on their top two principal components, each point
    labelled with its word; a PNG of exactly `size` pixels."""
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(words):
        raise ValueError(f"{len(words)} words need vectors [{len(words)}, D], got {vectors.shape}")
    if len(words) < 2:
        raise ValueError(f"a projection needs at least 2 words, got {list(words)}")
    xy = pca_2d(vectors)
    fig = _figure(size, dpi)
    ax = fig.add_subplot()
    ax.scatter(xy[:, 0], xy[:, 1], s=14, color="tab:blue")
    for (x, y), w in zip(xy, words):
        ax.annotate(_label(w), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=8)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.margins(0.12)
    if title:
        ax.set_title(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


# ---------------------------------------------------------------------------------------------
# The command


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
    heads: str = "0",
    words: Sequence[str] | None = None,
    size: tuple[int, int] = (640, 640),
) -> list[Path]:
    """Writes the pictures for the run in `workdir` (see the module docstring); returns them."""
    import jax.numpy as jnp

    from lmflax.train.restore import load_run

    run = load_run(workdir)
    out = Path(out or Path(workdir) / "viz")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    task, params = run.task, run.params
    if hasattr(task, "word_vectors"):  # word2vec: vectors only
        wv = task.word_vectors(params)
        from lmflax.data.word2vec import split_words

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
    for l in _select(layers, len(maps), "layer"):
        name, w = maps[l]
        for h in _select(heads, w.shape[1], "head"):
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lmflax.viz",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", required=True, help="a run directory (train.py --workdir)")
    parser.add_argument("--sentence", default=None, help="the text to run through the model")
    parser.add_argument("--out", default=None, help="where to write (default WORKDIR/viz)")
    parser.add_argument("--layer", default="0", help="layer index(es) or 'all' (default 0)")
    parser.add_argument("--head", default="0", help="head index(es) or 'all' (default 0)")
    parser.add_argument("--words", default=None, help="comma-separated words for the PCA plot")
    parser.add_argument("--size", default="640x640", help="image size in pixels, WxH")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname).1s %(message)s")
    try:
        w, _, h = args.size.partition("x")
        size = (int(w), int(h))
    except ValueError:
        print(f"error: --size takes WxH in pixels, got {args.size!r}", file=sys.stderr)
        return 2
    words = [x for x in args.words.split(",") if x] if args.words else None
    try:
        paths = visualize(
            args.workdir,
            args.sentence,
            out=args.out,
            layers=args.layer,
            heads=args.head,
            words=words,
            size=size,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
