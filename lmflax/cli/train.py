"""`lmflax train`: train (or resume) the run a config describes.

  lmflax train                                         # tiny GPT on the embedded corpus
  lmflax train --config=bert_tiny --workdir=runs/bert
  lmflax train --config=configs/gpt2_small.py --config.train.steps=100 --config.data.batch_size=8

Rerunning with the same --workdir resumes from its newest checkpoint. Multi-host: run the same
command on every host; a Cloud TPU slice or SLURM job is joined automatically, elsewhere pass
--coordinator_address=HOST:PORT --num_processes=N --process_id=I. `python train.py ...` is the
same command, and also takes the older --eval_only, --generate and --plan forms of
`lmflax eval`, `lmflax generate` and `lmflax plan`.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

import tensorflow_datasets as tfds

from lmflax.cli import common
from lmflax.config import ConfigError
from lmflax.parallel import distributed
from lmflax.train import resolve, run


def add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    """The jax.distributed flags."""
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


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `lmflax train`."""
    common.add_config_arguments(parser, workdir_help="run directory (default runs/<config name>)")
    add_cluster_arguments(parser)
    return parser


def main(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """Trains; prints a one-line summary. Exit codes as in `lmflax.cli.common.EXIT_CODES`."""
    common.setup_logging(args.quiet)
    cfg, name = common.load_config(args.config, overrides)
    cfg = resolve(cfg)
    try:
        info = distributed.initialize(
            args.coordinator_address, args.num_processes, args.process_id, mode=args.distributed
        )
    except ValueError as e:  # contradictory cluster flags: nothing has started
        raise ConfigError(str(e)) from None
    common.start_backends()
    if info["process_index"] != 0:
        # One voice per cluster: the other processes report only warnings and errors.
        logging.getLogger().setLevel(logging.WARNING)
    tfds.disable_progress_bar()
    workdir = args.workdir or common.default_workdir(name)
    summary = run(cfg, workdir, config_name=name)
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
