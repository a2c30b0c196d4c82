"""Runs ``fit`` with a fault handed in as a callback (the library reads none from the environment).

In process: ``fit_with_fault("stage2:step=1", *fit_args)``. As its own process (the kill-and-resume test, which
needs a real SIGKILL): ``python tests/helpers/faults.py SPEC fit --config …``.
"""

from __future__ import annotations

import sys

from meet_lightning.commands.cli import main
from meet_lightning.training.reliability import FaultInjection


def fit_with_fault(spec: str, *args: str) -> int:
    """``main(args)`` with a :class:`FaultInjection` for ``spec`` (``STAGE:step=K[:at=POINT][:kill]``)."""
    try:
        return main(list(args), callbacks=[FaultInjection(spec)])
    except SystemExit as exit:
        return int(exit.code or 0)


if __name__ == "__main__":
    sys.exit(fit_with_fault(sys.argv[1], *sys.argv[2:]))
