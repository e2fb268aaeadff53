"""``python -m otmdr.cli``."""

import sys

from .entry import main

sys.exit(main())
