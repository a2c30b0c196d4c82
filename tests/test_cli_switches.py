"""One switch per concern (issue 32 items 4 and 5): ``--trainer.*`` and ``--devices`` for both stages, ``--config``
for the tools, the device that is there, ``--version``, readable ``--help`` types, and one ``--logger`` switch."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import HH_FILE
from test_cli import CONFIGS, fit_args, run

from meet_lightning import __version__
from meet_lightning.commands import inference as inference_cli
from meet_lightning.data.formats import FORMATS
from meet_lightning.recipe import Recipe
from meet_lightning.training import callbacks, pipeline

RECIPE = CONFIGS / "meet_hh_prompt.yaml"


@pytest.fixture(scope="module")
def hh(shared_data) -> Path:
    return shared_data / HH_FILE


def printed_recipe(capsys, tmp_path, hh, *extra: str) -> dict:
    """The recipe ``fit --print_config`` resolves (debug overlay, ``extra`` flags after it)."""
    assert run(*fit_args(RECIPE, tmp_path / "run", hh, *extra, "--print_config")) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.fixture(scope="module")
def switched_run(tmp_path_factory, hh) -> Path:
    """A debug run whose budget is set once for both stages, stage 1's own value winning, CSV logging only."""
    out = tmp_path_factory.mktemp("switches") / "meet"
    extra = ("--trainer.max_steps", "2", "--stage1.trainer.max_steps", "1", "--devices", "1", "--logger", "csv")
    assert run(*fit_args(RECIPE, out, hh, *extra)) == 0
    return out


# ------------------------------------------------------------------- --trainer.* / --devices for both stages
def test_trainer_flags_set_both_stages_and_a_stages_own_value_wins(switched_run):
    """Failed on the old code: ``--trainer.max_steps`` was refused (did you mean --stage1.trainer.max_steps?)."""
    steps = {s: json.loads((switched_run / s / "done.json").read_text())["global_step"] for s in ("stage1", "stage2")}
    assert steps == {"stage1": 1, "stage2": 2}


def test_trainer_flags_show_in_print_config_and_the_last_given_wins(capsys, tmp_path, hh):
    recipe = printed_recipe(
        capsys, tmp_path, hh, "--stage2.trainer.max_steps", "9", "--trainer.max_steps", "5", "--stage1.trainer.max_steps", "4",
        "--trainer.precision", "bf16-mixed", "--trainer.devices", "1", "--accelerator", "cpu",
    )  # fmt: skip
    stage1, stage2 = recipe["stage1"]["trainer"], recipe["stage2"]["trainer"]
    assert (stage1["max_steps"], stage2["max_steps"]) == (4, 5)  # after the recipe: overrides its per-stage values
    assert stage1["precision"] == stage2["precision"] == "bf16-mixed"
    assert str(stage1["devices"]) == str(stage2["devices"]) == "1" and stage1["accelerator"] == stage2["accelerator"] == "cpu"
    assert "trainer" not in recipe  # written out per stage: the printed recipe is what each stage gets


