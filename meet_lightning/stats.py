"""Shared statistics: the one word count, the one bootstrap interval and the length measures every report uses."""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
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


def word_ratios(verbose: Sequence[str], concise: Sequence[str]) -> list[float]:
    """Per prompt ``words(verbose) / max(words(concise), 1)``."""
    return [words(v) / max(words(c), 1) for v, c in zip(verbose, concise, strict=True)]


def median_ratio(verbose: Sequence[str], concise: Sequence[str]) -> float:
    """Median over prompts of :func:`word_ratios`."""
    return statistics.median(word_ratios(verbose, concise))


def bootstrap_median_ratio(
    verbose: Sequence[str], concise: Sequence[str], samples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile bootstrap interval of :func:`median_ratio`, resampling prompts."""
    ratios = word_ratios(verbose, concise)
    return bootstrap_interval(lambda idx: statistics.median(ratios[i] for i in idx), len(ratios), samples, seed)


def repeated_4gram_share(texts: Sequence[str]) -> float:
    """Share of 4-grams that repeat an earlier 4-gram of the same text (degenerate loops score high)."""
    repeated = total = 0
    for text in texts:
        tokens = text.lower().split()
        grams = Counter(tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3))
        total += sum(grams.values())
        repeated += sum(n - 1 for n in grams.values())
    return repeated / total if total else 0.0
