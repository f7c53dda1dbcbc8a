"""What every subcommand shares: the config/workdir/override arguments, logging, and the one
table from exception types to exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

import jax

from lmflax import config as config_lib
from lmflax import storage
from lmflax.cli.quiet import native_stderr_filtered
from lmflax.config import Config, ConfigError
from lmflax.data.hub import CheckpointError
from lmflax.data.sources import DataError
from lmflax.train import CheckpointIntegrityError, TrainingError
from lmflax.vectors import VectorFileError

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2

# Exception type -> exit code, first match wins (ConfigError before ValueError: it is one).
# 2: the command line or config cannot run (nothing was started); 1: it ran and failed.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, EXIT_CONFIG),
    (DataError, EXIT_FAILURE),
    (CheckpointError, EXIT_FAILURE),
    (CheckpointIntegrityError, EXIT_FAILURE),
    (TrainingError, EXIT_FAILURE),
    (VectorFileError, EXIT_FAILURE),
    (OSError, EXIT_FAILURE),
    (KeyError, EXIT_FAILURE),
    (ValueError, EXIT_FAILURE),
)


def exit_code(error: BaseException) -> int | None:
    """The exit code for an exception the CLI reports as a message (None: let it propagate)."""
    for kind, code in EXIT_CODES:
        if isinstance(error, kind):
            return code
    return None


def run_reporting_errors(fn: Callable[[], int]) -> int:
    """Runs `fn`; an exception in EXIT_CODES becomes 'error: MESSAGE' on stderr and its code."""
    try:
        return fn()
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        return code


def setup_logging(quiet: bool = False) -> None:
    """lmflax's own INFO lines (WARNING with quiet); other libraries only from WARNING up."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname).1s %(message)s",
        datefmt="%H:%M:%S",
        # absl's logging calls logging.basicConfig() the first time it logs (orbax logs while it
        # is imported), which would make ours a silent no-op: replace its handler.
        force=True,
    )
    for noisy in ("absl", "jax", "orbax", "tensorflow_datasets", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def start_backends() -> None:
    """Starts JAX's backends (what the first `jax.devices()` does) without the native start-up
    noise (`lmflax.cli.quiet`). Call it after jax.distributed.initialize, which must come
    before any backend starts."""
    with native_stderr_filtered():
        jax.devices()


def workdir_arg(value: str) -> str:
    """A --workdir value: a local (or mounted) path, file:///ABS/PATH, or gs://BUCKET/PATH
    (`lmflax.storage`). Another URL (s3://, a typo'd scheme, gs:// without gcsfs) is a
    usage error saying why, rather than silently becoming a local folder called 's3:'."""
    try:
        storage.to_path(value)
    except storage.UnsupportedPathError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


class Parser(argparse.ArgumentParser):
    """argparse that exits 2 with 'error: ...' like the rest of the CLI."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG, f"error: {message}\n")


def add_config_arguments(parser: argparse.ArgumentParser, *, workdir_help: str) -> None:
    """--config, --workdir and -q; `--config.KEY=VALUE` overrides are taken off separately."""
    parser.add_argument(
        "--config",
        default=None,
        help="config file FILE[:ARG], or a shipped config's name (default gpt_tiny)",
    )
    parser.add_argument("--workdir", default=None, type=workdir_arg, help=workdir_help)
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="only warnings and the final summary"
    )


OVERRIDES_EPILOG = (
    "Any config field can be set with --config.KEY=VALUE (e.g. --config.train.steps=100); "
    "see `lmflax config show`."
)


def parse(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[argparse.Namespace, list[str]]:
    """(arguments, overrides 'KEY=VALUE') from argv; a stray argument is a usage error."""
    try:
        overrides, rest = config_lib.split_overrides(list(argv))
    except ConfigError as e:
        parser.error(str(e))
    args, unknown = parser.parse_known_args(rest)
    if unknown:
        parser.error(
            f"unrecognized argument {unknown[0]!r} (overrides look like --config.train.steps=100)"
        )
    return args, overrides


def load_config(spec: str | None, overrides: Sequence[str]) -> tuple[Config, str]:
    """The config file `spec` with `overrides` applied, and its name."""
    cfg, name = config_lib.load_config_file(spec)
    return config_lib.apply_overrides(cfg, overrides), name


def default_workdir(name: str) -> str:
    """Where a run of config `name` goes when --workdir is not given."""
    return os.path.join("runs", name)
