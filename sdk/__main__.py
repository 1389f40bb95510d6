"""`python -m edgefleet`: the same as the `edgefleet` command."""

import sys

from ._cli import main

sys.exit(main())
