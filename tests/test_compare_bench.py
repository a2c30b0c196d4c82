"""benchmarks/compare.py: every arm through the real CLI on a tiny model, paired statistics, resuming."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import compare  # noqa: E402

ARMS = ["meet_prompt", "coh", "dpo"]


def settings(out: Path, **changes) -> compare.Settings:
    tiny = dict(model="tiny-debug", overlay=str(ROOT / "configs/debug.yaml"), steps=2, eval_pairs=6, length_prompts=3)
    tiny.update(max_new_tokens=4, max_length=1024, threads=1, arms=list(ARMS))
    return compare.Settings(out=out, **{**tiny, **changes})


@pytest.fixture(scope="module")
def report(tmp_path_factory, shared_data):
    out = tmp_path_factory.mktemp("compare")
    return out, compare.run(settings(out))


def test_every_arm_trains_the_same_budget_and_is_scored_on_the_same_pairs(report):
    out, result = report
    results = result["results"]
    assert list(results) == ["base", *ARMS]
    assert {r["run"]["steps"] for r in results.values() if r["run"]} == {2}
    assert all(r["run"]["train_tokens"] > 0 and r["run"]["peak_rss_gb"] > 0 for r in results.values() if r["run"])
    pair_counts = {len(r["scores"]["pairs"]["chosen_nll"]) for r in results.values()}
    assert pair_counts == {6}  # every held-out pair fits at this length, for every arm
    has = {name: set(r["metrics"]) for name, r in results.items()}
    assert has["base"] == {"chosen_nll", "logp_accuracy"}
    assert {"control_accuracy", "length_ratio"} <= has["meet_prompt"] and "dpo_reward_accuracy" not in has["meet_prompt"]
    assert "control_accuracy" in has["coh"] and "dpo_reward_accuracy" in has["dpo"] and "control_accuracy" not in has["dpo"]
    assert all(len(r["scores"]["length"]["verbose"]) == 3 for n, r in results.items() if n in ("meet_prompt", "coh"))
    for cell in results["meet_prompt"]["metrics"].values():
        assert cell[1] is None and cell[2] is None  # 6 pairs, 3 prompts: fewer than 20 items, no interval
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (out / name).stat().st_size > 0
    assert "| DPO |" in (out / "compare.md").read_text()


def test_rerunning_reads_finished_runs_back_and_refuses_other_settings(report, monkeypatch):
    out, first = report
    monkeypatch.setattr(compare.subprocess, "Popen", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = compare.run(settings(out))
    assert again["results"]["dpo"]["metrics"] == first["results"]["dpo"]["metrics"]
    with pytest.raises(SystemExit, match="other settings"):
        compare.run(settings(out, max_length=512))
    cached = out / "scores" / "coh.json"  # answers decoded before the repetition penalty covered every new token
    score = json.loads(cached.read_text())
    cached.write_text(json.dumps({**score, "settings": [v for v in score["settings"] if v != compare.ANSWERS]}))
    try:
        with pytest.raises(SystemExit, match="other settings"):
            compare.run(settings(out))
    finally:
        cached.write_text(json.dumps(score))


def test_a_run_record_made_in_another_clone_is_read_back(report, monkeypatch):
    """A committed report restored in a fresh clone (or a study run from a frozen worktree) holds recipe paths under
    another checkout: the run is read back, not trained again; another recipe is still refused."""
    out, first = report
    record = out / "runs" / "coh-lr1" / "compare_run.json"
    saved = record.read_text()
    run = json.loads(saved)
    moved = [
        str(Path("/elsewhere/clone") / Path(a).relative_to(compare.ROOT)) if a.endswith(".yaml") else a for a in run["command"]
    ]
    assert moved != run["command"]
    monkeypatch.setattr(compare.subprocess, "Popen", lambda *a, **k: pytest.fail("a finished run was trained again"))
    s = settings(out)
    try:
        record.write_text(json.dumps({**run, "command": moved}))
        assert compare.run_fit("coh", s, compare.prepare_data(s), 1.0)["command"] == moved
        other = [a.replace("configs/", "configs/other_") if a.endswith(".yaml") else a for a in moved]
        record.write_text(json.dumps({**run, "command": other}))
        with pytest.raises(SystemExit, match="other settings"):
            compare.run_fit("coh", s, compare.prepare_data(s), 1.0)
    finally:
        record.write_text(saved)


def test_a_run_cut_off_before_its_record_resumes_and_keeps_its_log(report):
    """A training killed mid-run (session end): re-running continues it and appends to its log, marked resumed."""
    out, first = report
    run_dir = out / "runs" / "coh-lr1"
    (run_dir / "compare_run.json").unlink()  # as if killed after its checkpoints, before compare wrote the record
    earlier = (run_dir / "fit.log").read_text()
    s = settings(out)
    record = compare.run_fit("coh", s, compare.prepare_data(s), 1.0)
    assert first["results"]["coh"]["run"]["resumed"] is False and record["resumed"] is True
    log = (run_dir / "fit.log").read_text()
    assert log.startswith(earlier) and len(log) > len(earlier)  # the earlier process's lines are kept
    assert record["steps"] == first["results"]["coh"]["run"]["steps"]  # finished stages are not trained again


def test_restore_puts_a_committed_reports_runs_back_so_a_fresh_clone_trains_only_what_it_lacks(report, tmp_path):
    out, _ = report
    committed, table = tmp_path / "compare.json", (out / "compare.md").read_text()
    committed.write_text((out / "compare.json").read_text())
    for folder in ("runs", "scores"):  # a fresh clone: neither the checkpoints nor the caches
        shutil.rmtree(out / folder)
    with pytest.raises(SystemExit, match="--out"):
        compare.run(settings(tmp_path / "elsewhere", restore=[committed]))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compare.subprocess, "Popen", lambda *a, **k: pytest.fail("a restored run was trained again"))
        compare.run(settings(out, restore=[committed]))
    assert (out / "compare.md").read_text() == table  # every number read back (json.loads keeps NaN; == would not)


def crafted_report(path: Path, out: Path, names: dict[str, str]) -> Path:
    """A compare.json for ``--out out``: per arm name its run's export folder (``out/runs/<run>/export`` when
    compare.py wrote it)."""
    results = {
        name: {"run": {"tuning": [{"arm": "meet_prompt", "export": str(export)}]}, "scores": {"settings": []}}
        for name, export in names.items()
    }
    path.write_text(json.dumps({"settings": {"out": str(out)}, "results": results}))
    return path


@pytest.mark.parametrize(
    "name, export",
    [
        ("meet_prompt", "{out}/runs/../../escaped/export"),  # the run record's folder climbs out
        ("meet_prompt", "{tmp}/escaped/export"),  # or is elsewhere altogether
        ("../../escaped", "{out}/runs/meet_prompt-lr1/export"),  # a row name becomes scores/../../escaped.json
        ("meet_prompt", "{out}/runs/linked/export"),  # a run folder that links out
    ],
)
def test_restore_refuses_a_report_leading_outside_out_and_writes_nothing(tmp_path, name, export):
    """Issue 31 row 4: a crafted report created files outside --out."""
    out = tmp_path / "out"
    (tmp_path / "escaped").mkdir()
    if "linked" in export:
        (out / "runs").mkdir(parents=True)
        (out / "runs" / "linked").symlink_to(tmp_path / "escaped", target_is_directory=True)
    report = crafted_report(tmp_path / "compare.json", out, {name: export.format(out=out, tmp=tmp_path)})
    with pytest.raises(SystemExit, match=r"^--restore .*(not a plain name|is not inside).*nothing restored") as refused:
        compare.run(settings(out, restore=[report]))
    assert "\n" not in str(refused.value.code)
    assert list((tmp_path / "escaped").iterdir()) == []
    assert not (out / "scores").exists() and not list(out.rglob("compare_run.json"))


def test_restore_accepts_the_names_compare_writes_and_refuses_a_broken_report(tmp_path):
    out = tmp_path / "out"
    names = {
        "coh@seconds": out / "runs" / "coh-lr0.333-steps49" / "export",
        "meet_prompt@T0.7": out / "runs" / "x-lr1" / "export",
    }
    compare.restore(settings(out), [crafted_report(tmp_path / "compare.json", out, names)])
    assert (out / "scores" / "coh@seconds.json").is_file() and (out / "scores" / "meet_prompt@T0.7.json").is_file()
    assert (out / "runs" / "coh-lr0.333-steps49" / "compare_run.json").is_file()
    (tmp_path / "broken.json").write_text(json.dumps({"settings": {"out": str(out)}, "results": [1]}))
    with pytest.raises(SystemExit, match="not a compare.json report"):
        compare.restore(settings(out), [tmp_path / "broken.json"])


def test_restore_takes_several_reports_and_writes_nothing_when_any_is_refused(tmp_path):
    """A study in parts: one report per part, each holding arms the others lack, restored together."""
    out = tmp_path / "out"
    first = crafted_report(tmp_path / "first.json", out, {"coh@seed1235": out / "runs" / "coh-lr1-seed1235" / "export"})
    second = crafted_report(tmp_path / "second.json", out, {"meet_prompt@seed1236": out / "runs" / "x-seed1236" / "export"})
    refused = crafted_report(tmp_path / "refused.json", out, {"../escaped": out / "runs" / "y" / "export"})
    with pytest.raises(SystemExit, match="refused.json: scores name '../escaped'"):
        compare.restore(settings(out), [first, refused])
    assert not out.exists()  # the first report's files were not written either
    compare.restore(settings(out), [first, second])
    assert sorted(p.name for p in (out / "scores").iterdir()) == ["coh@seed1235.json", "meet_prompt@seed1236.json"]
    assert (out / "runs" / "coh-lr1-seed1235" / "compare_run.json").is_file()
    assert (out / "runs" / "x-seed1236" / "compare_run.json").is_file()


def test_the_length_study_skips_the_parts_a_committed_report_holds(tmp_path):
    """A rerun of benchmarks/length_study.sh must not run (and rewrite the report of) a part already committed."""
    arms = ["meet_prompt", "control_vector", "coh", "one_stage_joint", "special_token_fast"]
    for seeds in (2, 3):
        held = {f"{arm}@seed{1233 + seeds}": {} for arm in arms}
        report = tmp_path / f"seed{seeds}_partial" / "compare.json"
        report.parent.mkdir()
        report.write_text(json.dumps({"settings": {"seed": 1234}, "results": held}))
    calls = tmp_path / "calls"
    fake = tmp_path / "python"  # runs the script's own checks, records every other call (a part's compare.py)
    fake.write_text(f'#!/bin/sh\n[ "$1" = -c ] && exec {sys.executable} "$@"\necho "$@" >> {calls}\n')
    fake.chmod(0o755)
    script = tmp_path / "benchmarks" / "length_study.sh"  # a copy: it runs from its parent's parent, not the repo
    script.parent.mkdir()
    shutil.copy(ROOT / "benchmarks/length_study.sh", script)
    env = {"PATH": "/usr/bin:/bin", "PY": str(fake), "RESULTS": str(tmp_path)}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("skipped") == 7 and not calls.exists()
    report.write_text(json.dumps({"settings": {"seed": 1234}, "results": {"meet_prompt@seed1236": {}}}))
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode != 0  # the fake wrote no report to copy: the script stops at the first part it ran
    assert calls.read_text().count("--seeds 3 --arms meet_prompt,control_vector ") == 1
    assert done.stdout.count("skipped") == 3


def test_a_method_wins_only_where_the_paired_interval_excludes_zero():
    def scores(accuracy, nll):
        return {"pairs": {"logp_accuracy": accuracy, "chosen_nll": nll}, "length": None}

    n = 40
    meet = scores([1.0] * n, [1.0] * n)
    worse = scores([0.0] * n, [2.0] * n)
    noisy = scores([1.0, 0.0] * (n // 2), [1.0 + 0.01 * (-1) ** i for i in range(n)])
    assert compare.paired(meet, worse, "logp_accuracy")["verdict"] == "wins"
    assert compare.paired(meet, worse, "chosen_nll")["verdict"] == "wins"  # lower NLL is better
    assert compare.paired(worse, meet, "chosen_nll")["verdict"] == "loses"
    assert compare.paired(meet, meet, "logp_accuracy")["verdict"] == "tie"
    assert compare.paired(meet, noisy, "chosen_nll")["verdict"] == "tie"
    assert compare.paired(meet, worse, "control_accuracy") is None  # neither has it: n/a, not a tie


def test_the_length_task_reports_ratio_loops_and_accuracy_per_arm(tmp_path, shared_data):
    """``--task length``: AlpacaEval only, the base asked by system prompt, DPO toward verbose as a length change."""
    s = settings(tmp_path, task="length", arms=["meet_prompt", "dpo"], max_length=2048, length_prompts=4)
    results = compare.run(s)["results"]
    assert list(results) == ["base", "meet_prompt", "dpo"]
    meet, dpo, base = (results[n]["metrics"] for n in ("meet_prompt", "dpo", "base"))
    assert {"ratio", "repeated_4grams", "counted", "control_accuracy", "median_words"} <= set(meet)
    assert len(results["meet_prompt"]["scores"]["verbose"]) == 4 and "ratio" in base  # the system-prompt arm
    assert {"length_vs_base", "dpo_reward_accuracy"} <= set(dpo) and "ratio" not in dpo
    assert meet["ratio"][1] is None  # 4 prompts: no interval
    assert results["dpo"]["vs_reference"] == {} and "ratio" in results["base"]["vs_reference"]
    table = (tmp_path / "compare.md").read_text()
    assert table.startswith("task length:") and "| DPO |" in table and "MEET" in table.split("Paired differences")[1]
    assert (tmp_path / "compare.png").stat().st_size > 0
    assert "harmless" not in (tmp_path / "runs" / "meet_prompt-lr1" / "recipe.yaml").read_text().split("sources:")[1][:400]


def test_the_length_study_pools_seeds_and_reports_the_cap_the_ceiling_and_the_quality_guard(tmp_path, shared_data, monkeypatch):
    """``--seeds 2``: every arm and the base trained/decoded per seed, pooled per arm, MEET paired seed by seed."""
    monkeypatch.setattr(compare, "STEER_FIT", 16)  # F's pairs: a few are enough to check the plumbing
    monkeypatch.setattr(compare, "STEER_VAL", 8)
    s = settings(tmp_path, task="length", arms=["meet_prompt", "control_vector"], max_length=2048, length_prompts=4, seeds=2)
    report = compare.run(s)
    arm_names = ("base", "meet_prompt", "control_vector")
    assert set(report["results"]) == {f"{a}{t}" for a in arm_names for t in ("", "@seed1235")}
    assert (tmp_path / "runs" / "meet_prompt-lr1-seed1235").is_dir() and (
        tmp_path / "runs" / "meet_prompt-lr1"
    ).is_dir()  # as in a one-seed run
    arms = report["arms"]
    assert set(arms) == set(arm_names) and all(a["seeds"] == 2 for a in arms.values())
    steering = report["results"]["control_vector"]["scores"]["steering"]  # F: fitted on training pairs, no run
    assert steering["strength"] in (0.0, *compare.STEER_STRENGTHS) and steering["fit_pairs"] > steering["val_pairs"] > 0
    assert len(arms["control_vector"]["geo_ratio"]) == 3 and report["results"]["control_vector"]["run"] is None
    meet = arms["meet_prompt"]
    assert len(meet["geo_ratio"]) == 3 and len(meet["geo_ratio_per_seed"]) == 2
    assert 0 <= meet["cap_share"]["verbose"] <= 1 and meet["base_nll"]["verbose"][0] > 0
    assert arms["base"]["vs_reference"]["verdict"] == "n/a (n < 20)"  # 4 prompts: no verdict
    assert "vs_reference" not in meet and report["ceiling"]["ratio"][0] > 0
    scores = report["results"]["meet_prompt@seed1235"]["scores"]
    assert scores["settings"][-1] == "seed 1235" and len(scores["base_nll"]["verbose"]) == 4
    assert "Over 2 seed(s)" in (tmp_path / "compare.md").read_text()


def test_a_run_record_is_not_read_back_when_its_recipe_file_changed(tmp_path, shared_data, monkeypatch):
    """Same command line, edited YAML (e.g. a new default): the old run must not stand in for the new one."""
    s = settings(tmp_path, task="length", arms=["meet_prompt"], max_length=2048, length_prompts=4)
    s.out.mkdir(parents=True, exist_ok=True)
    data = compare.prepare_data(s)
    first = compare.run_fit("meet_prompt", s, data, 1.0)
    assert compare.run_fit("meet_prompt", s, data, 1.0) == first  # the same recipe: read back
    monkeypatch.setattr(compare, "recipe_digest", lambda arm, s: "another recipe")
    with pytest.raises(SystemExit, match="trained from other contents of configs/meet_hh_prompt.yaml"):
        compare.run_fit("meet_prompt", s, data, 1.0)


def test_an_arms_own_learning_rate_is_not_overridden_by_its_recipes():
    arm = compare.ARMS["special_token_fast"]
    recipe = {"stage1": {"model": {"init_args": {"lr": 1e-5, "control_lr": 1e-3}}}}
    assert compare.lr_overrides(arm, recipe, 1.0) == [
        "--stage1.model.init_args.lr",
        "1e-05",
        "--stage1.model.init_args.control_lr",
        "0.03",
    ]


def test_task_presets_fill_what_the_flags_leave():
    s = compare.parse(["--task", "length", "--steps", "8"])
    assert (s.task, s.steps, s.length_prompts, s.max_length) == ("length", 8, 100, 512)
    assert s.arms == compare.TASKS["length"]["arms"]
    study = {**compare.ABLATION_ARMS, **compare.STUDY_ARMS}
    assert compare.parse([]).arms == [a for a in compare.ARMS if a not in study and a != compare.JUDGE]
    assert (s.seeds, s.max_new_tokens, compare.parse(["--task", "ablate"]).seeds) == (3, 512, 1)
    assert compare.parse([]).length_prompts == 24
    assert compare.parse(["--task", "ablate"]).temperatures == [0.0, 1.0]


def test_the_ablate_task_compares_each_variant_with_its_axis_reference(tmp_path, shared_data):
    """Variants train through the CLI with their one changed setting; a temperature reuses the reference's export."""
    arms = ["meet_prompt", "prompt_tokens1", "prompt_infix"]
    s = settings(tmp_path, task="ablate", arms=arms, max_length=2048, length_prompts=4, temperatures=[0.0])
    results = compare.run(s)["results"]
    assert list(results) == ["base", *arms, "meet_prompt@T0"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == sorted(f"{a}-lr1" for a in arms)  # T 0: no training
    recipe = (tmp_path / "runs" / "prompt_tokens1-lr1" / "recipe.yaml").read_text()
    assert (
        "num_tokens: 1\n" in recipe and "placement: infix" in (tmp_path / "runs" / "prompt_infix-lr1" / "recipe.yaml").read_text()
    )
    greedy = results["meet_prompt@T0"]
    assert greedy["export"] == results["meet_prompt"]["export"] and "pairs" not in greedy["scores"]
    assert greedy["scores"]["settings"][-1]["temperature"] == 0.0 and len(greedy["scores"]["verbose"]) == 4
    assert set(greedy["vs_reference"]) == {"ratio"} and set(results["prompt_infix"]["vs_reference"]) == {
        "ratio",
        "control_accuracy",
    }
    table = (tmp_path / "compare.md").read_text()
    for row in ("| prompt length | 20 tokens (reference) |", "| placement | prefix (reference) |", "| decoding temperature |"):
        assert row in table
    assert "| init |" not in table and "reference" in table.split("MEET (prompt), 1 token |")[1].splitlines()[0]


def test_compose_effects_separate_what_each_toggle_moves():
    """Length doubles words and leaves the margin; harmless moves the margin and leaves words: no leak."""
    n = 30
    rng = np.random.default_rng(0)
    base_words, base_margin = rng.integers(5, 40, n), rng.normal(0, 0.2, n)
    words = {f"{h}+{m}": ((base_words + 1) * (2 if m == "verbose" else 1) - 1).tolist() for h, m in compare.COMBINATIONS}
    margin = {f"{h}+{m}": (base_margin + (0.5 if h == "good" else 0.0)).tolist() for h, m in compare.COMBINATIONS}
    effects = compare.compose_effects({"words": words, "margin": margin})
    assert effects["length"]["words"] == pytest.approx([2.0, 2.0, 2.0])
    assert effects["harmless"]["margin"] == pytest.approx([0.5, 0.5, 0.5])
    assert effects["length"]["margin"] == pytest.approx([0, 0, 0], abs=1e-12) and effects["harmless"]["words"] == pytest.approx(
        [1, 1, 1]
    )
    assert effects["leak"]["words"] == pytest.approx([0.0] * 3, abs=1e-12) and effects["leak"]["margin"] == pytest.approx(
        [0.0] * 3, abs=1e-12
    )
    half = {
        k: (np.array(v) + (0.25 if k.startswith("good") and k.endswith("verbose") else 0.0)).tolist() for k, v in margin.items()
    }
    leaky = compare.compose_effects({"words": words, "margin": half})  # verbose moves the margin half as far for good
    assert leaky["length"]["margin"][0] == pytest.approx(0.125) and leaky["leak"]["margin"][0] == pytest.approx(0.125 / 0.625)
    assert leaky["leak"]["margin"][1] <= leaky["leak"]["margin"][0] <= leaky["leak"]["margin"][2]
    margin["bad+verbose"][0] = float("nan")  # an empty answer has no margin: that prompt drops from the margin cells
    assert compare.compose_effects({"words": words, "margin": margin})["harmless"]["margin_prompts"] == n - 1


def test_the_compose_task_judges_four_combinations_with_a_separate_harmlessness_model(tmp_path, shared_data):
    s = settings(tmp_path, task="compose", arms=["meet_prompt"], max_length=2048, eval_pairs=4)
    report = compare.run(s)
    (name,) = report["results"]
    scores = report["results"][name]["scores"]
    assert name == "meet_prompt" and set(scores["words"]) == {"good+concise", "good+verbose", "bad+concise", "bad+verbose"}
    assert all(len(v) == 4 for v in scores["words"].values()) and all(len(v) == 4 for v in scores["margin"].values())
    assert 0 <= report["judge"]["control_accuracy"][0] <= 1 and report["judge"]["pairs"] == 4
    judge_recipe = (tmp_path / "runs" / f"{compare.JUDGE}-lr1" / "recipe.yaml").read_text()
    meet_recipe = (tmp_path / "runs" / "meet_prompt-lr1" / "recipe.yaml").read_text()
    assert "multi_response" not in judge_recipe and "multi_response" in meet_recipe and "hh_rlhf" in meet_recipe
    table = (tmp_path / "compare.md").read_text()
    assert (
        table.startswith("task compose:") and "| MEET (prompt) | length: concise → verbose |" in table and "off-diagonal" in table
    )
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_the_harmless_task_trains_on_hh_alone_and_scores_pairs_only(tmp_path, shared_data):
    s = settings(tmp_path, task="harmless", arms=["meet_prompt", "dpo"])
    assert compare.parse(["--task", "harmless"]).steps == 600 and compare.parse(["--task", "harmless"]).eval_pairs == 200
    results = compare.run(s)["results"]
    assert results["meet_prompt"]["scores"]["length"] is None and "length_ratio" not in results["meet_prompt"]["metrics"]
    assert "control_accuracy" in results["meet_prompt"]["metrics"] and "dpo_reward_accuracy" in results["dpo"]["metrics"]
    assert "multi_response" not in (tmp_path / "runs" / "meet_prompt-lr1" / "recipe.yaml").read_text()
    head = (tmp_path / "compare.md").read_text().splitlines()[0]
    assert head.startswith("task harmless: model tiny-debug; HH harmless only;") and "AlpacaEval" not in head


def test_equal_seconds_retrains_other_arms_for_the_references_training_seconds(monkeypatch, tmp_path):
    calls = []

    def fake_train(name, s, data, steps=None):
        calls.append((name, steps))
        return {"export": f"{name}-{steps}", "steps": steps, "train_seconds": 1.0}

    monkeypatch.setattr(compare, "train_arm", fake_train)
    results = {
        "meet_prompt": {"run": {"steps": 60, "train_seconds": 300.0}},
        "stage1_only": {"run": {"steps": 60, "train_seconds": 150.0}},  # half the seconds per step: 120 steps
        "coh": {"run": {"steps": 60, "train_seconds": 301.0}},  # the same cost: not trained again
    }
    compare.add_equal_seconds_rows(settings(tmp_path, arms=["meet_prompt", "stage1_only", "coh"]), {}, results)
    assert calls == [("stage1_only", 120)]
    assert results["stage1_only@seconds"]["label"].startswith("stage 1 only, 120 steps (≈ MEET (prompt)'s 300 s)")
    data = {"alpaca_train": tmp_path / "a.jsonl", "hh_train": tmp_path / "h.jsonl"}
    command = compare.fit_command("meet_prompt", settings(tmp_path), data, 1.0, tmp_path / "out", steps=10)
    assert (
        command[command.index("--stage1.trainer.max_steps") + 1] == "5"
        and command[command.index("--stage2.trainer.max_steps") + 1] == "5"
    )


def test_budget_full_picks_the_learning_rate_whose_controls_work_best_not_the_lowest_loss():
    runs = [
        {"lr_multiplier": 0.333, "val_loss": 1.0, "val_control_accuracy": 0.55},
        {"lr_multiplier": 1.0, "val_loss": 1.2, "val_control_accuracy": 0.80},
        {"lr_multiplier": 3.0, "val_loss": 1.1, "val_control_accuracy": 0.80},
    ]
    assert min(runs, key=compare.selection_key(runs))["lr_multiplier"] == 3.0  # old code: 0.333 (lowest loss)
    no_controls = [{"val_loss": 1.0, "val_control_accuracy": None}, {"val_loss": 0.9, "val_control_accuracy": None}]
    assert min(no_controls, key=compare.selection_key(no_controls))["val_loss"] == 0.9


@pytest.mark.parametrize("name", list(compare.ARMS))
def test_every_arms_recipe_and_overrides_parse(name, tmp_path):
    """A typo in an arm's flags must fail here, not after a long run of the arms before it."""
    from meet_lightning.commands.cli import parse_recipe

    arm = compare.ARMS[name]
    recipe, _ = parse_recipe("fit", ["--config", str(ROOT / arm.recipe), *arm.overrides, "--output_dir", str(tmp_path)])
    assert recipe.active_stages == list(arm.stages), (recipe.active_stages, arm.stages)
