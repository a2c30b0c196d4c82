"""Matplotlib, optional: the figures both training (sample generations) and ``evaluate --plots`` draw on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from meet_lightning.errors import ConfigError


def require_matplotlib() -> Any:
    """``matplotlib.pyplot`` with the file-only Agg backend; one-line ConfigError when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plots needs matplotlib, which is not installed — pip install meet_lightning[plots]") from None
    return plt


def sample_words_figure(plt: Any, words: Mapping[str, Sequence[int]], step: int) -> Any:
    """A bar per control: the mean words of its sample generations at ``step``, each sample a dot."""
    figure, axis = plt.subplots(figsize=(1.6 + 1.1 * len(words), 3.2))
    for x, counts in enumerate(words.values()):
        axis.bar(x, sum(counts) / max(1, len(counts)), color="tab:blue", alpha=0.6)
        axis.plot([x] * len(counts), counts, "k.", ms=4)
    axis.set_xticks(range(len(words)), list(words), rotation=20, ha="right")
    axis.set_ylabel("words per sample")
    axis.set_title(f"sample generations, step {step}")
    figure.tight_layout()
    return figure
