"""benchmarks/precision_loss.py on the tiny model: one loss per step per precision, differences to the first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_precision_loss_benchmark_logs_every_step_of_each_precision(tmp_path):
    subprocess.run(
        [sys.executable, "benchmarks/precision_loss.py", "--out", str(tmp_path), "--model", "tiny-debug",
         "--precisions", "32-true", "bf16-true", "--steps", "3", "--max_length", "96", "--batch_size", "2"],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    rows = json.loads((tmp_path / "precision_loss.json").read_text())["rows"]
    assert [r["precision"] for r in rows] == ["32-true", "bf16-true"]
    fp32, bf16 = (r["losses"] for r in rows)
    assert len(fp32) == len(bf16) == 3 and fp32 != bf16  # bf16 weights round: the curves cannot be identical
    text = (tmp_path / "precision_loss.md").read_text()
    assert "bf16-true − 32-true" in text and "max |Δ|" in text
    assert not list(tmp_path.glob("run_*"))  # the runs' folders are removed once read
