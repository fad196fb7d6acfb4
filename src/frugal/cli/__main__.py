"""`python -m frugal.cli`: the `frugal` command."""

import sys

from frugal.cli.main import main

sys.exit(main())
