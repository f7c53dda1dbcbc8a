"""`lmflax vectors`: word vectors from a word2vec run or a vector file.

lmflax vectors export --workdir=runs/word2vec --out=vectors.txt [--binary]
lmflax vectors neighbors FILE_OR_WORKDIR WORD [WORD ...]     # a:b::c for an analogy
lmflax vectors evaluate FILE_OR_WORKDIR [--similarity=F ...] [--analogies=F ...]
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

from lmflax.cli import common
from lmflax.train import Run
from lmflax.vectors import (
    WordVectors,
    analogy,
    evaluate_analogies,
    evaluate_similarity,
    nearest,
    read_vectors,
    write_vectors,
)


def from_workdir(workdir: str | Path) -> WordVectors:
    """The word vectors of a trained word2vec run (its newest checkpoint)."""
    run = Run.open(workdir, local_devices=True)
    if not hasattr(run.task, "word_vectors"):
        raise ValueError(
            f"{workdir} holds a {run.cfg.task.name!r} run; word vectors come from a word2vec run"
        )
    return run.task.word_vectors(run.params)


def _load(source: str) -> WordVectors:
    p = Path(source)
    if p.is_dir():
        return from_workdir(p)
    return read_vectors(p)


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `lmflax vectors`."""
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ex = sub.add_parser("export", help="write a word2vec run's vectors to a file")
    ex.add_argument("--workdir", required=True, type=common.workdir_arg)
    ex.add_argument("--out", required=True)
    ex.add_argument("--binary", action="store_true", help="word2vec binary instead of text")
    nb = sub.add_parser("neighbors", help="nearest neighbours of words")
    nb.add_argument("source", help="a vector file or a word2vec workdir")
    nb.add_argument("words", nargs="+", help="words, or a:b::c for an analogy")
    nb.add_argument("-k", type=int, default=10)
    ev = sub.add_parser("evaluate", help="word-similarity and analogy benchmarks")
    ev.add_argument("source", help="a vector file or a word2vec workdir")
    ev.add_argument("--similarity", action="append", default=[], help="word-pairs file")
    ev.add_argument("--analogies", action="append", default=[], help="questions file")
    return parser


def main(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    del overrides
    if args.command == "export":
        common.start_backends()
        wv = from_workdir(args.workdir)
        write_vectors(args.out, wv, binary=args.binary)
        print(f"wrote {len(wv)} vectors of dimension {wv.dim} to {args.out}")
        return 0
    wv = _load(args.source)
    if args.command == "neighbors":
        for query in args.words:
            m = re.fullmatch(r"([^:]+):([^:]+)::([^:]+)", query)
            near = analogy(wv, *m.groups(), k=args.k) if m else nearest(wv, query, args.k)
            print(f"{query}: " + ", ".join(f"{w} {s:.3f}" for w, s in near))
        return 0
    for f in args.similarity:
        r = evaluate_similarity(wv, f)
        print(f"{f}: Spearman {r.spearman:.4f} over {r.pairs} pairs ({r.oov} skipped)")
    for f in args.analogies:
        r = evaluate_analogies(wv, f)
        print(f"{f}: accuracy {r.accuracy:.4f} ({r.correct}/{r.total}, {r.oov} skipped)")
    return 0
