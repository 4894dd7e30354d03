"""``python -m implicit_updates.cli``."""

import sys

from implicit_updates.cli import main

sys.exit(main())
