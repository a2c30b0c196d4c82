"""``precision: auto``: bf16 only where the hardware computes it natively, recorded per stage; recipes use it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_cpu_trainer, build_tiny_hh_data

from meet_lightning import precision
from meet_lightning.commands.cli import main, parse_recipe
from meet_lightning.precision import probe_bf16_matmul, resolve_dtype, resolve_precision

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if p.name != "debug.yaml")
REAL_CHECK = precision.cpu_bf16_native
"""Taken at collection, before the suite's fixture stands in for it."""


def native(answer: bool):
    """An injected CPU capability check."""
    return lambda: (answer, f"probe says {'native' if answer else 'emulated'} bf16")


def test_auto_is_fp32_on_a_cpu_without_native_bf16_and_bf16_mixed_with_it():
    slow = resolve_precision("auto", "cpu", native(False))
    fast = resolve_precision("auto", "cpu", native(True))
    assert (slow.precision, slow.dtype) == ("32-true", torch.float32) and "emulated" in slow.reason
    assert (fast.precision, fast.dtype) == ("bf16-mixed", torch.bfloat16) and "native" in fast.reason
    assert resolve_precision(None, "cpu", native(True)).precision == "bf16-mixed"  # unset means auto


def test_an_explicit_precision_wins_over_the_hardware():
    assert resolve_precision("bf16-mixed", "cpu", native(False)).precision == "bf16-mixed"
    assert resolve_precision("32-true", "cpu", native(True)).reason == "32-true: set in the recipe"
    assert resolve_precision(16, "cpu", native(True)).dtype == torch.float16


def test_generation_and_scoring_dtype_follow_the_same_rule():
    assert resolve_dtype("auto", "cpu", native(False))[0] == torch.float32
    assert resolve_dtype("auto", "cpu", native(True))[0] == torch.bfloat16
    assert resolve_dtype("float32", "cpu", native(True))[0] == torch.float32
    with pytest.raises(ValueError, match="dtype 'fp8' is not one of auto, float32"):
        resolve_dtype("fp8")


def test_the_capability_check_reports_what_it_decided_from():
    is_native, why = REAL_CHECK()
    assert isinstance(is_native, bool) and why.startswith("CPU ")
    measured, text = probe_bf16_matmul("CPU test", shape=(8, 8, 8), repeats=1)
    assert isinstance(measured, bool) and "× the fp32 time" in text


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_recipes_resolve_precision_from_the_hardware(recipe, tmp_path):
    stages = yaml.safe_load(recipe.read_text())
    for stage in ("stage1", "stage2"):
        written = ((stages.get(stage) or {}).get("trainer") or {}).get("precision", "auto")
        assert written == "auto", f"{recipe.name} {stage} hard-codes precision {written}"
    parsed, _ = parse_recipe("fit", ["--config", str(recipe), "--output_dir", str(tmp_path)])
    assert parsed.stage1.trainer["precision"] == "auto"


def test_a_stage_prints_and_records_its_resolved_precision(tmp_path, shared_data, monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_bf16_native", native(True))
    out = tmp_path / "run"
    args = ["fit", "--config", str(CONFIGS / "meet_hh_prompt.yaml"), "--config", str(CONFIGS / "debug.yaml")]
    args += ["--data.path", str(shared_data / "hh_rlhf_harmless.train.jsonl.gz"), "--output_dir", str(out)]
    args += ["--stage1.trainer.precision", "auto", "--stage1.trainer.max_steps", "1", "--stage2.model", "null"]
    assert main(args) == 0
    done = json.loads((out / "stage1" / "done.json").read_text())
    assert done["precision"] == "bf16-mixed" and done["precision_reason"] == "auto: probe says native bf16"
    assert "stage1: precision bf16-mixed (auto: probe says native bf16)" in capsys.readouterr().out
    config = yaml.safe_load((out / "stage1" / "logs" / "version_0" / "config.yaml").read_text())
    assert config["trainer"]["precision"] == "bf16-mixed"  # what Lightning ran with


def test_validation_metrics_do_not_depend_on_mixed_precision(shared_data, tmp_path):
    """Validation and test run in the weights' precision: under bf16-mixed the control classifier's margins used to
    carry bf16 rounding, so the same weights reported other metrics on a machine that chose bf16."""

    from meet_lightning.controls.tokens import PromptTuningControl
    from meet_lightning.modules import ControlTokenModule

    data = build_tiny_hh_data(shared_data, max_length=128, max_val_examples=8)
    torch.manual_seed(0)
    module = ControlTokenModule("tiny-debug", PromptTuningControl(num_tokens=3, init="random"), data.control_schema)
    module.configure_model()
    metrics = {}
    for name in ("32-true", "bf16-mixed"):
        trainer = build_cpu_trainer(tmp_path, devices=1, precision=name, limit_val_batches=None)
        metrics[name] = trainer.validate(module, datamodule=data, verbose=False)[0]
    assert metrics["32-true"].keys() == metrics["bf16-mixed"].keys() and "val/control_margin" in metrics["32-true"]
    for key, value in metrics["32-true"].items():
        assert metrics["bf16-mixed"][key] == pytest.approx(value, abs=1e-6), key
