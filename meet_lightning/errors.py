"""User-facing errors: each one is printed as a single ``error: ...`` line with exit code 2 (3 for NaN/inf).

Only these exceptions are turned into exit code 2 by the CLI. Anything else is an internal bug and keeps
its traceback (exit code 1), so a real defect is never disguised as bad input.
"""

from __future__ import annotations

from collections.abc import Iterable


class MeetError(Exception):
    """Bad input from the user. The message names the file, row or flag and ends with the fix."""

    exit_code = 2


class DataError(MeetError):
    """A data file or record that cannot be read: ``FILE:ROW: what is wrong — how to fix it``."""


class ConfigError(MeetError):
    """A recipe, flag or output folder that cannot be used as given."""


class CheckpointError(MeetError):
    """A checkpoint, controls file or export folder that does not fit the run (missing, truncated, other model)."""


class NumericalError(MeetError):
    """Training produced NaN or inf (gradients or weights): stopped before it reached a checkpoint.

    Exit code 3, so scripts can tell a diverged run from bad input.
    """

    exit_code = 3


Check = tuple[object, str]
"""``(failed, message)``: a condition that is true when the input is bad, and the line that says the fix."""


def failed_checks(checks: Iterable[Check]) -> list[str]:
    """The messages of the checks that failed, in order (every problem is reported, not only the first)."""
    return [message for failed, message in checks if failed]


def raise_failed(checks: Iterable[Check]) -> None:
    """One :class:`ConfigError` line joining every failed check's message; nothing when all pass."""
    problems = failed_checks(checks)
    if problems:
        raise ConfigError("; ".join(problems))
