"""Peak resident memory of this process, per phase of a run (Linux: ``VmHWM`` in ``/proc/self/status``).

Linux keeps a high-water mark of the resident set. By default the tracker only reads it at each phase boundary:
each phase records the mark reached by its end (cumulative), so the first phase whose value equals the stage's
peak is where the peak happened, and nothing outside changes. ``MEET_RSS_PER_PHASE=1`` also resets the mark at
each boundary (``5`` written to ``/proc/self/clear_refs``) for every phase's own peak — but then the process's
``ru_maxrss`` (``/usr/bin/time -v``, a parent's ``getrusage``) covers only the last phase, so it is opt-in.
Where ``VmHWM`` is not available the tracker reports nothing rather than a number that means something else.

On a CUDA device the resident set says little about the training step: the tracker also records the CUDA
caching allocator's peak of allocated bytes per phase (``torch.cuda.max_memory_allocated``, reset at every
boundary, so each phase has its own peak).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def peak_rss_bytes() -> int | None:
    """The high-water mark of this process's resident set since the last reset, or ``None`` off Linux."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Resets the high-water mark to the current resident set; False where the kernel does not allow it."""
    try:
        CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def cuda_in_use() -> bool:
    """Whether this process has initialised CUDA (its allocator's statistics mean something)."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


class PeakRSSByPhase:
    """Peak RSS by named phase: :meth:`enter` closes the current phase (its peak) and opens the next.

    A phase entered more than once (every training step) keeps its largest value.

    Args:
        reset: Reset the high-water mark at each boundary (every phase's own peak; see the module docstring).
            Default: ``MEET_RSS_PER_PHASE=1`` in the environment.
    """

    def __init__(self, reset: bool | None = None) -> None:
        self.peaks: dict[str, int] = {}
        self.cuda_peaks: dict[str, int] = {}
        self.phase: str | None = None
        self.reset = os.environ.get("MEET_RSS_PER_PHASE") == "1" if reset is None else reset
        self.supported = peak_rss_bytes() is not None and (not self.reset or reset_peak_rss())

    def enter(self, phase: str | None) -> None:
        """Ends the current phase and starts ``phase`` (``None``: stop measuring)."""
        if cuda_in_use():
            if self.phase is not None:
                self.cuda_peaks[self.phase] = max(self.cuda_peaks.get(self.phase, 0), torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        if not self.supported:
            self.phase = phase
            return
        if self.phase is not None:
            peak = peak_rss_bytes() or 0
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), peak)
        if self.reset:
            reset_peak_rss()
        self.phase = phase

    def summary(self, steps_phase: str = "train_step") -> dict[str, object]:
        """``peak_rss_gb`` (GiB) per phase, ``peak_rss_per_phase`` (own peaks, or cumulative marks), and
        ``peak_rss_over_train_step``: the whole stage's peak over the training steps' peak (cumulative marks: over
        the mark at the end of the steps — 1.0 means no phase after them went higher). On CUDA also
        ``peak_cuda_gb`` (each phase's own allocator peak) and ``peak_cuda_over_train_step``."""
        summary: dict[str, object] = {}
        if self.peaks:
            summary.update(peak_rss_gb=gib(self.peaks), peak_rss_per_phase="own" if self.reset else "cumulative")
            summary["peak_rss_over_train_step"] = peak_ratio(self.peaks, steps_phase)
        if self.cuda_peaks:
            summary.update(peak_cuda_gb=gib(self.cuda_peaks), peak_cuda_over_train_step=peak_ratio(self.cuda_peaks, steps_phase))
        return summary


def gib(peaks: dict[str, int]) -> dict[str, float]:
    """Bytes per phase in GiB, rounded for a report."""
    return {phase: round(b / 2**30, 3) for phase, b in peaks.items()}


def peak_ratio(peaks: dict[str, int], steps_phase: str) -> float | None:
    """The largest phase's peak over ``steps_phase``'s (None when that phase never ran)."""
    return round(max(peaks.values()) / peaks[steps_phase], 3) if peaks.get(steps_phase) else None
