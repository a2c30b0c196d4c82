"""Peak RSS per phase: each phase gets its own high-water mark (Linux VmHWM, reset between phases)."""

from __future__ import annotations

import sys

import pytest
import torch

from meet_lightning.rss import PeakRSSByPhase, peak_rss_bytes


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_each_phase_has_its_own_peak_when_asked():
    tracker = PeakRSSByPhase(reset=True)
    assert tracker.supported
    tracker.enter("small")
    tracker.enter("large")
    block = torch.ones(300 * 2**20 // 4)  # 300 MB, touched
    del block
    tracker.enter("after")
    tracker.enter(None)
    peaks = tracker.peaks
    assert peaks["large"] - peaks["small"] > 250 * 2**20  # the big block counts in its own phase only
    assert peaks["after"] < peaks["large"] - 250 * 2**20  # the reset forgot it (freed memory left the RSS)
    summary = tracker.summary(steps_phase="small")
    assert summary["peak_rss_over_train_step"] > 1 and set(summary["peak_rss_gb"]) == {"small", "large", "after"}
    assert peak_rss_bytes() > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_by_default_the_marks_are_cumulative_and_the_process_peak_is_kept():
    import resource

    tracker = PeakRSSByPhase()
    tracker.enter("before")
    tracker.enter("large")
    block = torch.ones(300 * 2**20 // 4)
    del block
    tracker.enter("after")
    tracker.enter(None)
    assert tracker.peaks["large"] - tracker.peaks["before"] > 250 * 2**20
    assert tracker.peaks["after"] == tracker.peaks["large"]  # cumulative: the peak happened in "large"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 >= tracker.peaks["large"]  # nothing was reset
    assert tracker.summary(steps_phase="large")["peak_rss_per_phase"] == "cumulative"


def test_on_cuda_each_phase_records_its_own_allocator_peak(monkeypatch):
    """The allocator's peak is read and reset at every boundary (faked here: this machine has no GPU)."""
    import meet_lightning.rss as rss

    allocated = {"peak": 0}
    monkeypatch.setattr(rss, "cuda_in_use", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: allocated["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: allocated.update(peak=0))
    tracker = PeakRSSByPhase()
    tracker.enter("load")
    allocated["peak"] = 3 * 2**30
    tracker.enter("train_step")
    allocated["peak"] = 6 * 2**30
    tracker.enter("between_steps")
    tracker.enter("train_step")
    allocated["peak"] = 5 * 2**30  # a later, smaller step keeps the phase's largest
    tracker.enter(None)
    summary = tracker.summary()
    assert summary["peak_cuda_gb"] == {"load": 3.0, "train_step": 6.0, "between_steps": 0.0}
    assert summary["peak_cuda_over_train_step"] == 1.0
