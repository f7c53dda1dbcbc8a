"""`lmflax data prepare`: download and prepare a TFDS dataset in the format lmflax reads.

  lmflax data prepare lm1b                                  # into $TFDS_DATA_DIR (or ~/tensorflow_datasets)
  lmflax data prepare glue/sst2 --data_dir=/data/tfds
  lmflax data prepare my_dataset --manual_dir=~/downloads/my_dataset

lmflax reads datasets by random access from ArrayRecord files, which `tfds build` makes only
with --file_format=array_record and only where TensorFlow is installed (its command line needs
it). This command runs the dataset's TFDS builder directly, so no TensorFlow is needed, except
for the few builders that read their downloads through TensorFlow (lm1b): for those it says so
before downloading anything, with the install line. Then train with
--config.data.dataset=NAME (and --config.data.data_dir=DIR if you chose one).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lmflax.cli import common
from lmflax.data import sources


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `lmflax data`."""
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    prep = sub.add_parser(
        "prepare",
        help="download and prepare a TFDS dataset as array_record",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prep.add_argument("name", help="a TFDS dataset, NAME[/CONFIG][:VERSION] (e.g. lm1b, glue/sst2)")
    prep.add_argument(
        "--data_dir",
        default=None,
        help="where to put it (default $TFDS_DATA_DIR or ~/tensorflow_datasets)",
    )
    prep.add_argument(
        "--manual_dir", default=None, help="files downloaded by hand, for builders that need them"
    )
    prep.add_argument(
        "--overwrite", action="store_true", help="regenerate a prepared dataset (keeps downloads)"
    )
    prep.add_argument("-q", "--quiet", action="store_true", help="only warnings and the result")
    return parser


def main(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    """Prepares the dataset; prints where it is and how to train on it."""
    if overrides:
        raise common.ConfigError("lmflax data takes no --config.KEY=VALUE overrides")
    common.setup_logging(args.quiet)
    path = sources.prepare(
        args.name, args.data_dir, manual_dir=args.manual_dir, overwrite=args.overwrite
    )
    flag = f" --config.data.data_dir={args.data_dir}" if args.data_dir else ""
    print(
        f"prepared {args.name} at {path}; train on it with --config.data.dataset={args.name}{flag}"
    )
    return 0
