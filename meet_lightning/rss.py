"""Peak resident memory of this process, per phase of a run (Linux: ``VmHWM``, reset through ``clear_refs``).

Linux keeps a high-water mark of the resident set (``VmHWM`` in ``/proc/self/status``) and resets it to the
current size when ``5`` is written to ``/proc/self/clear_refs``. Reading the mark and resetting it at each phase
boundary gives every phase its own peak. Where that is not available the tracker reports nothing rather than a
number that means something else.
"""

from __future__ import annotations

from pathlib import Path

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


class PeakRSSByPhase:
    """Peak RSS of each named phase: :meth:`enter` closes the current phase (its peak) and opens the next.

    A phase entered more than once (every training step) keeps its largest peak.
    """

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self.phase: str | None = None
        self.supported = peak_rss_bytes() is not None and reset_peak_rss()

    def enter(self, phase: str | None) -> None:
        """Ends the current phase and starts ``phase`` (``None``: stop measuring)."""
        if not self.supported:
            return
        if self.phase is not None:
            peak = peak_rss_bytes() or 0
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), peak)
        reset_peak_rss()
        self.phase = phase

    def summary(self, steps_phase: str = "train_step") -> dict[str, object]:
        """``peak_rss_gb`` per phase and ``peak_rss_over_train_step`` (the whole stage's peak / the steps' peak)."""
        if not self.peaks:
            return {}
        gb = {phase: round(b / 2**30, 3) for phase, b in self.peaks.items()}
        ratio = max(self.peaks.values()) / self.peaks[steps_phase] if self.peaks.get(steps_phase) else None
        return {"peak_rss_gb": gb, "peak_rss_over_train_step": round(ratio, 3) if ratio else None}
