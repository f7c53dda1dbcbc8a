#!/usr/bin/env python3
"""Train an lmflax model from a config file.

  python train.py                                   # tiny GPT on the embedded corpus
  python train.py --config=configs/bert_tiny.py --workdir=runs/bert
  python train.py --config=configs/gpt2_small.py --config.train.steps=100 --config.data.batch_size=8
  python train.py --config=configs/wmt14_de_en.py --generate --prompt="Guten Morgen!"

Rerunning with the same --workdir resumes from its newest checkpoint. Exit codes: 0 done,
1 runtime failure (message on stderr), 2 bad config or command line.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_CONFIG = 2


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=None, help="config file, FILE or FILE:ARG (default configs/gpt_tiny.py)"
    )
    parser.add_argument(
        "--workdir", default=None, help="run directory (default runs/<config name>)"
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="only warnings and the final summary"
    )
    parser.add_argument(
        "--generate",
        action="store_true",
        help="load the workdir's newest checkpoint and print the model's output for --prompt",
    )
    parser.add_argument(
        "--prompt", action="append", default=[], help="text to continue or translate (repeatable)"
    )
    args, rest = parser.parse_known_args(argv)
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if item.startswith("--config."):
            body = item[len("--config.") :]
            if "=" not in body:
                if i + 1 >= len(rest):
                    parser.error(f"{item} needs a value: {item}=VALUE")
                body = f"{body}={rest[i + 1]}"
                i += 1
            overrides.append(body)
        else:
            parser.error(
                f"unrecognized argument {item!r} (overrides look like --config.train.steps=100)"
            )
        i += 1
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.prompt and not args.generate:
        print("error: --prompt is only used with --generate", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname).1s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("absl", "jax", "orbax", "tensorflow_datasets", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from lmflax.config import ConfigError, apply_overrides, load_config_file, validate

    try:
        cfg, name = load_config_file(args.config)
        cfg = validate(apply_overrides(cfg, overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG

    import tensorflow_datasets as tfds

    from lmflax.data.sources import DataError
    from lmflax.train.loop import run

    tfds.disable_progress_bar()
    workdir = args.workdir or os.path.join("runs", name)
    try:
        if args.generate:
            from lmflax.generate import main as generate_main

            return generate_main(cfg, workdir, args.prompt, overrides)
        summary = run(cfg, workdir, config_name=name)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if "sample" in summary:
        print(f"\nsample after {summary['final_step']} steps:\n{summary['sample']}\n")
    loss = summary.get("final_loss")
    print(
        f"done: step {summary['final_step']}"
        + (f", loss {loss:.4f}" if loss is not None else "")
        + (f", eval loss {summary['eval']['loss']:.4f}" if "eval" in summary else "")
        + "".join(f", {k} {v:.2f}" for k, v in summary.get("generation", {}).items())
        + f"; workdir {workdir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
