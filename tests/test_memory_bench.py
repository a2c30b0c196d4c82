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


def test_saved_for_backward_counts_less_kept_with_the_head_recomputed(shared_data, monkeypatch, capsys):
    """benchmarks/saved_for_backward.py on the tiny model: byte counts, which do not depend on the machine."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("saved_for_backward", ROOT / "benchmarks" / "saved_for_backward.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = str(shared_data / "hh_rlhf_harmless.train.jsonl.gz")
    argv = ["saved_for_backward.py", "--model", "tiny-debug", "--data", data, "--pairs", "2", "--max-length", "256"]
    monkeypatch.setattr(sys, "argv", [*argv, "--longest"])
    bench.main()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "4 rows × 256 tokens, 1020 response tokens" in line
    ratio = float(line.rsplit("(", 1)[1].split("×")[0])
    assert 0 < ratio < 1  # the (positions × vocabulary) logits are no longer kept
