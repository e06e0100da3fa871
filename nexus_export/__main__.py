"""``python -m nexus_export``: the command line (the same as the ``nexus-export`` console script)."""

import sys

from nexus_export.cli import main

sys.exit(main())
