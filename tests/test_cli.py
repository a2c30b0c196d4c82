"""The command line, called in process: recipes, resuming, per-stage commands, export, generate, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import HELPSTEER_ROWS
from helpers.faults import fit_with_fault
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from meet_lightning.commands.cli import main
from meet_lightning.inference.export import AlignedModel
from meet_lightning.modules import JointFinetuneModule
from meet_lightning.training.reliability import InjectedFault

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# demo.yaml runs through the CLI in test_demo.py (its long answers need a longer max_length on the byte tokenizer)
RECIPES = sorted(
    p for p in CONFIGS.rglob("*.yaml") if p.name not in ("debug.yaml", "demo.yaml") and p.parent.name != "strategies"
)


def run(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exit:  # --help / --print_config exit inside the parser
        return int(exit.code or 0)


def fit_args(recipe: Path, out: Path, hh: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(recipe),
        "--config",
        str(CONFIGS / "debug.yaml"),
        "--data.path",
        str(hh),
        "--output_dir",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def hh(shared_data) -> Path:
    return shared_data / "hh_rlhf_harmless.train.jsonl.gz"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, hh) -> Path:
    """One debug run of the main recipe, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run") / "meet"
    assert run(*fit_args(CONFIGS / "meet_hh_prompt.yaml", out, hh)) == 0
    return out


def test_help_lists_every_command(capsys):
    assert run("--help") == 0
    text = capsys.readouterr().out
    for command in (
        "fit",
        "validate",
        "test",
        "predict",
        "generate",
        "evaluate",
        "push",
        "inspect-data",
        "download-model",
        "demo",
    ):
        assert command in text


def local_sources(recipe: Path, tmp_path: Path, hub_folder: Path) -> list[dict] | None:
    """The recipe's ``data.sources`` with each hub id replaced by local data of its shape (``None``: no sources)."""
    sources = (yaml.safe_load(recipe.read_text()).get("data") or {}).get("sources")
    if not sources:
        return None
    helpsteer = tmp_path / "helpsteer2.jsonl"
    helpsteer.write_text("".join(json.dumps(row) + "\n" for row in HELPSTEER_ROWS))
    local = {"Anthropic/hh-rlhf": str(hub_folder), "nvidia/HelpSteer2": str(helpsteer)}
    assert {s["path"] for s in sources} <= set(local), "a new hub id in a recipe: give it local data here"
    return [{**s, "path": local[s["path"]]} for s in sources]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_recipe_runs_through_the_cli(recipe, tmp_path, hh, hh_hub_folder):
    out = tmp_path / "run"
    sources = local_sources(recipe, tmp_path, hh_hub_folder)
    args = fit_args(recipe, out, hh)
    if sources is not None:  # several sources: each path replaced, not --data.path
        at = args.index("--data.path")
        args[at : at + 2] = ["--data.sources", json.dumps(sources)]
    assert run(*args) == 0
    assert (out / "export" / "config.json").is_file() and (out / "export" / "controls.safetensors").is_file()
    for stage in ("stage1", "stage2"):
        if (out / stage).exists():
            assert json.loads((out / stage / "done.json").read_text())["global_step"] == 3
    adapters = json.loads((out / "export" / "meet_schema.json").read_text())["adapters"]
    if "LoRAControl" in recipe.read_text():  # each control a PEFT adapter on the exported LM's own layers
        modules = dict(AutoModelForCausalLM.from_pretrained(out / "export").named_modules())
        for folder in adapters.values():
            keys = load_file(str(out / "export" / folder / "adapter_model.safetensors"))
            layers = {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in keys}
            assert layers and all(isinstance(modules.get(name), torch.nn.Linear) for name in layers), folder
    else:
        assert adapters is None


