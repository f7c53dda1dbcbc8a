"""The `lmflax` command: one subcommand per job, each with its own --help.

  lmflax train     [--config=NAME_OR_FILE] [--workdir=DIR] [--config.KEY=VALUE ...]
  lmflax eval      --workdir=DIR [--fresh] [--step=N]
  lmflax generate  --workdir=DIR --prompt=TEXT [--prompt=TEXT ...]
  lmflax plan      [--config=...] [--topology=v5e:4x4 | h200:8]
  lmflax viz       attention --workdir=DIR --sentence=TEXT [--layer=all] [--head=all]
  lmflax vectors   export | neighbors | evaluate ...
  lmflax config    show [--config=...] [--workdir=DIR]
  lmflax data      prepare NAME [--data_dir=DIR]

`python train.py ARGS` is `lmflax train ARGS`, and also accepts --eval_only, --generate and --plan
(the older spellings of `lmflax eval`, `generate` and `plan`). Exit codes: 0 done, 1 runtime
failure (message on stderr), 2 bad config or command line (or a plan that does not fit).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

# First, before anything imports jax: without an NVIDIA driver, jax's CUDA plugin (which the test
# extra installs to compile for GPUs) must skip its CUDA check (lmflax/config/jax_env.py).
import lmflax.config.jax_env  # noqa: F401  # isort: split

# C++ libraries loaded with jax write start-up lines to stderr that no setting turns off; the
# known ones (no CUDA driver, no TPU here) are dropped while jax and the rest are imported.
from lmflax.cli.quiet import native_stderr_filtered  # isort: split

with native_stderr_filtered():
    from lmflax.cli import common
    from lmflax.cli import config as config_cmd
    from lmflax.cli import data as data_cmd
    from lmflax.cli import eval as eval_cmd
    from lmflax.cli import generate as generate_cmd
    from lmflax.cli import plan as plan_cmd
    from lmflax.cli import train as train_cmd
    from lmflax.cli import vectors as vectors_cmd
    from lmflax.cli import viz as viz_cmd

COMMANDS: dict[str, tuple[ModuleType, str]] = {
    "train": (train_cmd, "train (or resume) a run from a config"),
    "eval": (eval_cmd, "evaluate a run's checkpoint on data.eval_split"),
    "generate": (generate_cmd, "print a trained run's output for prompts"),
    "plan": (plan_cmd, "parameters, FLOPs, per-device memory and MFU, without training"),
    "viz": (viz_cmd, "pictures of attention and embeddings"),
    "vectors": (vectors_cmd, "export, query and evaluate word vectors"),
    "config": (config_cmd, "print the resolved config"),
    "data": (data_cmd, "prepare a TFDS dataset for lmflax (array_record, no TensorFlow)"),
}


def build_parser() -> argparse.ArgumentParser:
    """The `lmflax` parser with one subparser per command."""
    parser = common.Parser(
        prog="lmflax",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for name, (module, summary) in COMMANDS.items():
        module.build_parser(
            sub.add_parser(
                name,
                help=summary,
                description=module.__doc__,
                epilog=common.OVERRIDES_EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`lmflax COMMAND ...`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, overrides = common.parse(parser, argv)
    module = COMMANDS[args.cmd][0]
    return common.run_reporting_errors(lambda: module.main(args, overrides))


def train_py(argv: Sequence[str] | None = None) -> int:
    """`python train.py ...`: `lmflax train`, plus --eval_only / --generate / --plan."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = common.Parser(
        prog="train.py",
        description=train_cmd.__doc__,
        epilog=common.OVERRIDES_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train_cmd.build_parser(parser)
    other = parser.add_argument_group("other jobs (the same as lmflax eval / generate / plan)")
    other.add_argument("--eval_only", action="store_true", help="= lmflax eval")
    other.add_argument("--fresh", action="store_true", help="with --eval_only: see lmflax eval")
    other.add_argument("--generate", action="store_true", help="= lmflax generate")
    other.add_argument("--prompt", action="append", default=[], help="with --generate")
    other.add_argument("--plan", action="store_true", help="= lmflax plan")
    plan_cmd.add_plan_arguments(other)
    args, overrides = common.parse(parser, argv)
    if args.prompt and not args.generate:
        parser.error("--prompt is only used with --generate")
    if args.topology and not args.plan:
        parser.error("--topology only makes sense with --plan")
    if sum((args.eval_only, args.generate, args.plan)) > 1:
        parser.error("choose one of --eval_only, --generate, --plan")
    job: Callable[..., int] = train_cmd.main
    if args.eval_only:
        args.step = None
        job = eval_cmd.main
    elif args.generate:
        job = generate_cmd.main
    elif args.plan:
        job = plan_cmd.main
    return common.run_reporting_errors(lambda: job(args, overrides))


__all__ = ["COMMANDS", "build_parser", "main", "train_py"]
