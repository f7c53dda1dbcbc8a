#!/usr/bin/env python3
"""`python train.py ...` = `lmflax train ...` (see `lmflax --help`); kept so documented commands work."""

import sys

from lmflax.cli import train_py as main

if __name__ == "__main__":
    sys.exit(main())
