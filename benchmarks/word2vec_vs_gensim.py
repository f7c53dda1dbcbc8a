#!/usr/bin/env python3
"""lmflax word2vec against gensim's on the same corpus, hyperparameters and machine.

  python benchmarks/word2vec_vs_gensim.py [--epochs=1] [--dim=100] [--arch=both|skipgram|cbow]

Both train on the words of the embedded corpus's training split (lmflax's word splitter feeds
gensim too, so the vocabularies are identical), skip-gram and CBOW (gensim with cbow_mean=1, the
update word2vec.c makes and lmflax makes), each at word2vec.c's α for it (0.025 skip-gram, 0.05
CBOW) unless --alpha is given. Reported per architecture:
- throughput: corpus words per second of training (gensim: its train() call, `workers` threads;
  lmflax: train.py's loop on this machine's JAX devices, logged windows after the first, which
  holds compilation; and the whole run's wall time);
- agreement: Spearman correlation between the two models' cosine similarities over random pairs
  of the `--top` most frequent words, the mean per-word Spearman of neighbour rankings, and the
  overlap of the 10 nearest neighbours; gensim against gensim with another seed is the ceiling
  that run-to-run noise allows, random vectors the floor.
Needs the test extra (gensim).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _corpus(data_dir: str) -> list[list[str]]:
    from lmflax.data import sources
    from lmflax.data.word2vec import split_words

    source = sources.data_source(sources.EMBEDDED, "train", data_dir)
    return [split_words(source[i]["text"].decode("utf-8")) for i in range(len(source))]


def _alpha(args) -> float:
    """The per-example learning rate: --alpha, or word2vec.c's default for the architecture."""
    if args.alpha is not None:
        return args.alpha
    from configs.word2vec import ALPHA

    return ALPHA[args.arch]


def _batch(args) -> int:
    """lmflax's batch: --batch-size, or configs/word2vec.py's for the architecture."""
    if args.batch_size is not None:
        return args.batch_size
    from configs.word2vec import BATCH

    return BATCH[args.arch]


def _train_gensim(sentences, args, seed: int):
    from gensim.models import Word2Vec

    model = Word2Vec(
        vector_size=args.dim,
        window=args.window,
        negative=args.negatives,
        sg=1 if args.arch == "skipgram" else 0,
        cbow_mean=1,
        min_count=args.min_count,
        sample=args.sample,
        alpha=_alpha(args),
        min_alpha=_alpha(args) * 1e-4,
        workers=args.workers,
        seed=seed,
        epochs=args.epochs,
    )
    model.build_vocab(sentences)
    t = time.perf_counter()
    _, raw = model.train(sentences, total_examples=len(sentences), epochs=args.epochs)
    seconds = time.perf_counter() - t
    return model, raw / seconds


def _train_lmflax(args, data_dir: str, total_words: int):
    from lmflax.cli.vectors import from_workdir
    from lmflax.config import load_config_file, override
    from lmflax.train import resolve, run

    cfg, _ = load_config_file(str(Path(__file__).resolve().parent.parent / "configs/word2vec.py"))
    cfg = override(
        cfg,
        {
            "model.architecture": args.arch,
            "model.d_model": args.dim,
            "model.window": args.window,
            "model.negatives": args.negatives,
            "model.min_count": args.min_count,
            "model.sample": args.sample,
            "data.data_dir": data_dir,
            "data.batch_size": _batch(args),
            "data.eval_split": "",
            "train.checkpoint_every": 0,
            "train.sample_tokens": 0,
            "train.progress": False,
            "train.log_every": 20,
        },
    )
    lr = args.lr if args.lr is not None else _alpha(args) * _batch(args)
    cfg = override(cfg, {"optimizer.learning_rate": lr})
    if args.optimizer is not None:
        cfg = override(cfg, {"optimizer.name": args.optimizer})
    # Steps for `epochs` passes: measure the examples per corpus word on a few batches first.
    from lmflax.tasks import make_task

    task = make_task(cfg)
    it = iter(task.dataset("train", seed=123, batch_size=cfg.data.batch_size))
    words = sum(float(next(it)["words"].sum()) for _ in range(30))
    per_example = words / (30 * cfg.data.batch_size)
    steps = math.ceil(args.epochs * total_words / (per_example * cfg.data.batch_size))
    cfg = resolve(override(cfg, {"train.steps": steps}))
    workdir = tempfile.mkdtemp(prefix="w2v-bench-")
    t = time.perf_counter()
    run(cfg, workdir, config_name="word2vec")
    wall = time.perf_counter() - t
    rows = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_sec"] * r["words_per_example"] for r in rows[1:]]
    consumed = sum(
        r["words_per_example"] * cfg.data.batch_size * (r["step"] - p["step"])
        for p, r in zip([{"step": 0}, *rows], rows)
    )
    return from_workdir(workdir), float(np.median(rates)), consumed / wall, steps, consumed


