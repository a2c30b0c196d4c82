"""``python -m meet_lightning``."""

import sys

from meet_lightning.commands.cli import main

sys.exit(main())
