"""The demo's measurements, and the demo itself end to end on the tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from meet_lightning import stats
from meet_lightning.commands import demo
from meet_lightning.commands.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_median_ratio_leaves_out_empty_concise_answers():
    # an empty concise answer has no ratio (it was counted as 2 words ÷ 1); the median is of 4 and 0.5
    assert stats.median_ratio(["a b c d", "a b", "x"], ["a", "", "a b"]) == 2.25


def test_repeated_4gram_share_flags_loops():
    assert stats.repeated_4gram_share(["one two three four five six"]) == 0.0
    assert stats.repeated_4gram_share(["a b c d a b c d a b c d"]) == pytest.approx(5 / 9)


def test_bootstrap_interval_brackets_the_median():
    verbose, concise = ["w " * n for n in range(10, 30)], ["w " * 4] * 20
    low, high = stats.bootstrap_median_ratio(verbose, concise)
    assert low <= stats.median_ratio(verbose, concise) <= high


def test_every_arm_must_use_the_same_decoding():
    with pytest.raises(AssertionError, match="every arm must decode"):
        demo.generate_arm(object(), ["p"], "concise", "verbose", **{**demo.DECODING, "max_new_tokens": 8})


def test_heldout_prompts_are_the_twenty_without_answers():
    assert len(demo.heldout_prompts()) == 20


def test_demo_end_to_end_on_the_tiny_model(tmp_path, monkeypatch, capsys, shared_data):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("MEET_SHARED_DATA", str(shared_data))
    monkeypatch.setattr(demo, "DECODING", {**demo.DECODING, "max_new_tokens": 8})  # seconds, not minutes
    code = main(
        [
            "demo",
            "--config",
            "configs/demo.yaml",
            "--config",
            "configs/debug.yaml",
            "--data.max_length",
            "1280",
            "--output_dir",
            str(tmp_path / "demo"),
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert lines[-1].startswith("verbose/concise median word ratio: ")
    float(lines[-1].rsplit(" ", 1)[1])
    assert any("asked by system prompt" in line for line in lines) and any("repeated 4-grams" in line for line in lines)
    real = [line for line in lines if line.startswith("real prompts (20 from AlpacaEval")]
    assert len(real) == 1 and "ratio" in real[0]  # the shared file is there in the suite (conftest's SHARED)


def test_real_prompts_are_a_fixed_choice_and_absent_without_the_shared_file(monkeypatch, tmp_path, shared_data):
    monkeypatch.setenv("MEET_SHARED_DATA", str(shared_data))
    first = demo.real_prompts()
    assert len(first) == 20 and len(set(first)) == 20 and first == demo.real_prompts()
    monkeypatch.setenv("MEET_SHARED_DATA", str(tmp_path))
    assert demo.real_prompts() == []
