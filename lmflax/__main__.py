"""`python -m lmflax ...` is the `lmflax` command."""

import sys

from lmflax.cli import main

sys.exit(main())
