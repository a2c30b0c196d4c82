"""benchmarks/memory.py on the tiny model: the table's keys and units, not its numbers (which depend on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_memory_benchmark_reports_each_phase_per_arm(tmp_path):
    arm = "stage 1 (prompt tuning, frozen LM)"
    subprocess.run(
        [sys.executable, "benchmarks/memory.py", "--out", str(tmp_path), "--model", "tiny-debug", "--arms", arm,
         "--max_length", "128"],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    report = json.loads((tmp_path / "memory.json").read_text())
    assert report["parameters"] > 0 and [r["checkpointing"] for r in report["rows"]] == [False, True]
    for row in report["rows"]:
        assert row["peak_rss_gb"]["train_step"] > 0 and row["peak_rss_over_train_step"] >= 1
    assert "bytes / parameter" in (tmp_path / "memory.md").read_text()
