"""Shared statistics: the one word count, the intervals and the length measures every report uses.

Every reported interval comes from here, under one policy: proportions (accuracies, win rates) get a Wilson
score interval, means and ratios a percentile bootstrap, and below :data:`MIN_ITEMS` items no interval at all
(``None``, printed ``n/a``): on 6 pairs that all agree a bootstrap says ``[1.0, 1.0]``, a zero-width interval
that would then decide a verdict.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence

MIN_ITEMS = 20
"""Fewest items an interval (and so a verdict) is reported for; below it the interval is ``None`` (n/a)."""

Z95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95 % interval."""


def words(text: str) -> int:
    """Whitespace-separated words in ``text``: the verbosity measure of the demo, ``evaluate`` and the plots."""
    return len(text.split())


def enough_items(n: int) -> bool:
    """Whether ``n`` items are enough to report an interval (and draw a verdict from it)."""
    return n >= MIN_ITEMS


def bootstrap_interval(
    statistic: Callable[[Sequence[int]], float], n: int, samples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile bootstrap interval of ``statistic`` over resamples of ``n`` items, for any ``n``.

    The raw computation: reports go through :func:`mean_interval` or :func:`bootstrap_median_ratio`, which
    apply :data:`MIN_ITEMS`.

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


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n``, for any ``n ≥ 1``.

    Unlike a bootstrap it never collapses to a point: 8 successes of 8 give ``[0.68, 1.0]``, not ``[1.0, 1.0]``.
    ``successes`` may be fractional (a tie counts half a success).
    """
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    scale = 1 + z * z / n
    center = (p + z * z / (2 * n)) / scale
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale
    return max(0.0, center - half), min(1.0, center + half)


def proportion_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """95 % Wilson interval of the share of successes in ``values`` (each in ``[0, 1]``: 1 a success, 0.5 a tie);
    ``None`` below :data:`MIN_ITEMS` values."""
    if not enough_items(len(values)):
        return None
    return wilson_interval(float(sum(values)), len(values))


def mean_interval(values: Sequence[float], samples: int = 1000, seed: int = 0) -> tuple[float, float] | None:
    """95 % bootstrap interval of the mean of ``values``; ``None`` below :data:`MIN_ITEMS` values."""
    if not enough_items(len(values)):
        return None
    return bootstrap_interval(lambda idx: sum(values[i] for i in idx) / len(idx), len(values), samples, seed)


def length_ratio(verbose_words: float, concise_words: float) -> float:
    """``verbose_words / concise_words``; NaN when the concise side has no words.

    The one rule for an empty concise answer, used by every report: it has no ratio (NaN, left out of medians
    and counted by :func:`undefined_ratios`), rather than a ratio to an invented one word.
    """
    return verbose_words / concise_words if concise_words > 0 else math.nan


def word_ratios(verbose: Sequence[str], concise: Sequence[str]) -> list[float]:
    """Per prompt :func:`length_ratio` of the two answers' words (NaN where the concise answer is empty)."""
    return [length_ratio(words(v), words(c)) for v, c in zip(verbose, concise, strict=True)]


def undefined_ratios(verbose: Sequence[str], concise: Sequence[str]) -> int:
    """Prompts whose ratio is NaN (an empty concise answer): left out of :func:`median_ratio`, reported by count."""
    return sum(math.isnan(r) for r in word_ratios(verbose, concise))


def finite_median(values: Sequence[float]) -> float:
    """Median of the non-NaN ``values``; NaN when there are none."""
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def median_ratio(verbose: Sequence[str], concise: Sequence[str]) -> float:
    """Median over prompts of :func:`word_ratios`, empty concise answers left out (NaN if every one is empty)."""
    return finite_median(word_ratios(verbose, concise))


def bootstrap_median_ratio(
    verbose: Sequence[str], concise: Sequence[str], samples: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """95 % percentile bootstrap interval of :func:`median_ratio`, resampling prompts; ``None`` below
    :data:`MIN_ITEMS` prompts with a defined ratio."""
    ratios = [r for r in word_ratios(verbose, concise) if not math.isnan(r)]
    if not enough_items(len(ratios)):
        return None
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
