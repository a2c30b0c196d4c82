"""``python -m meet_lightning``."""

import sys

from meet_lightning.cli import main

sys.exit(main())
