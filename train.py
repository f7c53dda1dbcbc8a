#!/usr/bin/env python3
"""Train an lmflax model from a config file.

  python train.py                                   # tiny GPT on the embedded corpus
  python train.py --config=configs/bert_tiny.py --workdir=runs/bert
  python train.py --config=configs/gpt2_small.py --config.train.steps=100 --config.data.batch_size=8
  python train.py --workdir=runs/sst2 --eval_only     # evaluate its newest checkpoint
  python train.py --config=configs/wmt14_de_en.py --generate --prompt="Guten Morgen!"

  python train.py --config=configs/gpt2_small.py --plan --topology=v5e:4x4   # plan, no training

Rerunning with the same --workdir resumes from its newest checkpoint. Multi-host: run the same
command on every host; a Cloud TPU slice or SLURM job is joined automatically, elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I. Exit codes: 0 done,
1 runtime failure (message on stderr), 2 bad config or command line (or a plan that does not fit).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

EXIT_CONFIG = 2

# jax's CUDA plugin (the test extra installs it to compile GPU programs on machines without one)
# reports a missing CUDA runtime at start-up as an error with a traceback. Without an NVIDIA
# driver it cannot run anyway: skip its version check so JAX falls back to the CPU quietly.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")


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
    cluster = parser.add_argument_group("multi-host (jax.distributed)")
    cluster.add_argument("--coordinator_address", default=None, help="process 0's HOST:PORT")
    cluster.add_argument("--num_processes", type=int, default=None, help="processes in all")
    cluster.add_argument("--process_id", type=int, default=None, help="this process, 0..N-1")
    cluster.add_argument(
        "--distributed",
        choices=("auto", "on", "off"),
        default="auto",
        help="auto: join a detected Cloud TPU / SLURM cluster; on: always let jax detect one",
    )
    planner = parser.add_argument_group("planner (no training)")
    planner.add_argument(
        "--plan", action="store_true", help="print parameters, FLOPs, per-device memory, MFU"
    )
    planner.add_argument(
        "--topology",
        default=None,
        help="plan for a TPU slice (v5e:4x4; needs libtpu) or NVIDIA GPUs (h100, h200:8; needs jax-cuda12-plugin)",
    )
    planner.add_argument("--peak_tflops", type=float, default=None, help="per-device peak")
    planner.add_argument("--hbm_gbps", type=float, default=None, help="per-device bandwidth")
    parser.add_argument(
        "--eval_only",
        action="store_true",
        help="evaluate the workdir's newest checkpoint (or the initial parameters) on "
        "data.eval_split and print a metrics table; the config defaults to workdir/config.json",
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

    if args.eval_only:
        from lmflax.train import evaluation

        return evaluation.main(args.config, args.workdir, overrides)

    from lmflax.config import ConfigError, apply_overrides, load_config_file, validate

    try:
        cfg, name = load_config_file(args.config)
        cfg = validate(apply_overrides(cfg, overrides))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.topology and not args.plan:
        print("error: --topology only makes sense with --plan", file=sys.stderr)
        return EXIT_CONFIG
    if args.plan:
        from lmflax import plan

        try:
            _, report = plan.main(
                cfg, topology=args.topology, peak_tflops=args.peak_tflops, hbm_gbps=args.hbm_gbps
            )
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_CONFIG
        print(f"plan for {name}:\n{report}")
        return 0

    from lmflax.parallel import distributed

    try:
        info = distributed.initialize(
            args.coordinator_address, args.num_processes, args.process_id, mode=args.distributed
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if info["process_index"] != 0:
        # One voice per cluster: the other processes report only warnings and errors.
        logging.getLogger().setLevel(logging.WARNING)

    import tensorflow_datasets as tfds

    from lmflax.data.sources import DataError
    from lmflax.train.checkpoint import CheckpointIntegrityError
    from lmflax.train.loop import TrainingError, run

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
    except (DataError, OSError, TrainingError, CheckpointIntegrityError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not distributed.is_coordinator():
        return 0
    if summary.get("preempted"):
        print(
            f"stopped by {summary['preempted']} at step {summary['final_step']} after saving a "
            f"checkpoint; run the same command to continue (workdir {workdir})"
        )
        return 0
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