def test_stage2_continues_stage1s_batch_stream_instead_of_replaying_it(finished_run):
    stage1 = json.loads((finished_run / "stage1" / "done.json").read_text())
    stage2 = json.loads((finished_run / "stage2" / "done.json").read_text())
    assert stage1["batch_stream_position"] == 3 and stage2["batch_stream_position"] == 6  # 3 + 3 steps, one stream
    config = yaml.safe_load((finished_run / "stage2" / "logs" / "version_0" / "config.yaml").read_text())
    assert config["data"]["skip_batches"] == 3


def test_two_stage_run_writes_stage_files_and_a_loadable_export(finished_run):
    assert (finished_run / "stage1" / "controls.safetensors").is_file()
    assert (finished_run / "stage2" / "checkpoints" / "last.ckpt").is_file()
    logs = finished_run / "stage2" / "logs"
    assert [p.name for p in logs.iterdir()] == ["version_0"]  # CSV and TensorBoard side by side
    assert (logs / "version_0" / "metrics.csv").is_file() and list((logs / "version_0").glob("events.out.tfevents.*"))
    plain = AutoModelForCausalLM.from_pretrained(finished_run / "export")  # plain transformers
    assert plain.config.num_hidden_layers == 2
    card = (finished_run / "export" / "README.md").read_text()
    assert "hh_rlhf_harmless" in card and "harmless/good" in card
    schema = json.loads((finished_run / "export" / "meet_schema.json").read_text())
    assert schema["preferences"] == {"harmless": ["good", "bad"]} and schema["placement"] == "prefix"
    done = json.loads((finished_run / "stage2" / "done.json").read_text())  # where the stage's memory went
    assert {"load", "train_step", "between_steps", "after_fit"} <= set(done["peak_rss_gb"])
    assert done["peak_rss_over_train_step"] >= 1 and all(v > 0 for v in done["peak_rss_gb"].values())


def test_stage2_checkpoint_has_its_own_hyperparameters_and_reloads(finished_run):
    path = finished_run / "stage2" / "checkpoints" / "last.ckpt"
    state = torch.load(path, weights_only=True)
    assert state["hyper_parameters"]["lr"] == 1e-5 and state["hyper_parameters"]["control_lr"] == 1e-3
    module = JointFinetuneModule.load_from_checkpoint(path, weights_only=True)
    assert torch.equal(module.control.bank, state["state_dict"]["control.bank"])


def test_rerun_skips_finished_stages(finished_run, hh, capsys):
    assert run(*fit_args(CONFIGS / "meet_hh_prompt.yaml", finished_run, hh)) == 0
    out = capsys.readouterr().out
    assert "stage1: finished earlier" in out and "stage2: finished earlier" in out