def test_a_recipes_top_level_trainer_block_sets_both_stages(capsys, tmp_path, hh):
    overlay = tmp_path / "shared.yaml"
    overlay.write_text("devices: 1\ntrainer:\n  max_steps: 11\n  log_every_n_steps: 7\nstage2:\n  trainer:\n    max_steps: 22\n")
    recipe = printed_recipe(capsys, tmp_path, hh, "--config", str(overlay))
    stage1, stage2 = recipe["stage1"]["trainer"], recipe["stage2"]["trainer"]
    assert (stage1["max_steps"], stage2["max_steps"]) == (11, 22)  # the stage's own value in the same file wins
    assert stage1["log_every_n_steps"] == stage2["log_every_n_steps"] == 7 and stage1["devices"] == stage2["devices"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (("--trainer.max_step", "3"), "unknown key --trainer.max_step — did you mean --trainer.max_steps?"),
        (("--trainer.max_steps",), "--trainer.max_steps needs a value"),
    ],
)
def test_a_bad_shared_trainer_flag_is_one_line(capsys, tmp_path, hh, args, message):
    assert run(*fit_args(RECIPE, tmp_path / "run", hh, *args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and not (tmp_path / "run").exists()


def test_a_typo_in_a_recipes_trainer_block_names_the_file(capsys, tmp_path, hh):
    overlay = tmp_path / "typo.yaml"
    overlay.write_text("trainer:\n  max_stepz: 3\n")
    assert run(*fit_args(RECIPE, tmp_path / "run", hh, "--config", str(overlay))) == 2
    assert f"unknown key trainer.max_stepz in {overlay} — did you mean trainer.max_steps?" in capsys.readouterr().err


# ------------------------------------------------------------------- the command itself
def test_no_arguments_lists_the_commands_and_exits_2(capsys):
    """Failed on the old code: it exited 0."""
    assert run() == 2
    assert "commands:" in capsys.readouterr().err


def test_version_prints_the_library_version(capsys):
    """Failed on the old code: ``--version`` was an unknown command."""
    assert run("--version") == 0
    assert capsys.readouterr().out.strip() == f"meet_lightning {__version__}"


@pytest.mark.parametrize("command", ["fit", "generate", "evaluate", "push", "inspect-data"])
def test_every_help_shows_readable_types(capsys, command):
    """Failed on the old code for fit (``--stage1.select``) and generate (``--dtype``): ``<function <locals>.<lambda>``."""
    assert run(command, "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "<function" not in text and "<lambda>" not in text and "<class" not in text
    if command == "fit":
        assert "Literal['last', 'best']" in text and "--logger" in text and "--trainer.KEY VALUE" in text


def test_data_format_lists_its_choices_in_help_and_in_its_error(capsys, tmp_path, hh):
    """The help part failed on the old code (``type: str`` only)."""
    assert run("fit", "--help") == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in FORMATS) and "--data.format FORMAT format of path: one of auto," in help_text
    assert run(*fit_args(RECIPE, tmp_path / "run", hh, "--data.format", "hh_rlfh")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'hh_rlhf'" in err and all(name in err for name in FORMATS)


# ------------------------------------------------------------------- generate / evaluate / push
def test_generate_and_evaluate_take_a_config_file(switched_run, tmp_path, hh, capsys):
    """Failed on the old code: ``--config`` was an unknown flag of generate and evaluate."""
    export = switched_run / "export"
    config = tmp_path / "generate.yaml"
    config.write_text(yaml.safe_dump({"model": str(export), "prompt": "Hello", "max_new_tokens": 3, "device": "cpu"}))
    assert run("generate", "--config", str(config)) == 0
    capsys.readouterr()
    # a control, and a list of them, in the file (failed before control_names: read letter by letter)
    config.write_text(
        yaml.safe_dump({"model": str(export), "prompt": "Hello", "max_new_tokens": 3, "device": "cpu", "control": ["good"]})
    )
    assert run("generate", "--config", str(config)) == 0, capsys.readouterr().err
    config.write_text(
        yaml.safe_dump({"model": str(export), "prompt": "Hello", "max_new_tokens": 3, "device": "cpu", "control": "good"})
    )
    assert run("generate", "--config", str(config)) == 0, capsys.readouterr().err
    capsys.readouterr()
    config = tmp_path / "evaluate.yaml"
    report = tmp_path / "metrics.json"
    config.write_text(yaml.safe_dump({"model": str(export), "data": {"path": str(hh)}, "max_pairs": 4, "progress": False}))
    assert run("evaluate", "--config", str(config), "--output", str(report)) == 0  # a flag after the file adds to it
    assert json.loads(report.read_text())["pairs"] >= 1


def test_push_takes_a_config_file_and_later_flags_win(tmp_path, monkeypatch, capsys):
    """Failed on the old code: ``--config`` was an unknown flag of push."""
    calls = []
    monkeypatch.setattr(inference_cli, "push_export", lambda *args: calls.append(args) or "https://hub/commit")
    config = tmp_path / "push.yaml"
    config.write_text("model: run/export\nrepo_id: me/model\nprivate: true\n")
    assert run("push", "--config", str(config), "--revision", "dev") == 0
    assert calls == [("run/export", "me/model", True, "dev", None)]
    config.write_text("- not a mapping\n")
    assert run("push", "--config", str(config)) == 2
    assert "is a YAML mapping" in capsys.readouterr().err


class Loaded(Exception):
    """Stops a command once it has chosen its device."""


@pytest.mark.parametrize("cuda, flags, device", [(True, [], "cuda"), (False, [], "cpu"), (True, ["--device", "cpu"], "cpu")])
def test_generate_and_evaluate_default_to_the_accelerator_that_is_there(monkeypatch, cuda, flags, device):
    """Failed on the old code: the default was always cpu."""
    monkeypatch.setattr(inference_cli.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(inference_cli.torch.backends.mps, "is_available", lambda: False)
    seen = []

    def load(folder, dtype, device):
        seen.append(device)
        raise Loaded

    monkeypatch.setattr(inference_cli.AlignedModel, "from_pretrained", load)
    monkeypatch.setattr(inference_cli, "run_evaluation", lambda options: seen.append(options.device) or {})
    with pytest.raises(Loaded):
        inference_cli.generate_command(["--model", "m", "--prompt", "hi", *flags])
    assert inference_cli.evaluate_command(["--model", "m", "--data.path", "d.jsonl", *flags]) == 0
    assert seen == [device, device]


# ------------------------------------------------------------------- --logger
def test_logger_csv_alone_keeps_the_metrics_and_writes_no_tensorboard_events(switched_run):
    for stage in ("stage1", "stage2"):
        logs = switched_run / stage / "logs" / "version_0"
        assert (logs / "metrics.csv").is_file() and not list(logs.glob("events.out.tfevents.*"))


def test_every_logger_keeps_csv_first(tmp_path):
    recipe = Recipe(str(tmp_path / "run"), logger=["wandb", "tensorboard"])
    classes = [logger["class_path"].rsplit(".", 1)[1] for logger in pipeline.stage_loggers(recipe, "stage1")]
    assert classes == ["CSVLogger", "WandbLogger", "TensorBoardLogger"]
    assert Recipe("out", logger="mlflow").logger_names == ["csv", "mlflow"]
    assert Recipe("out").logger_names == ["csv", "tensorboard"]  # the default


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_tracker_whose_package_is_missing_is_one_line_naming_it(monkeypatch, capsys, tmp_path, hh, name):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda package, *a: None if package == name else real(package, *a))
    assert run(*fit_args(RECIPE, tmp_path / "run", hh, "--logger", f"[tensorboard, {name}]")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pip install {name}" in err and not (tmp_path / "run").exists()


def test_an_unknown_logger_lists_the_choices(capsys, tmp_path, hh):
    assert run(*fit_args(RECIPE, tmp_path / "run", hh, "--logger", "neptune")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "csv, tensorboard, wandb, mlflow" in err


class FakeExperiment:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


class TensorBoardLogger:  # named as Lightning's: writers are looked up by class name
    def __init__(self):
        self.experiment = FakeExperiment()


class WandbLogger(TensorBoardLogger):
    def log_text(self, **kwargs):
        self.experiment.calls.append(("log_text", (), kwargs))

    def log_image(self, **kwargs):
        self.experiment.calls.append(("log_image", (), kwargs))


class MLFlowLogger(TensorBoardLogger):
    run_id = "run-1"


class MyMLFlowLogger(MLFlowLogger):
    """A user's subclass is served by its parent's writer."""


class CSVLogger:
    pass


ROWS = [
    {"step": 3, "control": "harmless/good", "prompt": "p1", "response": "r1"},
    {"step": 3, "control": "harmless/bad", "prompt": "p1", "response": "r2"},
]


def test_sample_generations_go_to_every_logger_through_its_kinds_writer(tmp_path):
    loggers = [TensorBoardLogger(), WandbLogger(), MLFlowLogger(), MyMLFlowLogger(), CSVLogger()]
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), loggers=loggers, global_step=3)
    callbacks.SampleGenerations()._write(trainer, ROWS)
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2
    tensorboard, wandb, mlflow, mine = ([c for c in logger.experiment.calls if "text" in c[0]] for logger in loggers[:4])
    assert [(c[0], c[1][0], c[1][2]) for c in tensorboard] == [
        ("add_text", "samples/harmless/good", 3),
        ("add_text", "samples/harmless/bad", 3),
    ]
    assert wandb == [
        (
            "log_text",
            (),
            {
                "key": "samples",
                "columns": ["step", "control", "prompt", "response"],
                "data": [[3, "harmless/good", "p1", "r1"], [3, "harmless/bad", "p1", "r2"]],
                "step": 3,
            },
        )
    ]
    for calls in (mlflow, mine):
        ((name, (run_id, text, artifact), _),) = calls
        assert (name, run_id, artifact) == ("log_text", "run-1", "samples/step_0000003.md")
        assert "## harmless/good" in text and "**p1**\n\nr2" in text
    assert callbacks.sample_writer(loggers[-1]) is None


SAMPLES = """
trainer:
  callbacks:
    - class_path: meet_lightning.SampleGenerations
      init_args: {prompts: ["Hi"], max_new_tokens: 2}
"""


def tracked_run(tmp_path: Path, hh: Path, logger: str, *extra: str) -> Path:
    """A one-step-per-stage debug run logging to ``logger``, with sample generations at each final validation."""
    overlay = tmp_path / "samples.yaml"
    overlay.write_text(SAMPLES)
    out = tmp_path / "run"
    args = fit_args(RECIPE, out, hh, "--config", str(overlay), "--trainer.max_steps", "1", *extra)
    assert run(*args, "--logger", logger) == 0
    assert (out / "stage1" / "logs" / "version_0" / "metrics.csv").is_file()  # CSV kept
    return out


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is None, reason="mlflow is not installed (pip install mlflow)")
def test_mlflow_logger_offline_with_a_file_store(tmp_path, hh, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tracked_run(tmp_path, hh, "mlflow", "--stage2.model", "null")
    runs = [p.parent for p in (out / "mlruns").rglob("meta.yaml") if (p.parent / "metrics").is_dir()]
    assert len(runs) == 1
    assert (runs[0] / "metrics" / "val" / "control_accuracy").is_file()
    (samples,) = (runs[0] / "artifacts" / "samples").glob("step_*.md")
    assert "**Hi**" in samples.read_text()
    assert list((runs[0] / "artifacts" / "samples").glob("words_step_*.png"))  # the words-per-control figure


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_wandb_logger_in_offline_mode(tmp_path, hh, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tracked_run(tmp_path, hh, "[csv, wandb]")
    for stage in ("stage1", "stage2"):  # a run per stage: stage 2 does not log into stage 1's run
        runs = list((out / stage / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and list(runs[0].glob("*.wandb")), stage
        assert list(runs[0].rglob("samples_*.table.json")), stage  # the sample generations, as a W&B table
        assert list(runs[0].rglob("samples/words_*.png")), stage  # and the words-per-control figure


def test_trackers_are_an_optional_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=\[ ]", d)[0] for d in project["optional-dependencies"]["tracking"]}
    assert {"wandb", "mlflow"} <= names and not any(d.startswith(("wandb", "mlflow")) for d in project["dependencies"])


def test_the_words_figure_goes_to_every_logger_with_a_figure_writer(tmp_path):
    pytest.importorskip("matplotlib")
    loggers = [TensorBoardLogger(), WandbLogger(), MLFlowLogger(), CSVLogger()]
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), loggers=loggers, global_step=3)
    callbacks.SampleGenerations()._write(trainer, ROWS)
    figures = [[c for c in logger.experiment.calls if "text" not in c[0]] for logger in loggers[:3]]
    assert [(c[0], c[1][0], c[1][2]) for c in figures[0]] == [("add_figure", "samples/words", 3)]
    assert [(c[0], c[2]["key"], c[2]["step"]) for c in figures[1]] == [("log_image", "samples/words", 3)]
    assert [(c[0], c[1][0], c[1][2]) for c in figures[2]] == [("log_figure", "run-1", "samples/words_step_0000003.png")]
    assert (tmp_path / "samples_words.png").stat().st_size > 0
    assert callbacks.words_by_control(ROWS) == {"harmless/good": [1], "harmless/bad": [1]}
