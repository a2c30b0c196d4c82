"""benchmarks/debug_metrics.py's comparison: equal trees pass, any changed value is named."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "debug_metrics.py"
spec = importlib.util.spec_from_file_location("debug_metrics", SCRIPT)
debug_metrics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(debug_metrics)


def test_differences_names_each_changed_value_and_passes_equal_metrics():
    before = {"r.yaml": {"stage1": {"val/loss": 1.0, "global_step": 3, "precision": "32-true"}}}
    assert debug_metrics.differences(before, before) == []
    assert debug_metrics.differences(before, {"r.yaml": {"stage1": {**before["r.yaml"]["stage1"], "val/loss": 1.0 + 1e-9}}}) == []
    after = {"r.yaml": {"stage1": {"val/loss": 1.01, "global_step": 3, "precision": "bf16-mixed"}, "stage2": {}}}
    assert debug_metrics.differences(before, after) == [
        "/r.yaml/stage2: only in one file",
        "/r.yaml/stage1/precision: '32-true' → 'bf16-mixed'",
        "/r.yaml/stage1/val/loss: 1.0 → 1.01",
    ]


def test_the_recipes_it_runs_are_the_shipped_ones_on_one_file():
    names = {p.relative_to(debug_metrics.CONFIGS).as_posix() for p in debug_metrics.recipes()}
    assert {"meet_hh_prompt.yaml", "baselines/dpo.yaml", "meet_hh_dpo_hybrid.yaml"} <= names
    assert not names & {"debug.yaml", "demo.yaml", "meet_helpsteer2.yaml", "strategies/fsdp.yaml"}
