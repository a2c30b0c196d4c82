"""Intervals that mean something and inputs refused before anything is written (issue 31, rows 11–13 and links).

- Accuracies get Wilson intervals, never a zero-width bootstrap ``[1.0, 1.0]``; below ``MIN_ITEMS`` items there is
  no interval (``None``, ``n/a``) and no verdict, in ``evaluate`` and in ``benchmarks/compare.py`` alike.
- An empty concise answer has no length ratio (NaN, left out and counted), by one rule in ``stats`` that
  ``compare.py`` uses too.
- ``--seed_everything`` out of range and ``--overwrite true`` through a symbolic link: one ``error:`` line, exit 2,
  nothing created or deleted.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from meet_lightning import stats
from meet_lightning.commands.cli import main
from meet_lightning.evaluation.metrics import summarize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402

CONFIGS = ROOT / "configs"


def pairs(**metrics: list[float]) -> dict:
    """Scores as ``compare.score_arm`` stores them (pairs only, no length answers)."""
    return {"pairs": metrics, "length": None}


# ------------------------------------------------------------------------------------------------ row 11
def test_an_accuracy_on_a_few_pairs_has_no_interval_instead_of_a_zero_width_one():
    """8 pairs all won: the bootstrap said ``[1.0, 1.0]`` (row 11); now there is no interval at all."""
    metrics = summarize("control_accuracy", [1.0] * 8)
    assert metrics["control_accuracy"] == 1.0 and metrics["control_accuracy_pairs"] == 8
    assert metrics["control_accuracy_ci95"] is None
    assert summarize("chosen_nll", [1.5] * 19)["chosen_nll_ci95"] is None  # means too, below MIN_ITEMS


def test_accuracies_get_a_wilson_interval_that_never_collapses_to_a_point():
    metrics = summarize("control_accuracy", [1.0] * 30)
    low, high = metrics["control_accuracy_ci95"]
    assert high == pytest.approx(1.0) and low == pytest.approx(30 / (30 + stats.Z95**2))  # Wilson's bound at p = 1
    assert low < 0.9  # the bootstrap gave [1.0, 1.0] here too
    # a tie counts half: 10 wins, 10 ties, 10 losses is a share of 0.5, its interval symmetric around it
    low, high = summarize("logp_accuracy", [1.0] * 10 + [0.5] * 10 + [0.0] * 10)["logp_accuracy_ci95"]
    assert low == pytest.approx(1 - high) and low < 0.5 < high
    assert summarize("win_rate", [1.0] * 25, count="prompts")["win_rate_ci95"][0] < 1.0


def test_means_keep_a_bootstrap_interval_from_twenty_items():
    values = [float(v) for v in range(20)]
    low, high = summarize("chosen_nll", values)["chosen_nll_ci95"]
    assert low < sum(values) / 20 < high
    assert stats.mean_interval(values) == (low, high)


def test_compare_draws_no_verdict_below_twenty_items():
    """Row 11 through compare.py: MEET 'wins' on 8 pairs it all won against 8 the other arm lost."""
    meet, worse = pairs(logp_accuracy=[1.0] * 8, chosen_nll=[1.0] * 8), pairs(logp_accuracy=[0.0] * 8, chosen_nll=[2.0] * 8)
    d = compare.paired(meet, worse, "logp_accuracy")
    assert d["verdict"] == "n/a (n < 20)" and d["ci95"] is None and d["difference"] == 1.0
    assert compare.summarize(meet)["logp_accuracy"] == [1.0, None, None]
    assert "n/a" in compare.fmt(compare.summarize(meet)["logp_accuracy"]) and "wins" not in compare.fmt_difference(d, "MEET")
    # the length task's paired differences alike
    a = {"pairs": {"control_accuracy": [1.0] * 8}, "verbose": ["a b c"] * 8, "concise": ["a"] * 8}
    b = {"pairs": {"control_accuracy": [0.0] * 8}, "verbose": ["a"] * 8, "concise": ["a"] * 8}
    assert {d["verdict"] for d in compare.length_paired(a, b).values()} == {"n/a (n < 20)"}
    # from 20 items on, verdicts as before; accuracies with a Wilson interval
    meet, worse = pairs(logp_accuracy=[1.0] * 20, chosen_nll=[1.0] * 20), pairs(logp_accuracy=[0.0] * 20, chosen_nll=[2.0] * 20)
    assert compare.paired(meet, worse, "logp_accuracy")["verdict"] == "wins"
    assert compare.summarize(meet)["logp_accuracy"] == [1.0, *stats.wilson_interval(20, 20)]


def test_compare_tables_and_plots_show_n_a_for_missing_intervals(tmp_path):
    meet = {"label": "MEET (prompt)", "run": None}
    meet["scores"] = pairs(logp_accuracy=[1.0] * 6, chosen_nll=[1.0] * 6)
    meet["metrics"] = compare.summarize(meet["scores"])
    other = {**meet, "label": "other", "scores": pairs(logp_accuracy=[0.0] * 6, chosen_nll=[2.0] * 6)}
    other["metrics"] = compare.summarize(other["scores"])
    other["vs_reference"] = {m: compare.paired(meet["scores"], other["scores"], m) for m in compare.METRICS}
    results = {compare.REFERENCE: meet, "other": other}
    text = compare.table(results)
    assert "n/a (n < 20)" in text and "wins" not in text and "1.000 [n/a, n < 20]" in text
    pytest.importorskip("matplotlib")
    compare.plot(results, tmp_path / "compare.png")  # a cell without interval draws a bar without error bar
    assert (tmp_path / "compare.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------------ row 12
def test_an_empty_concise_answer_has_no_ratio_and_is_counted():
    verbose, concise = ["a b c d", "a b", "x"], ["a", "", "a b"]
    ratios = stats.word_ratios(verbose, concise)
    assert ratios[0] == 4.0 and math.isnan(ratios[1]) and ratios[2] == 0.5
    assert stats.median_ratio(verbose, concise) == 2.25 and stats.undefined_ratios(verbose, concise) == 1
    assert math.isnan(stats.median_ratio(["a"], [""]))


def test_compare_uses_the_library_rule_for_empty_concise_answers():
    """Row 12: compare.py's ratio and stats.median_ratio disagreed on an empty concise answer; both leave it out."""
    verbose, concise = ["w " * 8] * 20 + ["w w"], ["w w"] * 20 + [""]
    metrics = compare.length_metrics({"verbose": verbose, "concise": concise}, {})
    assert metrics["ratio"][0] == stats.median_ratio(verbose, concise) == 4.0
    assert metrics["ratio_undefined"] == 1 and metrics["ratio"][1] is not None  # 20 prompts with a ratio
    # the mixed task's ratio of mean words: an all-empty concise side is NaN by stats.length_ratio
    scores = {"length": {"concise": [0.0, 0.0], "verbose": [3.0, 5.0]}, "pairs": {}}
    assert math.isnan(compare.statistic(scores, "length_ratio")(np.arange(2)[None])[0])
    scores = {"length": {"concise": [2.0, 0.0], "verbose": [3.0, 5.0]}, "pairs": {}}
    assert compare.statistic(scores, "length_ratio")(np.arange(2)[None])[0] == stats.length_ratio(4.0, 1.0)
    # paired medians over the same prompts leave the empty answer out of its side only
    a = {"verbose": verbose, "concise": concise}
    assert compare.length_paired(a, a)["ratio"]["difference"] == 0.0


