"""`lmflax eval`: evaluate a run's newest checkpoint on data.eval_split and print a table.

  lmflax eval --workdir=runs/sst2                    # the run's own config.json
  lmflax eval --workdir=runs/sst2 --config.train.eval_steps=100
  lmflax eval --config=sst2 --workdir=runs/new --fresh   # parameters Trainer.initialize makes

Without --fresh, a workdir with no run (no config.json, or no finished checkpoint) is refused
with exit code 2 rather than evaluating random parameters. Nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import TextIO

import jax
import tensorflow_datasets as tfds

from lmflax import storage
from lmflax.cli import common
from lmflax.config import ConfigError
from lmflax.train import NoRunError, Run, evaluate, format_table

log = logging.getLogger("lmflax")


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `lmflax eval`."""
    common.add_config_arguments(
        parser, workdir_help="the run to evaluate (default runs/<config name>)"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="with no checkpoint in the workdir, evaluate freshly initialised (or "
        "model.init_from) parameters instead of refusing",
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    return parser


def evaluate_run(run: Run) -> dict[str, float]:
    """The metrics of `run`'s parameters on data.eval_split (train.eval_steps batches at most)."""
    cfg = run.cfg
    if not cfg.data.eval_split:
        raise ConfigError("evaluation needs data.eval_split (it is empty)")
    log.info("evaluating %s on %s", run.source, cfg.data.eval_split)
    trainer = run.trainer
    with trainer.context():
        return evaluate(
            trainer, run.state, cfg.data.eval_split, cfg.train.eval_steps, trainer.jit_eval_step()
        )


def main(
    args: argparse.Namespace, overrides: Sequence[str], *, stream: TextIO | None = None
) -> int:
    """Prints the metrics table (and one JSON line) to stdout."""
    common.setup_logging(args.quiet)
    common.start_backends()
    tfds.disable_progress_bar()
    out = stream or sys.stdout
    config = None
    workdir = args.workdir
    if (
        args.config is not None
        or workdir is None
        or not (storage.to_path(workdir) / "config.json").exists()
    ):
        config, name = common.load_config(args.config, ())
        workdir = workdir or common.default_workdir(name)
    try:
        run = Run.open(workdir, overrides, args.step, config=config, fresh=args.fresh)
    except NoRunError as e:
        raise NoRunError(
            f"{e} (or pass --fresh to evaluate freshly initialised parameters)"
        ) from None
    values = evaluate_run(run)
    if jax.process_index() == 0:
        cfg = run.cfg
        title = f"{cfg.task.name} on {cfg.data.dataset} [{cfg.data.eval_split}]: {run.source}"
        print(format_table(values, title), file=out)
        print(json.dumps({"eval": values, "source": run.source}), file=out)
    return 0