def _agreement(a, b, words, rng, pairs: int = 20000, queries: int = 200):
    from scipy.stats import spearmanr

    ua = a / np.linalg.norm(a, axis=1, keepdims=True)
    ub = b / np.linalg.norm(b, axis=1, keepdims=True)
    n = len(words)
    i, j = rng.integers(0, n, pairs), rng.integers(0, n, pairs)
    keep = i != j
    sa = np.sum(ua[i[keep]] * ua[j[keep]], 1)
    sb = np.sum(ub[i[keep]] * ub[j[keep]], 1)
    pair_rho = float(spearmanr(sa, sb).statistic)
    q = rng.choice(n, size=min(queries, n), replace=False)
    sims_a, sims_b = ua[q] @ ua.T, ub[q] @ ub.T
    rhos, overlap = [], []
    for r, w in enumerate(q):
        mask = np.arange(n) != w
        rhos.append(spearmanr(sims_a[r, mask], sims_b[r, mask]).statistic)
        top_a = set(np.argsort(-sims_a[r])[1:11])
        top_b = set(np.argsort(-sims_b[r])[1:11])
        overlap.append(len(top_a & top_b) / 10)
    return pair_rho, float(np.mean(rhos)), float(np.mean(overlap))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default="both", choices=("both", "skipgram", "cbow"))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--dim", type=int, default=100)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--negatives", type=int, default=5)
    p.add_argument("--min-count", type=int, default=5)
    p.add_argument("--sample", type=float, default=1e-3)
    p.add_argument("--alpha", type=float, default=None, help="starting per-example rate (both)")
    p.add_argument("--lr", type=float, default=None, help="lmflax learning rate (alpha·batch)")
    p.add_argument("--optimizer", default=None, choices=("sgd", "adamw"), help="lmflax's")
    p.add_argument("--batch-size", type=int, default=None, help="default: the config's")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--top", type=int, default=2000, help="compare the N most frequent words")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from lmflax.data import sources

    data_dir = args.data_dir or sources.default_data_dir()
    sources.ensure_embedded(data_dir)
    sentences = _corpus(data_dir)
    total = sum(len(s) for s in sentences)
    print(
        f"corpus: {len(sentences)} documents, {total:,} words; {args.arch}, dim {args.dim}, "
        f"window {args.window}, {args.negatives} negatives, {args.epochs} epoch(s)"
    )

    all_results = {}
    for arch in ("skipgram", "cbow") if args.arch == "both" else (args.arch,):
        all_results[arch] = compare(
            argparse.Namespace(**{**vars(args), "arch": arch}), data_dir, sentences, total
        )
    if args.json:
        Path(args.json).write_text(json.dumps(all_results, indent=2))
    return 0


def compare(args, data_dir: str, sentences, total: int) -> dict:
    """Trains gensim (two seeds) and lmflax with `args.arch`; prints and returns the results."""
    import jax

    print(f"\n## {args.arch} (alpha {_alpha(args)})")
    g1, g_rate = _train_gensim(sentences, args, seed=1)
    g2, _ = _train_gensim(sentences, args, seed=2)
    wv, l_rate, l_wall, steps, consumed = _train_lmflax(args, data_dir, total)

    words = [w for w in wv.words[: args.top] if w in g1.wv.key_to_index]
    missing = args.top - len(words)
    a = np.stack([wv[w] for w in words])
    b1 = np.stack([g1.wv[w] for w in words])
    b2 = np.stack([g2.wv[w] for w in words])
    rng = np.random.default_rng(0)
    lm = _agreement(a, b1, words, rng)
    gg = _agreement(b2, b1, words, np.random.default_rng(0))
    rnd = _agreement(rng.standard_normal(a.shape), b1, words, np.random.default_rng(0))
    results = {
        "arch": args.arch,
        "alpha": _alpha(args),
        "corpus_words": total,
        "vocab_lmflax": len(wv),
        "vocab_gensim": len(g1.wv),
        "compared_words": len(words),
        "words_missing_from_gensim": missing,
        "gensim_words_per_sec": g_rate,
        "gensim_workers": args.workers,
        "lmflax_words_per_sec_steady": l_rate,
        "lmflax_words_per_sec_wall": l_wall,
        "lmflax_steps": steps,
        "lmflax_words_consumed": consumed,
        "jax_devices": str(jax.devices()),
        "spearman_pairs": {"lmflax_vs_gensim": lm[0], "gensim_vs_gensim": gg[0], "random": rnd[0]},
        "spearman_neighbour_rankings": {
            "lmflax_vs_gensim": lm[1],
            "gensim_vs_gensim": gg[1],
            "random": rnd[1],
        },
        "top10_overlap": {"lmflax_vs_gensim": lm[2], "gensim_vs_gensim": gg[2], "random": rnd[2]},
    }
    print(
        f"vocabulary: lmflax {len(wv)}, gensim {len(g1.wv)}; comparing the {len(words)} "
        f"most frequent words"
    )
    print(
        f"throughput (corpus words/s): gensim {g_rate:,.0f} ({args.workers} workers), lmflax "
        f"{l_rate:,.0f} steady / {l_wall:,.0f} over the whole run incl. compile "
        f"({steps} steps of {_batch(args)}, {jax.devices()[0].platform})"
    )
    print(f"{'':34s}{'lmflax~gensim':>15s}{'gensim~gensim':>15s}{'random~gensim':>15s}")
    for name, key in (
        ("Spearman, cosine of random pairs", "spearman_pairs"),
        ("Spearman, neighbour rankings", "spearman_neighbour_rankings"),
        ("top-10 neighbour overlap", "top10_overlap"),
    ):
        r = results[key]
        print(
            f"{name:34s}{r['lmflax_vs_gensim']:15.3f}{r['gensim_vs_gensim']:15.3f}"
            f"{r['random']:15.3f}"
        )
    for w in ("list", "string", "return"):
        if w in wv and w in g1.wv:
            from lmflax.vectors import nearest

            print(f"  {w}: lmflax {[x for x, _ in nearest(wv, w, 6)]}")
            print(f"  {w}: gensim {[x for x, _ in g1.wv.most_similar(w, topn=6)]}")
    return results


if __name__ == "__main__":
    sys.exit(main())
