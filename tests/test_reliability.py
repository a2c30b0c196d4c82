"""Reliability: killed runs resume bit-identically, bad input is one line, NaN stops a run, untrusted files
stay inert, DDP writes from rank zero only."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.faults import fit_with_fault

from meet_lightning.commands.cli import main
from meet_lightning.training.reliability import TEMP_SUFFIX, FaultSpec, iter_tensors

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
HELPERS = Path(__file__).resolve().parent / "helpers"

# Tiny two-stage runs with randomness everywhere: attention dropout, shuffled batches, 3 batches per epoch
# (6 rows left of 16 after dropping too-long ones, batch 2) and 7 steps per stage, so every stage crosses two
# epoch boundaries.
STEPS = 7
BATCHES_PER_EPOCH = 3
RANDOM_RUN = (
    "--model_name_or_path", "tiny-debug-dropout",
    "--data.batch_size", "2",
    "--data.max_examples", "16",
    "--stage1.trainer.max_steps", str(STEPS),
    "--stage2.trainer.max_steps", str(STEPS),
)  # fmt: skip
TIMING_KEYS = {
    "train_seconds",
    "train_tokens_per_s",
    "train_tokens_per_s_after_first_step",
    "peak_rss_gb",
    "peak_rss_over_train_step",
}  # wall time and memory differ; tokens must not


def run(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exit:
        return int(exit.code or 0)


def fit_args(out: Path, hh: Path, *extra: str, recipe: Path = CONFIGS / "meet_hh_prompt.yaml") -> list[str]:
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


def error_line(stderr: str) -> str:
    """The one ``error: …`` line of a failed command (library warnings aside); never a traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]), stderr
    return errors[0]


