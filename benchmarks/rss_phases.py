"""Where a library training arm's resident memory goes, phase by phase (Linux): ``throughput.py``'s library arms run
in this process with a callback that prints, at each forward chunk's loss, each backward, the optimizer step and
the step's end, the peak resident set since the previous mark (``VmHWM``, reset at every mark) and the current one
(``VmRSS``). ``--malloc-trim`` also hands glibc's free pages back to the kernel after every step (``malloc_trim``),
which separates memory the step still holds from memory the allocator kept.

    python benchmarks/rss_phases.py --arms stage2_prefix --windows 1 --steps 3
    python benchmarks/rss_phases.py --malloc-trim --arms stage2_prefix --windows 1 --steps 3

Every other flag is ``throughput.py``'s (``--in-process`` is implied). RSS does not depend on the CPU's speed, so a
busy machine changes nothing but the wall time. Findings: ``benchmarks/results/backward_per_chunk_2026-12-07``.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import throughput

from meet_lightning.rss import peak_rss_bytes, reset_peak_rss

STATUS = Path("/proc/self/status")


def current_rss_mb() -> float:
    """This process's resident set now, in MiB."""
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PhasePrinter(L.Callback):
    """Prints the peak since the previous mark and the resident set now, then resets the peak."""

    def __init__(self, trim: bool) -> None:
        self.trim = trim

    def mark(self, phase: str) -> None:
        print(f"rss {phase:14s} peak {peak_rss_bytes() / 2**20:7.0f} MiB  now {current_rss_mb():7.0f} MiB", flush=True)
        reset_peak_rss()

    def on_fit_start(self, trainer, module) -> None:
        self.mark("fit start")

    def on_before_backward(self, trainer, module, loss) -> None:
        self.mark("forward")

    def on_after_backward(self, trainer, module) -> None:
        self.mark("backward")

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.mark("before step")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.mark(f"step {batch_idx} end")
        if self.trim:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            print(f"rss {'trimmed':14s} now {current_rss_mb():7.0f} MiB", flush=True)


def main(argv: Sequence[str]) -> int:
    trim = "--malloc-trim" in argv
    if peak_rss_bytes() is None or not reset_peak_rss():
        sys.exit("rss_phases.py needs Linux's /proc/self/status VmHWM and clear_refs — run it on Linux")
    make_trainer = throughput.library_trainer

    def trainer_with_printer(settings, recorder):
        trainer = make_trainer(settings, recorder)
        trainer.callbacks.append(PhasePrinter(trim))
        return trainer

    throughput.library_trainer = trainer_with_printer
    return throughput.main([a for a in argv if a != "--malloc-trim"] + ["--in-process"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
