"""One metric's summary: its mean, a 95 % interval that fits what it measures, and its item count.

Proportions (accuracies and the win rate) get a Wilson interval, other means a bootstrap one
(:mod:`meet_lightning.stats`); every metric module reports its numbers through :func:`summarize`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meet_lightning.stats import mean_interval, proportion_interval


def is_proportion(name: str) -> bool:
    """Whether metric ``name`` is a share of items (each 0, 0.5 or 1): accuracies and the win rate."""
    return name.endswith("_accuracy") or name == "win_rate"


def summarize(name: str, values: Sequence[float], count: str = "pairs") -> dict[str, Any]:
    """``{name: mean, name_ci95: [lo, hi] or None, name_<count>: n}``.

    Proportions get a Wilson interval, other means a bootstrap one; below
    :data:`~meet_lightning.stats.MIN_ITEMS` items the interval is ``None`` (too few to say anything).
    """
    mean = sum(values) / len(values) if values else float("nan")
    interval = proportion_interval(values) if is_proportion(name) else mean_interval(values)
    return {name: mean, f"{name}_ci95": list(interval) if interval else None, f"{name}_{count}": len(values)}
