"""``python -m qing`` runs the command line."""

import sys

from qing.cli import main

sys.exit(main())