def subprocess_env(**extra: str) -> dict[str, str]:
    """This checkout on the path (after ``extra``'s ``PYTHONPATH``): ``tests/helpers/faults.py`` runs as a script,
    from its own folder."""
    path = os.pathsep.join(p for p in (extra.pop("PYTHONPATH", ""), str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **extra, "PYTHONPATH": path}


def start_fit(args: list[str], fault: FaultSpec | None = None, **env: str) -> subprocess.Popen:
    """``fit`` in its own process (with ``env`` added), with ``fault`` handed in by ``tests/helpers/faults.py``."""
    command = [sys.executable, "-m", "meet_lightning", *args]
    if fault is not None:
        command = [sys.executable, str(ROOT / "tests" / "helpers" / "faults.py"), fault_text(fault), *args]
    return subprocess.Popen(
        command, cwd=ROOT, env=subprocess_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def load_last(out: Path, stage: str) -> dict:
    return torch.load(out / stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, what: str) -> None:
    left, right = dict(iter_tensors(a)), dict(iter_tensors(b))
    assert left.keys() == right.keys(), what
    assert left, what
    for name in left:
        assert torch.equal(left[name], right[name]), f"{what}: {name} differs"


def assert_same_training_state(out: Path, reference: Path) -> None:
    """Weights and optimizer state of every stage's final last.ckpt are bit-identical."""
    for stage in ("stage1", "stage2"):
        ours, theirs = load_last(out, stage), load_last(reference, stage)
        assert ours["global_step"] == theirs["global_step"] == STEPS
        assert_same_tensors(ours["state_dict"], theirs["state_dict"], f"{stage} weights")
        assert_same_tensors(ours["optimizer_states"], theirs["optimizer_states"], f"{stage} optimizer state")
        assert ours["optimizer_states"][0]["param_groups"] == theirs["optimizer_states"][0]["param_groups"]
        done = {k: v for k, v in json.loads((out / stage / "done.json").read_text()).items() if k not in TIMING_KEYS}
        expected = {k: v for k, v in json.loads((reference / stage / "done.json").read_text()).items() if k not in TIMING_KEYS}
        assert done == expected, stage


@pytest.fixture(scope="module")
def hh(shared_data) -> Path:
    return shared_data / "hh_rlhf_harmless.train.jsonl.gz"


# ---------------------------------------------------------------------------------------- killed runs
def kill_plan(seed: int) -> list[FaultSpec]:
    """Five SIGKILLs drawn by ``seed``: two or three per stage, one during a checkpoint write, at least one
    resume mid-epoch in each stage and one at an epoch boundary (kill after step k → resume from step k−1)."""
    rng = random.Random(seed)
    while True:
        first = rng.choice([2, 3])
        steps = {
            "stage1": sorted(rng.sample(range(2, STEPS + 1), first)),
            "stage2": sorted(rng.sample(range(2, STEPS + 1), 5 - first)),
        }
        resumed = {stage: [(k - 1) % BATCHES_PER_EPOCH for k in ks] for stage, ks in steps.items()}
        if all(any(r != 0 for r in rs) for rs in resumed.values()) and any(r == 0 for rs in resumed.values() for r in rs):
            break
    points = [(stage, k) for stage in ("stage1", "stage2") for k in steps[stage]]
    during_write = rng.randrange(len(points))
    return [
        FaultSpec(stage, k, "ckpt_write" if i == during_write else "step_end", kill=True) for i, (stage, k) in enumerate(points)
    ]


def fault_text(spec: FaultSpec) -> str:
    return f"{spec.stage}:step={spec.step}:at={spec.at}:kill"


@pytest.mark.parametrize("seed", [20231002], ids=lambda s: f"kill-seed-{s}")
def test_killed_run_resumes_bit_identically(seed, tmp_path, hh, monkeypatch):
    plan = kill_plan(seed)
    out, reference = tmp_path / "killed", tmp_path / "reference"
    args = fit_args(out, hh, *RANDOM_RUN)
    process = start_fit(args, plan[0])
    assert run(*fit_args(reference, hh, *RANDOM_RUN)) == 0  # uninterrupted, in this process, meanwhile
    outputs = []
    for index, spec in enumerate(plan):
        code, output = finish(process)
        outputs.append(output)
        assert code == -9, (fault_text(spec), output[-3000:])
        checkpoints = out / spec.stage / "checkpoints"
        partial = sorted(checkpoints.glob(f".*{TEMP_SUFFIX}"))
        if spec.at == "ckpt_write":  # killed mid-write: a half temp file next to an intact last.ckpt
            assert partial and partial[0].stat().st_size > 0, fault_text(spec)
        assert load_last(out, spec.stage)["global_step"] == spec.step - 1, fault_text(spec)
        following = plan[index + 1] if index + 1 < len(plan) else None
        process = start_fit(args, following)
    code, output = finish(process)
    outputs.append(output)
    assert code == 0, output[-3000:]
    for spec, resumed in zip(plan, outputs[1:], strict=True):
        assert f"{spec.stage}: restoring from " in resumed and f"at step {spec.step - 1}\n" in resumed, (
            fault_text(spec),
            resumed[-2000:],
        )
    assert not list(out.rglob(f"*{TEMP_SUFFIX}")), "a stale temp file survived the resume"
    assert_same_training_state(out, reference)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, hh) -> Path:
    """One debug run of the main recipe (in process), shared read-only by the tests that damage copies of it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run(*fit_args(out, hh)) == 0
    return out


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


RESULT_FILES = {"done.json", "controls.safetensors", "predictions.jsonl", "recipe.yaml", "model.safetensors"}


def test_bad_input_corpus_covers_every_kind():
    from bad_inputs import BAD_INPUTS

    kinds = {case.kind for case in BAD_INPUTS}
    assert len(BAD_INPUTS) >= 30 and len({case.id for case in BAD_INPUTS}) == len(BAD_INPUTS)
    assert {"flag", "recipe", "checkpoint", "controls", "export", "predict", "output", "data"} <= kinds
    assert sum(case.kind != "data" for case in BAD_INPUTS) >= 25


def _bad_inputs():
    from bad_inputs import BAD_INPUTS

    return BAD_INPUTS


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda case: f"{case.kind}-{case.id}")
def test_bad_input_gives_one_line_and_exit_2(case, tmp_path, hh, finished_run, capsys, monkeypatch):
    from bad_inputs import Context

    argv = case.build(Context(tmp_path, hh, finished_run))
    capsys.readouterr()
    before = snapshot(tmp_path)
    code = run(*argv)
    err = error_line(capsys.readouterr().err)
    assert code == 2, (case.id, err)
    for fragment in case.fragments:
        assert fragment in err, (case.id, fragment, err)
    # nothing half-written: no temp files, no new result files, no result file changed
    after = snapshot(tmp_path)
    assert not [p for p in after if p.endswith((TEMP_SUFFIX, ".tmp"))], (case.id, after)
    new_or_changed = [p for p in after if before.get(p) != after[p] and "/logs/" not in p and not p.endswith("config.yaml")]
    assert not [p for p in new_or_changed if Path(p).name in RESULT_FILES or p.endswith(".ckpt")], (case.id, new_or_changed)
    assert not (tmp_path / "UNPICKLED").exists(), "a pickle was unpickled"


# ------------------------------------------------------------------------------------------ numerical faults
def test_nan_gradient_stops_with_exit_3_naming_stage_and_step(tmp_path, hh, monkeypatch, capsys):
    out = tmp_path / "run"
    assert fit_with_fault("stage1:step=2:at=nan_grad", *fit_args(out, hh)) == 3
    err = error_line(capsys.readouterr().err)
    assert err.startswith("error: stage1: NaN/inf gradient at step 2 in control.bank"), err
    assert "--stage1.model.lr" in err and "last checkpoint is intact" in err
    last = load_last(out, "stage1")
    assert last["global_step"] == 1
    tensors = [t for _, t in iter_tensors({"w": last["state_dict"], "o": last["optimizer_states"]}) if t.is_floating_point()]
    assert tensors and all(bool(t.isfinite().all()) for t in tensors)
    assert not (out / "stage1" / "done.json").exists() and not (out / "stage1" / "controls.safetensors").exists()
    assert run(*fit_args(out, hh)) == 0  # the finite checkpoint resumes
    assert "stage1: restoring from" in capsys.readouterr().out


def test_a_checkpoint_with_nan_is_never_written(tmp_path):
    from meet_lightning.errors import NumericalError
    from meet_lightning.training.reliability import AtomicCheckpointIO

    io = AtomicCheckpointIO("stage2", folder=tmp_path)
    good = {
        "global_step": 4,
        "state_dict": {"w": torch.ones(3)},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}],
    }
    io.save_checkpoint(good, tmp_path / "last.ckpt")
    bad = {**good, "global_step": 5, "optimizer_states": [{"state": {0: {"exp_avg": torch.tensor([0.0, float("inf"), 0.0])}}}]}
    with pytest.raises(NumericalError, match=r"stage2: NaN/inf in optimizer_states\.0\.state\.0\.exp_avg at step 5"):
        io.save_checkpoint(bad, tmp_path / "last.ckpt")
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_same_seed_twice_gives_identical_metrics_and_weights(tmp_path, hh, monkeypatch):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert run(*fit_args(out, hh, "--model_name_or_path", "tiny-debug-dropout")) == 0
    for stage in ("stage1", "stage2"):
        metrics = [json.loads((out / stage / "done.json").read_text()) for out in runs]
        assert [{k: v for k, v in m.items() if k not in TIMING_KEYS} for m in metrics][0] == {
            k: v for k, v in metrics[1].items() if k not in TIMING_KEYS
        }
        assert "val/loss" in metrics[0]
        assert_same_tensors(load_last(runs[0], stage)["state_dict"], load_last(runs[1], stage)["state_dict"], stage)


def test_fault_spec_grammar():
    assert FaultSpec.parse("stage2:step=2") == FaultSpec("stage2", 2, "step_end", False)
    assert FaultSpec.parse("stage1:step=3:at=ckpt_write:kill") == FaultSpec("stage1", 3, "ckpt_write", True)
    from meet_lightning.errors import ConfigError

    for bad in ("stage3:step=1", "stage1:step=x", "stage1:step=1:at=somewhere", "stage1:step=1:boom", "stage1"):
        with pytest.raises(ConfigError, match="STAGE:step=K"):
            FaultSpec.parse(bad)


# ------------------------------------------------------------------------------------------ untrusted files
PACKAGE = ROOT / "meet_lightning"


def test_every_torch_load_is_weights_only_and_remote_code_is_opt_in():
    sources = {path: path.read_text() for path in PACKAGE.rglob("*.py")}
    calls = [(path, m.start()) for path, text in sources.items() for m in re.finditer(r"torch\.load\(", text)]
    assert calls
    for path, start in calls:
        text = sources[path]
        depth, end = 0, start
        for end in range(start + len("torch.load"), len(text)):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            if depth == 0:
                break
        assert "weights_only=True" in text[start:end], f"{path.name}: {text[start:end]}"
    for path, text in sources.items():
        assert "trust_remote_code=True" not in text, path.name
        assert not re.search(r"trust_remote_code: bool = True", text), path.name
        assert "pickle.load" not in text and "weights_only=False)" not in text.replace(
            "save_checkpoint(last, weights_only=False)", ""
        ), path.name


def test_a_pickle_in_an_export_folder_is_never_loaded(finished_run, tmp_path, hh, capsys):
    from bad_inputs import pickle_bomb

    from meet_lightning.inference.export import AlignedModel

    export = tmp_path / "export"
    shutil.copytree(finished_run / "export", export)
    marker = tmp_path / "UNPICKLED"
    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "controls.pt"):
        pickle_bomb(export / name, marker)
    model = AlignedModel.from_pretrained(export)
    assert model.generate(["Hi"], control="good", max_new_tokens=2)
    assert run("generate", "--model", str(export), "--control", "good", "--prompt", "Hi", "--max_new_tokens", "2") == 0
    args = ["evaluate", "--model", str(export), "--data.path", str(hh), "--data.preference", "harmless", "--max_pairs", "2"]
    assert run(*args) == 0
    (export / "model.safetensors").unlink()  # only the pickle left: refused, not loaded
    with pytest.raises(Exception, match="no model.safetensors"):
        AlignedModel.from_pretrained(export)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["absolute", "relative"])
def test_a_schema_path_outside_the_export_folder_is_not_opened(finished_run, tmp_path, capsys, monkeypatch, where):
    from meet_lightning import models

    export, outside = tmp_path / "export", tmp_path / "outside_model"
    shutil.copytree(finished_run / "export", export)
    shutil.copytree(finished_run / "export", outside)  # a loadable model: only the guard stops it
    name = str(outside) if where == "absolute" else "../outside_model"
    monkeypatch.chdir(export)
    schema = json.loads((export / "meet_schema.json").read_text())
    (export / "meet_schema.json").write_text(json.dumps({**schema, "base_model": name, "reference_model": "../../etc/passwd"}))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    opened = []
    original = models.load_model
    monkeypatch.setattr(models, "load_model", lambda path, *a, **k: opened.append(str(path)) or original(path, *a, **k))
    code = run("evaluate", "--model", str(export), "--fidelity_prompts", str(prompts), "--max_new_tokens", "2")
    err = error_line(capsys.readouterr().err)
    assert code == 2 and f"names base_model {name!r}, a path outside the export folder: not opened" in err
    assert "pass --base_model" in err and not any("outside_model" in p for p in opened)


# ------------------------------------------------------------------------------------------ several processes
DDP_STEPS = 3


def ddp_overlay(folder: Path, probes: Path) -> Path:
    trainer = {"strategy": "ddp", "devices": 2, "accelerator": "cpu"}
    stages = {
        stage: {
            "trainer": {
                **trainer,
                "callbacks": [{"class_path": "ddp_probe.RankProbe", "init_args": {"folder": str(probes), "stage": stage}}],
            }
        }
        for stage in ("stage1", "stage2")
    }
    path = folder / "ddp.yaml"
    path.write_text(json.dumps(stages))  # JSON is YAML
    return path


def test_ddp_on_two_processes_writes_from_rank_zero_and_resumes_on_one(tmp_path, hh, monkeypatch, capsys):
    out, probes, audit = tmp_path / "ddp", tmp_path / "probes", tmp_path / "audit"
    args = fit_args(out, hh, "--config", str(ddp_overlay(tmp_path, probes)), "--data.eval_batch_size", "1")
    env = {"PYTHONPATH": str(HELPERS), "MEET_AUDIT_ROOT": str(out), "MEET_AUDIT_LOG": str(audit)}
    code, output = finish(start_fit(args, **env), timeout=300)
    assert code == 0, output[-4000:]
    for stage in ("stage1", "stage2"):
        ranks = [json.loads((probes / f"{stage}-rank{r}.json").read_text()) for r in (0, 1)]
        assert [(i["world_size"], i["rank"], i["process_group"], i["strategy"]) for i in ranks] == [
            (2, 0, 2, "DDPStrategy"),
            (2, 1, 2, "DDPStrategy"),
        ]
        controls = [torch.load(probes / f"{stage}-rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert controls[0]["global_step"] == controls[1]["global_step"] == DDP_STEPS
        assert_same_tensors(controls[0]["controls"], controls[1]["controls"], f"{stage} controls across ranks")
        assert json.loads((out / stage / "done.json").read_text())["global_step"] == DDP_STEPS
    assert (out / "stage1" / "controls.safetensors").is_file() and (out / "export" / "model.safetensors").is_file()
    rank0 = (tmp_path / "audit.rank0").read_text()
    for written in ("recipe.yaml", "stage1/controls.safetensors", "stage1/done.json", "stage2/done.json", "last.ckpt", "/export"):
        assert written in rank0, written
    rank1 = tmp_path / "audit.rank1"
    assert not rank1.exists(), f"rank 1 wrote: {rank1.read_text()[:2000]}"
    assert output.count("stage1: done") == 1  # rank 1 logs nothing either

    # the DDP checkpoint resumes in one process (here, in this one): sampler position mapped from 2 ranks to 1
    single = fit_args(
        tmp_path / "single", hh, "--ckpt_path", str(out / "stage1" / "checkpoints" / "last.ckpt"),
        "--stage1.trainer.max_steps", str(DDP_STEPS + 2), "--stage2.model", "null",
    )  # fmt: skip
    assert run(*single) == 0
    printed = capsys.readouterr().out
    assert f"stage1: restoring from {out / 'stage1' / 'checkpoints' / 'last.ckpt'} at step {DDP_STEPS}" in printed
    assert json.loads((tmp_path / "single" / "stage1" / "done.json").read_text())["global_step"] == DDP_STEPS + 2


@pytest.mark.parametrize("overlay", sorted((CONFIGS / "strategies").glob("*.yaml")), ids=lambda p: p.stem)
def test_gpu_strategy_overlays_parse(overlay, tmp_path, capsys):
    args = ["fit", "--config", str(CONFIGS / "meet_hh_prompt.yaml"), "--config", str(overlay), "--output_dir", str(tmp_path)]
    assert run(*args, "--print_config") == 0
    printed = capsys.readouterr().out
    strategy = {"fsdp": "FSDPStrategy", "deepspeed": "DeepSpeedStrategy"}[overlay.stem]
    assert f"class_path: lightning.pytorch.strategies.{strategy}" in printed and "precision: auto" in printed
    assert not any(tmp_path.iterdir())  # printing writes nothing


def test_paths_and_classes_inside_a_checkpoint_are_never_used(finished_run, tmp_path, hh, monkeypatch):
    from meet_lightning.controls import files as controls_io

    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    last = out / "stage2" / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    state["hyper_parameters"].update({"init_controls": "../../etc/passwd", "model_name_or_path": "/etc"})
    state["meet"]["module"] = "os.system"
    torch.save(state, last)
    read = []
    original = controls_io.read_controls_metadata
    monkeypatch.setattr(controls_io, "read_controls_metadata", lambda path: read.append(str(path)) or original(path))
    assert run("validate", *fit_args(out, hh, "--stage", "stage2")[1:]) == 0  # module and paths come from the recipe
    assert run("predict", *fit_args(out, hh, "--stage", "stage2", "--data.predict_path", str(_prompts(tmp_path)))[1:]) == 0
    assert not any("passwd" in p for p in read)


def _prompts(folder: Path) -> Path:
    path = folder / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "controls": "good"}) + "\n")
    return path
