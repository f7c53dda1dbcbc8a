"""`lmflax config show`: the resolved config a command would run with, as JSON.

lmflax config show                                    # the default (gpt_tiny)
lmflax config show --config=sst2 --config.train.steps=10
lmflax config show --workdir=runs/sst2                # what a saved run was trained with
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lmflax import config as config_lib
from lmflax import storage
from lmflax.cli import common
from lmflax.train import NoRunError, resolve


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `lmflax config`."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = sub.add_parser(
        "show",
        help="print the resolved config as JSON",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common.add_config_arguments(show, workdir_help="show a saved run's config.json instead")
    return parser


def main(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    if args.workdir is not None and args.config is None:
        saved = storage.to_path(args.workdir) / "config.json"
        if not saved.is_file():
            raise NoRunError(f"no run in {args.workdir}: it has no config.json")
        cfg = config_lib.apply_overrides(config_lib.from_json(saved.read_text()), overrides)
    else:
        cfg, _ = common.load_config(args.config, overrides)
    print(config_lib.to_json(resolve(cfg)))
    return 0
