"""Shared statistics: the one word count and the one bootstrap interval every report uses."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence


def words(text: str) -> int:
    """Whitespace-separated words in ``text``: the verbosity measure of the demo, ``evaluate`` and the plots."""
    return len(text.split())


def bootstrap_interval(
    statistic: Callable[[Sequence[int]], float], n: int, samples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile bootstrap interval of ``statistic`` over resamples of ``n`` items.

    Args:
        statistic: The statistic of one resample, given as item indices (with repeats).
        n: Number of items; every resample draws ``n`` indices with replacement.
        samples: Number of resamples.
        seed: Seed of the resampling (the interval is reproducible).

    Returns:
        ``(lo, hi)``; NaN resamples (a statistic undefined on them) are left out, ``(nan, nan)`` if all are.
    """
    rng = random.Random(seed)
    values = sorted(v for v in (statistic(rng.choices(range(n), k=n)) for _ in range(samples if n else 0)) if not math.isnan(v))
    if not values:
        return (math.nan, math.nan)
    return values[int(0.025 * len(values))], values[int(0.975 * len(values)) - 1]


def mean_interval(values: Sequence[float], samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of the mean of ``values``."""
    return bootstrap_interval(lambda idx: sum(values[i] for i in idx) / len(idx), len(values), samples, seed)