def test_changed_recipe_is_refused_with_a_diff_but_budget_changes_are_not(finished_run, hh, capsys):
    assert run(*fit_args(CONFIGS / "meet_hh_prompt.yaml", finished_run, hh, "--data.batch_size", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "data.batch_size: 4 → 2" in err and "--overwrite" in err
    assert run(*fit_args(CONFIGS / "meet_hh_prompt.yaml", finished_run, hh, "--stage2.trainer.max_steps", "3")) == 0


def test_run_stopped_after_stage1_resumes_with_stage2(tmp_path, hh, monkeypatch, capsys):
    out = tmp_path / "run"
    with pytest.raises(InjectedFault, match="injected fault: stopping stage2"):
        fit_with_fault("stage2:step=1", *fit_args(CONFIGS / "meet_hh_prompt.yaml", out, hh))
    assert (out / "stage1" / "done.json").is_file() and not (out / "stage2" / "done.json").exists()
    assert run(*fit_args(CONFIGS / "meet_hh_prompt.yaml", out, hh)) == 0
    printed = capsys.readouterr().out
    assert "stage1: finished earlier" in printed


def test_run_stopped_mid_stage2_resumes_from_last_checkpoint_keeping_stage2_controls(tmp_path, hh, monkeypatch, capsys):
    out = tmp_path / "run"
    with pytest.raises(InjectedFault):
        fit_with_fault("stage2:step=2", *fit_args(CONFIGS / "meet_hh_prompt.yaml", out, hh))
    saved = torch.load(out / "stage2" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 1
    module_state: dict = {}
    original = JointFinetuneModule.on_load_checkpoint

    def spy(self, checkpoint):  # the controls in place when the checkpoint is restored
        original(self, checkpoint)
        module_state.setdefault("restored_bank", checkpoint["state_dict"]["control.bank"].clone())  # first = the resume

    monkeypatch.setattr(JointFinetuneModule, "on_load_checkpoint", spy)
    assert run(*fit_args(CONFIGS / "meet_hh_prompt.yaml", out, hh)) == 0
    printed = capsys.readouterr().out
    assert "stage1: finished earlier" in printed and "stage2: restoring from" in printed and "at step 1" in printed
    assert torch.equal(module_state["restored_bank"], saved["state_dict"]["control.bank"])
    stage1_bank = torch.load(out / "stage1" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]["control.bank"]
    assert not torch.equal(saved["state_dict"]["control.bank"], stage1_bank)  # stage 2's own controls were resumed
    assert json.loads((out / "stage2" / "done.json").read_text())["global_step"] == 3


@pytest.mark.parametrize("command", ["validate", "test"])
@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_validate_and_test_per_stage(finished_run, hh, command, stage, capsys):
    args = fit_args(CONFIGS / "meet_hh_prompt.yaml", finished_run, hh, "--stage", stage)
    assert run(command, *args[1:]) == 0


def test_predict_writes_generations_per_stage(finished_run, hh, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Hi there", "controls": "good"})
        + "\n"
        + json.dumps({"prompt": "Bye", "controls": {"harmless": "bad"}})
        + "\n"
    )
    args = fit_args(CONFIGS / "meet_hh_prompt.yaml", finished_run, hh, "--stage", "stage1", "--data.predict_path", str(prompts))
    assert run("predict", *args[1:]) == 0
    rows = [json.loads(line) for line in (finished_run / "stage1" / "predictions.jsonl").read_text().splitlines()]
    assert [r["controls"] for r in rows] == ["good", {"harmless": "bad"}] and all(isinstance(r["response"], str) for r in rows)

    def sampled(*decoding: str) -> list[str]:
        assert run("predict", *args[1:], *decoding) == 0
        return [json.loads(line)["response"] for line in (finished_run / "stage1" / "predictions.jsonl").read_text().splitlines()]

    seeded = ("--predict.temperature", "1.5", "--predict.top_k", "50", "--predict.seed", "3", "--predict.batch_size", "1")
    short = sampled(*seeded, "--predict.max_new_tokens", "4")
    assert short == sampled(*seeded, "--predict.max_new_tokens", "4")  # the seed makes sampling reproducible
    assert short != sampled(*seeded[:-2], "--predict.seed", "4", "--predict.max_new_tokens", "40")


def test_bad_predict_decoding_options_are_one_line_naming_each(finished_run, hh, capsys):
    args = fit_args(CONFIGS / "meet_hh_prompt.yaml", finished_run, hh, "--data.predict_path", "x.jsonl")
    assert run("predict", *args[1:], "--predict.top_p", "0", "--predict.max_new_tokens", "0") == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "--predict.max_new_tokens 0 must be ≥ 1" in err
        and "--predict.top_p 0.0 must be in (0, 1]" in err
    )


def test_generate_and_aligned_model_agree(finished_run, capsys):
    assert (
        run(
            "generate", "--model", str(finished_run / "export"), "--control", "good", "--prompt", "Hello", "--max_new_tokens", "6"
        )
        == 0
    )
    printed = capsys.readouterr().out.strip()
    model = AlignedModel.from_pretrained(finished_run / "export")
    assert model.generate(["Hello"], control="good", max_new_tokens=6) == [printed]
    assert model.generate(["Hello"], control="good", max_new_tokens=6, cache="static") == [printed]
    static = ["generate", "--model", str(finished_run / "export"), "--control", "good", "--prompt", "Hello", "--cache", "static"]
    assert run(*static, "--max_new_tokens", "6") == 0 and capsys.readouterr().out.strip() == printed
    mixed = model.generate(["Hello", "Hello"], controls=["good", {"harmless": "bad"}], max_new_tokens=6)
    assert mixed == [printed, model.generate(["Hello"], control="harmless/bad", max_new_tokens=6)[0]]


def test_generate_with_an_unknown_control_lists_the_known_ones(finished_run, capsys):
    assert run("generate", "--model", str(finished_run / "export"), "--control", "polite", "--prompt", "Hi") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: control 'polite' is unknown") and "harmless/good" in err and err.count("\n") == 1


def test_generate_a_prompts_file_to_jsonl_with_per_row_controls(finished_run, tmp_path):
    export = finished_run / "export"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Hello", "controls": {"harmless": "bad"}}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n"
    )
    out = tmp_path / "out" / "responses.jsonl"
    args = ["--model", str(export), "--prompts_file", str(prompts), "--control", "good", "--max_new_tokens", "6"]
    assert run("generate", *args, "--output", str(out), "--batch_size", "1") == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    model = AlignedModel.from_pretrained(export)
    assert [r["controls"] for r in rows] == [{"harmless": "bad"}, ["good"]]  # a row's own controls win over the flag
    assert [r["response"] for r in rows] == model.generate(
        ["Hello", "Hi"], controls=[{"harmless": "bad"}, "good"], max_new_tokens=6
    )
    text = tmp_path / "prompts.txt"
    text.write_text("Hello\n\nHi\n")  # plain lines: one prompt each, controls from the flags
    args = ["--model", str(export), "--prompts_file", str(text), "--control", "good", "--max_new_tokens", "6"]
    assert run("generate", *args, "--output", str(out)) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [[{"role": "user", "content": "Hello"}], [{"role": "user", "content": "Hi"}]]
    assert [r["response"] for r in rows] == model.generate(["Hello", "Hi"], control="good", max_new_tokens=6)


def test_generate_sampling_with_a_seed_repeats(finished_run, capsys):
    args = ["--model", str(finished_run / "export"), "--control", "good", "--prompt", "Hello", "--max_new_tokens", "8",
            "--temperature", "1.5", "--top_p", "0.9", "--top_k", "20", "--seed", "3"]  # fmt: skip
    capsys.readouterr()
    outputs = []
    for _ in range(2):
        assert run("generate", *args) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_generate_names_every_bad_flag_and_a_bad_row(finished_run, tmp_path, capsys):
    export = str(finished_run / "export")
    bad = ["--prompt", "Hi", "--prompts_file", "x.jsonl", "--top_p", "1.5", "--top_k", "-1", "--batch_size", "0"]
    assert run("generate", "--model", export, *bad) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(
        f in err for f in ("exactly one of --prompt", "--top_p 1.5", "--top_k -1", "--batch_size 0")
    )
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n" + json.dumps({"prompt": "Yo", "controls": "polite"}) + "\n")
    assert run("generate", "--model", export, "--prompts_file", str(prompts)) == 2
    err = capsys.readouterr().err
    assert f"{prompts}:2:" in err and "polite" in err and err.count("\n") == 1


def test_evaluate_reports_control_accuracy(finished_run, hh, tmp_path, capsys):
    report = tmp_path / "metrics.json"
    args = [
        "evaluate",
        "--model",
        str(finished_run / "export"),
        "--data.path",
        str(hh),
        "--data.preference",
        "harmless",
        "--max_pairs",
        "6",
        "--output",
        str(report),
    ]
    assert run(*args) == 0
    assert "score: 100%" in capsys.readouterr().err.replace("\r", "\n")  # progress: pairs scored, pairs/s
    metrics = json.loads(report.read_text())
    assert (
        metrics["pairs"] + metrics["pairs_skipped_too_long"] == 6
        and metrics["pairs"] >= 4
        and 0.0 <= metrics["control_accuracy"] <= 1.0
    )
    assert metrics["control_accuracy_ci95"] is None  # fewer than 20 pairs: no interval (stats.MIN_ITEMS)
    assert "logp_accuracy" in metrics and "chosen_nll" in metrics


def test_print_config_shows_the_resolved_recipe(hh, capsys, tmp_path):
    assert run(*fit_args(CONFIGS / "meet_hh_prompt.yaml", tmp_path, hh, "--print_config")) == 0
    printed = capsys.readouterr().out
    assert "model_name_or_path: tiny-debug" in printed and "PromptTuningControl" in printed


@pytest.mark.parametrize(
    "flag, suggestion",
    [
        ("--stage1.trainer.max_step", "--stage1.trainer.max_steps"),
        ("--data.batchsize", "--data.batch_size"),
    ],
)
def test_a_typo_gives_one_line_with_did_you_mean(hh, tmp_path, capsys, flag, suggestion):
    assert run(*fit_args(CONFIGS / "meet_hh_prompt.yaml", tmp_path, hh, flag, "3")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and f"did you mean {suggestion}?" in err


def test_unknown_command_suggests_the_closest(capsys):
    assert run("fitt") == 2
    assert "did you mean fit?" in capsys.readouterr().err


CUSTOM = '''
import torch
from meet_lightning import ControlTokenModule


class NormPenaltyModule(ControlTokenModule):
    """Stage 1 with an L2 penalty on the control tokens: a new objective in a few lines."""

    def __init__(self, *args, penalty: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)

    def compute_loss(self, batch):
        out = super().compute_loss(batch)
        norm = sum(p.pow(2).mean() for p in self.control_parameters())
        return {"loss": out["loss"] + self.hparams.penalty * norm, "nll": out["loss"].detach(), "norm": norm.detach()}
'''


def test_a_subclass_with_a_new_objective_runs_through_the_cli(tmp_path, hh, monkeypatch):
    (tmp_path / "custom_objective.py").write_text(CUSTOM)
    assert len(CUSTOM.strip().splitlines()) <= 20
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    args = fit_args(
        CONFIGS / "meet_hh_prompt.yaml",
        out,
        hh,
        "--stage1.model",
        "custom_objective.NormPenaltyModule",
        "--stage1.model.penalty",
        "0.5",
        "--stage2.model",
        "null",
    )
    assert run(*args) == 0
    state = torch.load(out / "stage1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["hyper_parameters"]["penalty"] == 0.5
    logged = (out / "stage1" / "logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "train/norm" in logged and "train/nll" in logged


def cli_flags(options: dict) -> list[str]:
    flags = []
    for key, value in options.items():
        flags += [f"--data.{key}", value if isinstance(value, str) else json.dumps(value)]
    return flags


def test_bad_data_files_through_the_cli_give_one_line_and_exit_2(tmp_path, capsys):
    from test_formats import BAD_INPUTS, _make_bad_input

    assert len(BAD_INPUTS) >= 15
    for case_id, name, content, options, fragments in BAD_INPUTS:
        (tmp_path / case_id).mkdir()
        path = _make_bad_input(tmp_path / case_id, case_id, name, content)
        code = run("inspect-data", "--data.path", str(path), *cli_flags(options))
        err = capsys.readouterr().err
        assert code == 2, case_id
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (case_id, err)
        for fragment in fragments:
            assert fragment in err, (case_id, fragment, err)


def test_inspect_data_reports_counts_drops_and_lengths(hh, capsys):
    assert (
        run(
            "inspect-data",
            "--data.path",
            str(hh),
            "--data.preference",
            "harmless",
            "--model",
            "tiny-debug",
            "--max_length",
            "256",
        )
        == 0
    )
    out = capsys.readouterr().out
    for line in (
        "format:    hh_rlhf  (detected)",
        "rows read: 1800",
        "pairs:     1796",
        "harmless/good: 1796",
        "chosen and rejected differ before the last Assistant turn: 4",
        "too long to train at max_length 256:",
    ):
        assert line in out
    assert "length in tokens (tiny-debug, chat template): p50" in out


def test_inspect_data_reports_the_cache_it_used(hh, tmp_path, capsys):
    args = ["inspect-data", "--data.path", str(hh), "--model", "tiny-debug", "--max_length", "256", "--cache_dir", str(tmp_path)]
    assert run(*args) == 0
    first = capsys.readouterr().out
    assert run(*args) == 0
    second = capsys.readouterr().out
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert f"cache:     {folder} (built in" in first and f"cache:     {folder} (reused, loaded in" in second
    assert first.split("cache:")[0] == second.split("cache:")[0]  # the same report from the cached rows
    assert run("inspect-data", "--data.path", str(hh)) == 0
    assert "cache:     none" in capsys.readouterr().out


def test_an_internal_bug_exits_1_with_its_traceback(tmp_path, monkeypatch):
    import subprocess
    import sys

    # A bug (not bad input) must not be disguised as exit code 2: simulate one in a subprocess.
    code = "import meet_lightning.commands.inspect_data as m; m.read_source = lambda s: 1 / 0; from meet_lightning.commands.cli import main; raise SystemExit(main(['inspect-data', '--data.path', 'x']))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and "ZeroDivisionError" in result.stderr and "Traceback" in result.stderr


def test_stage1_select_best_writes_the_controls_of_the_best_checkpoint(tmp_path, hh):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    extra = [
        "--stage1.select",
        "best",
        "--stage1.trainer.val_check_interval",
        "1",
        "--stage1.trainer.limit_val_batches",
        "1",
        "--stage2.model",
        "null",
    ]
    assert run(*fit_args(CONFIGS / "meet_hh_prompt.yaml", out, hh, *extra)) == 0
    best = torch.load(out / "stage1" / "checkpoints" / "best.ckpt", weights_only=True)
    last = torch.load(out / "stage1" / "checkpoints" / "last.ckpt", weights_only=True)
    written = load_file(out / "stage1" / "controls.safetensors")["bank"]
    assert torch.equal(written, best["state_dict"]["control.bank"])
    assert best["global_step"] < last["global_step"] or torch.equal(written, last["state_dict"]["control.bank"])


def test_an_option_added_by_an_upgrade_at_its_off_value_is_not_a_recipe_change():
    from meet_lightning.training.checks import recipe_difference

    old = {"data": {"path": "x", "batch_size": 4}}
    assert recipe_difference(old, {"data": {"path": "x", "batch_size": 4, "chosen_only": False}}) == ""
    assert (
        recipe_difference(old, {"data": {"path": "x", "batch_size": 4, "chosen_only": True}}) == "data.chosen_only: None → True"
    )


def test_two_preferences_of_hh_rlhf_from_its_folders(tmp_path, hh, hh_hub_folder):
    """The helpful + harmless recipe: each folder of the (hub-shaped) repository feeds its own preference."""
    out = tmp_path / "run"
    recipe = CONFIGS / "meet_hh_helpful_harmless.yaml"
    args = fit_args(recipe, out, hh, "--stage2.model", "null")
    at = args.index("--data.path")
    args[at : at + 2] = ["--data.sources", json.dumps(local_sources(recipe, tmp_path, hh_hub_folder))]
    assert run(*args) == 0
    schema = json.loads((out / "export" / "meet_schema.json").read_text())
    assert list(schema["preferences"]) == ["helpful", "harmless"]


def test_top_level_hub_options_on_the_command_line(tmp_path, hh, hh_hub_folder, caplog):
    """--data.subset / --data.data_dir / --data.split / --data.revision are flags (--data.subset used to be rejected)."""
    out = tmp_path / "run"
    args = fit_args(CONFIGS / "meet_hh_prompt.yaml", out, hh, "--stage2.model", "null", "--data.data_dir", "helpful-base")
    args[args.index("--data.path") + 1] = str(hh_hub_folder)
    assert run(*args, "--data.subset", "default", "--data.split", "train", "--data.revision", "main") == 0
    assert "200 rows read" in caplog.text  # helpful-base holds rows 301-500 of the HH file
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert (recipe["data"]["data_dir"], recipe["data"]["subset"], recipe["data"]["revision"]) == (
        "helpful-base",
        "default",
        "main",
    )


def test_helpsteer2_recipe_turns_attribute_scores_into_controls(tmp_path, hh_hub_folder):
    from meet_lightning.data.formats import SourceConfig, read_source

    recipe = CONFIGS / "meet_helpsteer2.yaml"
    sources = local_sources(recipe, tmp_path, hh_hub_folder)
    verbosity, helpfulness = (read_source(SourceConfig(**s)) for s in sources)
    by_response = {row["response"]: row for row in HELPSTEER_ROWS}
    for example in verbosity.examples:
        assert example.controls == {"verbosity": "verbose" if by_response[example.response]["verbosity"] >= 2 else "concise"}
    for example in helpfulness.examples:
        assert example.controls == {"helpfulness": "good" if by_response[example.response]["helpfulness"] >= 3 else "bad"}
    assert len(verbosity.examples) == len(helpfulness.examples) == len(HELPSTEER_ROWS)
    assert {e.controls["verbosity"] for e in verbosity.examples} == {"concise", "verbose"}


def test_streamed_run_interrupted_and_resumed_trains_on_the_same_batches(tmp_path, hh, monkeypatch):
    """``data.streaming``: a run stopped after step 3 (before its checkpoint) and resumed from step 2 sees the
    batches of an uninterrupted run, in order (exact: the stream is regenerated and the trained part skipped)."""
    from meet_lightning.modules.base import MeetModule

    seen: list[str] = []
    original = MeetModule.training_step

    def recording(self, batch, batch_idx):
        seen.append(json.dumps(batch["input_ids"].tolist()))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(MeetModule, "training_step", recording)
    flags = (
        "--data.streaming",
        "true",
        "--data.shuffle_buffer",
        "16",
        "--stage2.model",
        "null",
        "--stage1.trainer.max_steps",
        "6",
    )
    assert run(*fit_args(CONFIGS / "meet_hh_prompt.yaml", tmp_path / "whole", hh, *flags)) == 0
    uninterrupted, seen[:] = list(seen), []
    assert len(uninterrupted) == 6 and len(set(uninterrupted)) == 6
    with pytest.raises(InjectedFault):
        fit_with_fault("stage1:step=3", *fit_args(CONFIGS / "meet_hh_prompt.yaml", tmp_path / "cut", hh, *flags))
    assert run(*fit_args(CONFIGS / "meet_hh_prompt.yaml", tmp_path / "cut", hh, *flags)) == 0
    assert seen[:3] == uninterrupted[:3] and seen[3:] == uninterrupted[2:]  # step 3 replayed from the step-2 checkpoint
    done = json.loads((tmp_path / "cut" / "stage1" / "done.json").read_text())
    assert done["global_step"] == 6 and done["batch_stream_position"] == 6


def test_streaming_without_max_steps_is_one_line(tmp_path, hh, capsys):
    flags = (
        "--data.streaming",
        "true",
        "--stage2.model",
        "null",
        "--stage1.trainer.max_steps",
        "-1",
        "--stage1.trainer.max_epochs",
        "1",
    )
    assert run(*fit_args(CONFIGS / "meet_hh_prompt.yaml", tmp_path / "run", hh, *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --data.streaming true") and "max_steps" in err and "\n" not in err
