"""The two-stage orchestrator: stage 1 fit → ``controls.safetensors`` → stage 2 fit → export.

Each stage is an ordinary ``LightningCLI(args=stage_dict, run=False)`` built from the recipe, so Lightning saves
each stage's own hyperparameters in its own checkpoints. A stage with its done-marker is skipped; an
unfinished one resumes from its ``last.ckpt``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from meet_lightning.callbacks import ThroughputMeter
from meet_lightning.controls_io import save_controls
from meet_lightning.data import PreferenceDataModule
from meet_lightning.errors import CheckpointError, ConfigError
from meet_lightning.modules.base import MeetModule

STAGES = ("stage1", "stage2")
BUDGET_KEYS = {"max_steps", "max_epochs"}
DONE = "done.json"


class StageCLI(LightningCLI):
    """One stage's LightningCLI: links the data's control schema into the module."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.control_schema", "model.init_args.control_schema", apply_on="instantiate")


class InjectedFault(RuntimeError):
    """Raised by :class:`FaultInjection` to stop a run at a chosen point (tests of resuming)."""


class FaultInjection(Callback):
    """Stops training at a named point when ``MEET_FAULT`` asks for it, e.g. ``MEET_FAULT=stage2:step=2``.

    Deterministic, for testing that a re-run resumes: after the given optimizer step of the given stage
    (its checkpoints of earlier steps already on disk) the run raises :class:`InjectedFault`.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        spec = dict(part.split("=", 1) for part in os.environ.get("MEET_FAULT", "").split(":")[1:] if "=" in part)
        self.step = int(spec["step"]) if os.environ.get("MEET_FAULT", "").split(":")[0] == stage and "step" in spec else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.step is not None and trainer.global_step == self.step:
            raise InjectedFault(f"MEET_FAULT: stopping {self.stage} after step {self.step}")


def active_stages(recipe: Mapping[str, Any]) -> list[str]:
    """Stages whose ``model`` is set (``stage2.model: null`` makes a single-stage recipe)."""
    return [s for s in STAGES if (recipe.get(s) or {}).get("model")]


def stage_args(recipe: Mapping[str, Any], stage: str, extra_model_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The plain LightningCLI config of one stage, with the shared keys linked in."""
    out = Path(recipe["output_dir"]) / stage
    spec = recipe[stage]
    model = copy.deepcopy(spec["model"])
    model.setdefault("init_args", {})
    model["init_args"].update(
        {"model_name_or_path": recipe["model_name_or_path"], "control": recipe.get("control"), **(extra_model_args or {})}
    )
    trainer = {
        "default_root_dir": str(out),
        "use_distributed_sampler": False,  # our batch sampler is rank-aware and resumable
        "logger": [
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(out), "name": "logs"}},
            {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(out), "name": "logs"}},
        ],
        **copy.deepcopy(spec.get("trainer") or {}),
    }
    data = {**copy.deepcopy(recipe["data"]), "model_name_or_path": recipe["model_name_or_path"]}
    return {"seed_everything": recipe["seed_everything"], "trainer": trainer, "model": model, "data": data}


def build_stage(recipe: Mapping[str, Any], stage: str, extra_model_args: Mapping[str, Any] | None = None) -> StageCLI:
    """Builds (seeds, then instantiates) one stage's trainer, module and data module."""
    out = Path(recipe["output_dir"]) / stage
    spec = recipe[stage] or {}
    select_best = spec.get("select", "last") == "best"
    checkpoint = ModelCheckpoint(
        dirpath=out / "checkpoints",
        save_last=True,
        save_top_k=1 if select_best else 0,
        monitor="val/control_accuracy" if select_best else None,
        mode="max",
        filename="best",
        every_n_train_steps=spec.get("checkpoint_every_n_steps", 100),
    )
    argv, sys.argv = sys.argv, sys.argv[:1]  # the stage's arguments come from `args`, not the command line
    try:
        return StageCLI(
            MeetModule,
            PreferenceDataModule,
            subclass_mode_model=True,
            args=stage_args(recipe, stage, extra_model_args),
            run=False,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": [checkpoint, FaultInjection(stage), ThroughputMeter()]},
            parser_kwargs={"exit_on_error": False},
        )
    finally:
        sys.argv = argv


def check_output_dir(recipe: Mapping[str, Any], overwrite: bool) -> None:
    """Refuses an ``output_dir`` holding another recipe (budget keys may change); ``--overwrite`` clears it."""
    out = Path(recipe["output_dir"])
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} is a file — pass a folder path")
    saved = out / "recipe.yaml"
    if saved.is_file():
        difference = recipe_difference(yaml.safe_load(saved.read_text()), recipe)
        if difference and not overwrite:
            raise ConfigError(
                f"{out} holds a run of another recipe ({difference}) — pass --overwrite true to start over, or another --output_dir"
            )
        if difference:
            for name in (*STAGES, "export", "recipe.yaml"):
                target = out / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(yaml.safe_dump(dict(recipe), sort_keys=False))


