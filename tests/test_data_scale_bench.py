"""``benchmarks/data_scale.py`` on a small file: every phase runs and the second run reuses the cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_data_scale_benchmark_runs_and_reuses_the_cache(tmp_path, shared_data):
    out = tmp_path / "scale.json"
    command = [sys.executable, str(REPO / "benchmarks" / "data_scale.py"), "--pairs", "2000", "--steps", "1", "--num-proc", "2"]
    subprocess.run(
        [*command, "--json", str(out)],
        check=True,
        capture_output=True,
        cwd=REPO,
        env={**__import__("os").environ, "MEET_SHARED_DATA": str(shared_data)},
    )
    results = json.loads(out.read_text())
    assert results["build"]["built"] and not results["load"]["built"]
    assert (
        results["build"]["cache"] == results["load"]["cache"]
        and results["load"]["train_units"] == results["build"]["train_units"]
    )
    assert results["train_large"]["exit_code"] == results["train_small"]["exit_code"] == 0