# ------------------------------------------------------------------------------------------------ row 13
def run(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exit:
        return int(exit.code or 0)


def fit_args(out: Path, shared_data: Path, *extra: str) -> list[str]:
    recipe, debug = str(CONFIGS / "meet_hh_prompt.yaml"), str(CONFIGS / "debug.yaml")
    data = str(shared_data / "hh_rlhf_harmless.train.jsonl.gz")
    return ["fit", "--config", recipe, "--config", debug, "--data.path", data, "--output_dir", str(out), *extra]


@pytest.mark.parametrize("seed", ["-5", str(2**32)])
def test_a_seed_out_of_range_is_one_line_and_creates_nothing(seed, tmp_path, shared_data, capsys):
    out = tmp_path / "run"
    assert run(*fit_args(out, shared_data, "--seed_everything", seed)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --seed_everything {seed} is out of range") and err.count("\n") == 1
    assert "4294967295" in err and not out.exists()


def test_the_largest_seed_is_accepted(tmp_path, shared_data):
    from meet_lightning.commands.cli import parse_recipe

    recipe, _ = parse_recipe("fit", fit_args(tmp_path / "run", shared_data, "--seed_everything", str(2**32 - 1))[1:])
    assert recipe.seed_everything == 2**32 - 1 and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------- --overwrite on links
def another_run(out: Path) -> None:
    """``out`` as a run of another recipe, which ``--overwrite true`` would clear."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump({"seed_everything": 7, "output_dir": str(out)}))


def test_overwrite_refuses_a_linked_stage_folder_and_deletes_nothing(tmp_path, shared_data, capsys):
    """It was a traceback (rmtree refuses links), after the recipe check had already passed."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    out = tmp_path / "run"
    another_run(out)
    (out / "stage1").symlink_to(elsewhere, target_is_directory=True)
    assert run(*fit_args(out, shared_data, "--overwrite", "true")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --overwrite true: {out / 'stage1'} is a symbolic link") and err.count("\n") == 1
    assert (elsewhere / "keep.txt").read_text() == "mine" and (out / "stage1").is_symlink() and (out / "recipe.yaml").is_file()


def test_overwrite_refuses_a_linked_output_dir_instead_of_deleting_through_it(tmp_path, shared_data, capsys):
    target = tmp_path / "real"
    another_run(target)
    (target / "stage1").mkdir()
    (target / "stage1" / "last.ckpt").write_text("progress")
    out = tmp_path / "link"
    out.symlink_to(target, target_is_directory=True)
    assert run(*fit_args(out, shared_data, "--overwrite", "true")) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert (target / "stage1" / "last.ckpt").read_text() == "progress"