def recipe_difference(old: Any, new: Any, prefix: str = "") -> str:
    """First difference between two recipes outside budget keys, as ``key: old → new`` (empty if none)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new), key=str):
            if key in BUDGET_KEYS:
                continue
            found = recipe_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return ""
    return "" if old == new else f"{prefix.rstrip('.')}: {old!r} → {new!r}"


def fit(recipe: Mapping[str, Any], overwrite: bool = False, ckpt_path: str | None = None, log=print) -> dict[str, Any]:
    """Runs every unfinished stage, then exports; returns ``{stage: final validation metrics}``."""
    check_output_dir(recipe, overwrite)
    out = Path(recipe["output_dir"])
    results: dict[str, Any] = {}
    stages = active_stages(recipe)
    for stage in stages:
        done = out / stage / DONE
        if done.is_file():
            log(f"{stage}: finished earlier ({done}), skipping")
            results[stage] = json.loads(done.read_text())
            continue
        results[stage] = run_stage(recipe, stage, ckpt_path, log)
        ckpt_path = None  # --ckpt_path applies to the first unfinished stage only
    from meet_lightning.export import export_run

    export_run(recipe, results, log=log)
    return results


def run_stage(recipe: Mapping[str, Any], stage: str, ckpt_path: str | None, log) -> dict[str, float]:
    """Fits one stage (resuming from ``ckpt_path`` or its ``last.ckpt``), writes its files and done-marker."""
    out = Path(recipe["output_dir"]) / stage
    extra = (
        {"init_controls": str(Path(recipe["output_dir"]) / "stage1" / "controls.safetensors")}
        if stage == "stage2" and "stage1" in active_stages(recipe)
        else None
    )
    cli = build_stage(recipe, stage, extra)
    last = out / "checkpoints" / "last.ckpt"
    resume = ckpt_path or (str(last) if last.is_file() else None)
    if resume:
        check_checkpoint_file(Path(resume))
        log(
            f"{stage}: restoring from {resume} at step {torch.load(resume, map_location='cpu', weights_only=True).get('global_step', 0)}"
        )
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=resume, weights_only=True)
    cli.trainer.save_checkpoint(last, weights_only=False)
    if stage == "stage1":
        write_stage1_controls(cli, recipe, out)
    metrics = {k: float(v) for k, v in (cli.trainer.validate(cli.model, cli.datamodule, verbose=False) or [{}])[0].items()}
    metrics["global_step"] = cli.trainer.global_step
    metrics.update(next(c for c in cli.trainer.callbacks if isinstance(c, ThroughputMeter)).summary())
    if cli.trainer.is_global_zero:
        (out / DONE).write_text(json.dumps(metrics, indent=2))
    cli.trainer.strategy.barrier()
    log(f"{stage}: done — " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics


def write_stage1_controls(cli: StageCLI, recipe: Mapping[str, Any], out: Path) -> None:
    """``stage1/controls.safetensors`` from the final weights, or the best checkpoint with ``select: best``."""
    module: MeetModule = cli.model
    best = cli.trainer.checkpoint_callback.best_model_path if (recipe["stage1"] or {}).get("select") == "best" else ""
    if best:
        state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict({**module.state_dict(), **state})
    if cli.trainer.is_global_zero:
        save_controls(module.control, out / "controls.safetensors", module.schema, module.base_fingerprint)
    cli.trainer.strategy.barrier()


def check_checkpoint_file(path: Path) -> None:
    """CheckpointError for a missing or unreadable checkpoint (instead of a pickle traceback)."""
    if not path.is_file():
        raise CheckpointError(f"--ckpt_path {path}: file not found — pass a .ckpt written by this run")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(error).__name__}) — delete it to restart the stage, or pass another --ckpt_path"
        ) from None


def stage_checkpoint(recipe: Mapping[str, Any], stage: str | None) -> tuple[str, Path]:
    """The stage (default: the last active one) and its ``last.ckpt`` for validate/test/predict."""
    stages = active_stages(recipe)
    stage = stage or stages[-1]
    if stage not in stages:
        raise ConfigError(f"--stage {stage} is not in this recipe (stages: {', '.join(stages)}) — pass one of them")
    last = Path(recipe["output_dir"]) / stage / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise CheckpointError(f"{last}: not found — run `fit` with this recipe first")
    return stage, last


def restore_module(module: MeetModule, checkpoint: Path) -> MeetModule:
    """Builds ``module``'s LM and loads a stage checkpoint into it (weights only, checked against the run)."""
    check_checkpoint_file(checkpoint)
    module.configure_model()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"])
    return module.eval()


def evaluate_stage(recipe: Mapping[str, Any], command: str, stage: str | None, log=print) -> Any:
    """``validate`` / ``test`` / ``predict`` with one stage's ``last.ckpt``."""
    stage, last = stage_checkpoint(recipe, stage)
    cli = build_stage(recipe, stage)
    check_checkpoint_file(last)
    if command == "predict":
        from meet_lightning.generation import predict_to_file

        return predict_to_file(cli, last, Path(recipe["output_dir"]) / stage / "predictions.jsonl", log=log)
    run = getattr(cli.trainer, command)
    return run(cli.model, cli.datamodule, ckpt_path=str(last), weights_only=True)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
