"""Training callbacks: throughput accounting (and, later, sample generations per control)."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import Callback


class ThroughputMeter(Callback):
    """Counts real (non-pad) training tokens and wall time of ``fit``, for the stage's summary.

    Attributes:
        tokens: Non-pad tokens of every training batch seen (control tokens not counted).
        seconds: Wall time from the first to the last training batch.
    """

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += int(batch["attention_mask"].sum())
        self.seconds = time.perf_counter() - self._start

    def summary(self) -> dict[str, float]:
        """``train_tokens``, ``train_seconds`` and ``train_tokens_per_s`` of this process."""
        rate = self.tokens / self.seconds if self.seconds else 0.0
        return {"train_tokens": self.tokens, "train_seconds": round(self.seconds, 2), "train_tokens_per_s": round(rate, 1)}
