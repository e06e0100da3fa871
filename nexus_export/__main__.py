"""``python -m nexus_export``: the command line (the same as the ``nexus-export`` console script)."""

import sys

from .cli import main

sys.exit(main())
