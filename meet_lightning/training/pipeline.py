"""The two-stage orchestrator: stage 1 fit → ``controls.safetensors`` → stage 2 fit → export.

Each stage is an ordinary ``LightningCLI(args=stage_dict, run=False)`` built from the recipe, so Lightning saves
each stage's own hyperparameters in its own checkpoints. A stage with its done-marker is skipped; an
unfinished one resumes from its ``last.ckpt`` — bit-identically, even after ``SIGKILL``: the checkpoints are
written atomically and carry the RNG states and the sampler position (see :mod:`meet_lightning.training.reliability`).
Under DDP only global rank zero writes the stage files (``recipe.yaml``, ``controls.safetensors``,
``done.json``, ``export/``); the stages are separated by barriers.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from meet_lightning._moved import current_name
from meet_lightning.atomic import write_text_atomic
from meet_lightning.controls.files import read_controls_metadata, save_controls
from meet_lightning.controls.tokens import build_control
from meet_lightning.data.cache import data_identity
from meet_lightning.data.datamodule import PreferenceDataModule
from meet_lightning.data.formats import SourceConfig
from meet_lightning.errors import CheckpointError, ConfigError, DataError, MeetError
from meet_lightning.inference.export import SCHEMA_FILE, export_model
from meet_lightning.inference.generation import (
    DecodingOptions,
    generate_responses,
    read_prompt_file,
    row_controls,
    write_jsonl_atomic,
)
from meet_lightning.models import resolve_model_path
from meet_lightning.modules.base import MeetModule
from meet_lightning.precision import Resolved, resolve_precision
from meet_lightning.recipe import STAGES, Recipe
from meet_lightning.rss import PeakRSSByPhase
from meet_lightning.training.callbacks import MemoryPhases, ThroughputMeter
from meet_lightning.training.distributed import is_sharded
from meet_lightning.training.reliability import AtomicCheckpointIO, GradientCheck, RNGState

BUDGET_KEYS = {"max_steps", "max_epochs"}
HARDWARE_KEYS = {"devices", "num_nodes", "accelerator", "strategy"}
"""Trainer keys a resumed run may change besides the budget: the same run on other hardware (2 GPUs → 1)."""
NEUTRAL_KEYS = {
    "num_workers",
    "num_proc",
    "cache_dir",
    "enable_progress_bar",
    "enable_model_summary",
    "log_every_n_steps",
    "logger",
    "checkpoint_every_n_steps",
}
"""Keys that cannot change what a run computes (loader and tokenizer workers, where the cache lives, logging,
progress, how often ``last.ckpt`` is written): a resumed run may change them. Which rows it trains on is
checked by the data identity in its checkpoints and done-markers instead."""
DONE = "done.json"
BEST = "best"
"""File stem of the checkpoint ``select: best`` keeps."""


class StageCLI(LightningCLI):
    """One stage's LightningCLI: links the data's control schema into the module, adds the checkpoint IO.

    Args:
        checkpoint_io: Added to the trainer's ``plugins`` unless the recipe sets a CheckpointIO of its own.
    """

    def __init__(self, *args: Any, checkpoint_io: CheckpointIO | None = None, **kwargs: Any) -> None:
        self.checkpoint_io = checkpoint_io
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.control_schema", "model.init_args.control_schema", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs: Any):
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        if self.checkpoint_io is not None and not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(self.checkpoint_io)
        return super().instantiate_trainer(plugins=plugins or None, **kwargs)


def is_global_zero() -> bool:
    """Whether this process is global rank zero (the only one that writes stage files).

    Lightning's DDP launcher starts the other ranks with ``LOCAL_RANK``/``RANK`` set, so this holds before any
    process group exists.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return rank_zero_only.rank == 0


def rank_zero_log(message: str) -> None:
    """``print`` on global rank zero only (every rank runs the pipeline)."""
    if is_global_zero():
        print(message, flush=True)


def next_log_version(logs: Path) -> int:
    """The first free ``version_N`` under ``logs`` (a resumed stage logs to a new one, as Lightning does)."""
    numbers = [p.name.removeprefix("version_") for p in logs.glob("version_*")]
    return max((int(n) for n in numbers if n.isdigit()), default=-1) + 1


def stage_precision(recipe: Recipe, stage: str) -> Resolved:
    """The stage's trainer precision with ``auto`` resolved from the hardware it runs on, and why."""
    trainer = recipe.stage(stage).trainer
    return resolve_precision(trainer.get("precision"), trainer.get("accelerator"))


LOGGERS: dict[str, tuple[str, str | None]] = {
    "csv": ("lightning.pytorch.loggers.CSVLogger", None),
    "tensorboard": ("lightning.pytorch.loggers.TensorBoardLogger", "tensorboard"),
    "wandb": ("lightning.pytorch.loggers.WandbLogger", "wandb"),
    "mlflow": ("lightning.pytorch.loggers.MLFlowLogger", "mlflow"),
}
"""``--logger`` name → (Lightning logger class, the package it needs). Lightning imports wandb and mlflow only
when their logger is built, so an unchosen tracker is never imported."""


def check_loggers(recipe: Recipe) -> None:
    """ConfigError for an unknown ``--logger`` name, or one whose package is not installed (before anything runs)."""
    for name in recipe.logger_names:
        if name not in LOGGERS:
            raise ConfigError(f"--logger {name!r} is not one of {', '.join(LOGGERS)} — pass one of them (or a list)")
        package = LOGGERS[name][1]
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"--logger {name} needs the {package} package, which is not installed — pip install {package}"
                " (or pip install 'meet_lightning[tracking]'), or drop it from --logger"
            )


def stage_loggers(recipe: Recipe, stage: str) -> list[dict[str, Any]]:
    """The Lightning loggers of one stage, as ``class_path``/``init_args`` dicts, for the recipe's ``logger``.

    CSV and TensorBoard write ``stageN/logs/version_N``; W&B runs are named ``<output folder>-<stage>`` in project
    ``$WANDB_PROJECT`` (default ``meet_lightning``; ``WANDB_MODE=offline`` works as usual); MLflow logs to
    ``$MLFLOW_TRACKING_URI`` (a server, ``sqlite:///mlflow.db`` …), else to the file store ``output_dir/mlruns``
    (``mlflow ui --backend-store-uri output_dir/mlruns`` shows it), experiment ``$MLFLOW_EXPERIMENT_NAME`` (default
    ``meet_lightning``).
    """
    out = recipe.out / stage
    run_name = f"{recipe.out.resolve().name}-{stage}"
    # one version for CSV and TensorBoard: left to pick their own, the second counts the first's new folder
    logs = {"save_dir": str(out), "name": "logs", "version": next_log_version(out / "logs")}
    init_args = {
        "csv": logs,
        "tensorboard": logs,
        "wandb": {"save_dir": str(out), "name": run_name, "project": os.environ.get("WANDB_PROJECT", "meet_lightning")},
        "mlflow": {
            "experiment_name": os.environ.get("MLFLOW_EXPERIMENT_NAME", "meet_lightning"),
            "run_name": run_name,
            "save_dir": str(recipe.out / "mlruns"),  # used when MLFLOW_TRACKING_URI is not set
        },
    }
    names = recipe.logger_names
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        # MLflow 3 refuses its file store unless asked; the run's own folder is the offline default chosen here
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return [{"class_path": LOGGERS[name][0], "init_args": dict(init_args[name])} for name in names]


def finish_tracker_runs(trainer: Any) -> None:
    """Ends the W&B run a stage opened: W&B keeps one run per process, and stage 2's logger would otherwise log
    into stage 1's run (MLflow, TensorBoard and CSV keep one run per logger already)."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger" and getattr(logger, "_experiment", None) is not None:
            logger.experiment.finish()


def stage_args(
    recipe: Recipe,
    stage: str,
    extra_model_args: Mapping[str, Any] | None = None,
    extra_data_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The plain LightningCLI config of one stage, with the shared keys linked in."""
    out = recipe.out / stage
    spec = recipe.stage(stage)
    model = copy.deepcopy(spec.model)
    model.setdefault("init_args", {})
    model["init_args"].update(
        {"model_name_or_path": recipe.model_name_or_path, "control": recipe.control, **(extra_model_args or {})}
    )
    trainer = {
        "default_root_dir": str(out),
        "logger": stage_loggers(recipe, stage),  # a stage's own trainer.logger replaces them
        **copy.deepcopy(spec.trainer),
        "precision": stage_precision(recipe, stage).precision,
        # after the recipe's trainer, which holds Lightning's default True: a DistributedSampler would replace
        # our batch sampler, which is rank-aware and resumable (the position of a killed run)
        "use_distributed_sampler": False,
    }
    data = {**copy.deepcopy(recipe.data), "model_name_or_path": recipe.model_name_or_path, **(extra_data_args or {})}
    return {"seed_everything": recipe.seed_everything, "trainer": trainer, "model": model, "data": data}


def build_stage(
    recipe: Recipe,
    stage: str,
    extra_model_args: Mapping[str, Any] | None = None,
    extra_data_args: Mapping[str, Any] | None = None,
    callbacks: Sequence[Callback] = (),
) -> StageCLI:
    """Builds (seeds, then instantiates) one stage's trainer, module and data module.

    The trainer gets the callbacks and checkpoint IO that make a resume bit-identical and a bad step stop
    cleanly (atomic checkpoints, RNG states, gradient check), with the caller's ``callbacks`` (e.g. the tests'
    :class:`~meet_lightning.training.reliability.FaultInjection`) before the gradient check.
    """
    out = recipe.out / stage
    spec = recipe.stage(stage)
    check_stage_settings(recipe, stage)
    last = ModelCheckpoint(
        dirpath=out / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=spec.checkpoint_every_n_steps
    )
    # the caller's before GradientCheck: a NaN gradient a callback injects must meet the check in the same step
    callbacks = [last, *callbacks, GradientCheck(stage), RNGState(), ThroughputMeter()]
    if selects_best(recipe, stage):
        callbacks.append(best_checkpoint(out / "checkpoints"))
    io = AtomicCheckpointIO(stage, folder=out / "checkpoints" if is_global_zero() else None)
    argv, sys.argv = sys.argv, sys.argv[:1]  # the stage's arguments come from `args`, not the command line
    try:
        return StageCLI(
            MeetModule,
            PreferenceDataModule,
            subclass_mode_model=True,
            args=stage_args(recipe, stage, extra_model_args, extra_data_args),
            run=False,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": callbacks},
            parser_kwargs={"exit_on_error": False},
            checkpoint_io=io,
        )
    except ValueError as error:  # jsonargparse wraps what a constructor raised: surface our own user error
        cause = _meet_error_in(error)
        if cause is None:
            raise
        raise type(cause)(module_message(stage, cause)) from None
    except MisconfigurationException as error:  # the Trainer's own argument checks
        raise ConfigError(trainer_message(stage, str(error))) from None
    finally:
        sys.argv = argv


def selects_best(recipe: Recipe, stage: str) -> bool:
    """Whether the stage's ``select`` is ``best`` (by ``val/control_accuracy``) rather than ``last``."""
    return recipe.stage(stage).select == "best"


def best_checkpoint(folder: Path) -> ModelCheckpoint:
    """Keeps ``best.ckpt``: the weights whose own validation scored the highest ``val/control_accuracy``.

    It saves when a validation ends, never on a training step: a step-triggered save with a monitor ranks the
    weights of step k by the validation of an earlier step (it runs before step k's validation). One file name,
    overwritten, so ``validate``/``export`` in a later process find it.
    """
    return ModelCheckpoint(
        dirpath=folder,
        filename=BEST,
        monitor="val/control_accuracy",
        mode="max",
        save_top_k=1,
        every_n_epochs=1,
        save_on_train_epoch_end=False,
        enable_version_counter=False,
    )


def selected_checkpoint(recipe: Recipe, stage: str) -> Path:
    """The checkpoint ``select`` picks: ``best.ckpt`` with ``select: best``, else ``last.ckpt``.

    One rule for everything after training: this is what is validated (``done.json``), written as stage 1's
    controls (and so handed to stage 2), exported, and read by ``validate``/``test``/``predict``.
    """
    folder = recipe.out / stage / "checkpoints"
    if not selects_best(recipe, stage):
        return folder / "last.ckpt"
    if not (folder / f"{BEST}.ckpt").exists():
        raise CheckpointError(
            f"--{stage}.select best: no validation ran, so there is no {folder / BEST}.ckpt — set"
            f" --{stage}.trainer.val_check_interval (or use --{stage}.select last)"
        )
    return folder / f"{BEST}.ckpt"


def _meet_error_in(error: BaseException) -> MeetError | None:
    """The MeetError a wrapped exception was caused by, if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, MeetError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def module_message(stage: str, error: Exception) -> str:
    """A module's argument complaint with the stage and the flag as the user types it (``--stage1.model.lr``)."""
    parts = []
    for part in str(error).split("; "):
        part = part.replace("model.init_args.", f"--{stage}.model.")
        name = part.split(" ", 1)[0]
        if " — " not in part and name.isidentifier():
            part += f" — set --{stage}.model.{name}"
        parts.append(part)
    return f"{stage}: " + "; ".join(parts)


def check_modules(recipe: Recipe) -> None:
    """Builds every stage's module class once (no model loaded) so that its argument checks run before stage 1
    trains: a bad stage-2 setting must not surface only after hours of stage 1. Only meet_lightning's own
    classes are built here; a user's subclass is checked when its stage starts."""
    import importlib

    for stage in recipe.active_stages:
        spec = recipe.stage(stage).model
        module_name, _, class_name = str(spec.get("class_path", "")).rpartition(".")
        if not module_name.startswith("meet_lightning"):
            continue
        cls = getattr(importlib.import_module(module_name), class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, MeetModule)):
            continue
        arguments = {**(spec.get("init_args") or {}), "model_name_or_path": recipe.model_name_or_path}
        try:
            cls(**arguments, control=recipe.control)
        except MeetError as error:
            raise type(error)(module_message(stage, error)) from None


def trainer_message(stage: str, message: str) -> str:
    """A Lightning Trainer complaint as one line naming the flag (``--stage1.trainer.max_steps``)."""
    text = " ".join(message.split())
    named = re.search(r"`(\w+)`", text) or re.search(r"\b(max_steps|max_epochs|val_check_interval|precision|devices)\b", text)
    flag = f"--{stage}.trainer.{named.group(1)}" if named else f"--{stage}.trainer"
    return f"{flag}: {text} — fix {flag}"


def check_stage_settings(recipe: Recipe, stage: str) -> None:
    """ConfigError, listing every problem, for stage settings Lightning would accept silently or crash on."""
    problems = recipe.stage(stage).problems(stage)
    if problems:
        raise ConfigError("; ".join(problems))


def check_recipe(recipe: Recipe) -> None:
    """Checks that need no model or data, so that bad settings fail before anything is written: the control,
    the data module's and every stage's own argument checks."""
    resolve_model_path(recipe.model_name_or_path)  # a missing model folder: one line, now
    recipe_datamodule(recipe)
    control = recipe.control
    if control:
        try:
            build_control(control)
        except (ValueError, TypeError) as error:  # a control constructor rejecting its arguments
            message = str(error).replace("init_args.", "--control.init_args.")
            raise ConfigError(f"control {control.get('class_path')}: {message}") from None
    for stage in recipe.active_stages:
        check_stage_settings(recipe, stage)
    check_loggers(recipe)
    check_modules(recipe)
    problems = recipe.predict.problems("--predict.")
    if problems:
        raise ConfigError("; ".join(problems))


def check_output_dir(recipe: Recipe, overwrite: bool) -> None:
    """Refuses an ``output_dir`` holding another recipe (budget keys may change); ``--overwrite`` clears it."""
    out = recipe.out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {out} is a file — pass a folder path")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--output_dir {out}: {parent} is a file — pass a path inside a folder")
            break
    saved = out / "recipe.yaml"
    if saved.is_file():
        try:
            old = yaml.safe_load(saved.read_text())
        except (yaml.YAMLError, UnicodeDecodeError):
            raise ConfigError(f"{saved} is damaged — pass --overwrite true to start over, or another --output_dir") from None
        # output_dir is where the run is, not what it is: a moved run folder still resumes
        difference = recipe_difference({**(old or {}), "output_dir": None}, {**recipe.to_dict(), "output_dir": None})
        if difference and not overwrite:
            raise ConfigError(
                f"{out} holds a run of another recipe ({difference}) — pass --overwrite true to start over, or another --output_dir"
            )
        if difference:
            clear_run(out)
    if is_global_zero():
        out.mkdir(parents=True, exist_ok=True)


def clear_run(out: Path) -> None:
    """Deletes a run's stages, export and recorded recipe (``--overwrite true``; rank zero only)."""
    if is_global_zero():
        for name in (*STAGES, "export", "recipe.yaml"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def check_run_data(recipe: Recipe, overwrite: bool, log=print) -> None:
    """Refuses (or with ``--overwrite`` clears) a run whose finished or started stages trained on other data.

    Each stage's done-marker, or else its ``last.ckpt``, records the data identity it was trained on
    (:func:`~meet_lightning.data.cache.data_identity`); the recipe can be unchanged while a source file was
    edited. Files written before identities were recorded are not checked. Costs nothing when no stage has
    started; otherwise the data's identity (its files hashed once) and a memory-mapped read of one checkpoint.
    """
    out = recipe.out
    current: list[str] = []
    for stage in recipe.active_stages:
        done, last = out / stage / DONE, out / stage / "checkpoints" / "last.ckpt"
        if done.is_file():
            where, recorded = done, json.loads(done.read_text()).get("data_identity")
        elif last.is_file():
            where, recorded = last, check_checkpoint_file(last)["meet"].get("data")
        else:
            continue
        if not recorded:
            continue
        current = current or [data_identity_of(recipe_datamodule(recipe))]
        if recorded == current[0]:
            continue
        if not overwrite:
            check_same_data(stage, where, recorded, current[0])
        log(f"{stage}: {where} was trained on other data than this run reads now — --overwrite: starting over")
        clear_run(out)
        return


class RecordRecipe(Callback):
    """Writes ``output_dir/recipe.yaml`` (rank zero, atomically) when a stage starts training.

    Not earlier: a command that fails before training (a missing data file or model, a checkpoint of another
    model) must not leave a recipe behind that the corrected command would then be refused for.
    """

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            text = yaml.safe_dump(self.recipe.to_dict(), sort_keys=False)
            write_text_atomic(self.recipe.out / "recipe.yaml", text)


def recipe_difference(old: Any, new: Any, prefix: str = "") -> str:
    """First difference between two recipes outside budget, hardware and neutral keys, as ``key: old → new`` (or empty)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for key in sorted(set(old) | set(new), key=str):
            if key in BUDGET_KEYS | HARDWARE_KEYS | NEUTRAL_KEYS or (not prefix and key == "predict"):  # decoding trains nothing
                continue
            if (key not in old and not new[key]) or (key not in new and not old[key]):
                continue  # an option added (or removed) by a library upgrade, left at its off value
            found = recipe_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return ""
    if prefix.endswith("class_path.") and isinstance(old, str):  # a recipe.yaml from before the modules moved
        old = current_name(old)
    return "" if old == new else f"{prefix.rstrip('.')}: {old!r} → {new!r}"


def fit(
    recipe: Recipe,
    overwrite: bool = False,
    ckpt_path: str | None = None,
    log=rank_zero_log,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Runs every unfinished stage, then exports (on rank zero); returns ``{stage: final validation metrics}``.

    ``callbacks`` are Lightning callbacks added to every stage's trainer (not part of the recipe).
    """
    check_recipe(recipe)
    if ckpt_path:
        check_checkpoint_file(Path(ckpt_path))
    check_output_dir(recipe, overwrite)
    check_run_data(recipe, overwrite, log)
    out = recipe.out
    results: dict[str, Any] = {}
    trained = False
    # Each stage continues the batch stream where the previous one left it: replaying stage 1's batches would
    # show a MEET run half the data of a single-stage baseline with the same total steps.
    position: int | None = None
    for stage in recipe.active_stages:
        done = out / stage / DONE
        if done.is_file():  # its data was checked by check_run_data
            log(f"{stage}: finished earlier ({done}), skipping")
            results[stage] = json.loads(done.read_text())
        else:
            results[stage] = run_stage(recipe, stage, ckpt_path, log, position, callbacks)
            trained = True
            ckpt_path = None  # --ckpt_path applies to the first unfinished stage only
        position = int(results[stage].get("batch_stream_position", 0))  # 0: a stage finished before it was recorded
    if not trained and (out / "export" / SCHEMA_FILE).is_file():
        log(f"export: up to date ({out / 'export'}), skipping")
    elif is_global_zero():
        export_run(recipe, results, log=log)
    return results


def export_run(recipe: Recipe, metrics: Mapping[str, Any], log=print) -> Path:
    """Exports the last stage of a finished run (its selected checkpoint) to ``output_dir/export``.

    The module class comes from the recipe (which the user wrote), never from the checkpoint file. A stage that
    trained on a 4-bit base (``quantize: nf4``) exports its full-precision base with the trained controls.
    """
    stage = recipe.active_stages[-1]
    module: MeetModule = build_stage(recipe, stage, {"quantize": None}).model
    restore_module(module, selected_checkpoint(recipe, stage))
    folder = recipe.out / "export"
    export_model(
        folder,
        module.merged_lm(),
        module.tokenizer,
        module.control,
        module.schema,
        module.hparams.model_name_or_path,
        module.base_fingerprint,
        metadata=module.export_metadata(),
        recipe=recipe.to_dict(),
        metrics=metrics,
    )
    log(f"exported to {folder}")
    return folder


def run_stage(
    recipe: Recipe,
    stage: str,
    ckpt_path: str | None,
    log,
    skip_batches: int | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, float]:
    """Fits one stage (resuming from ``ckpt_path`` or its ``last.ckpt``), writes its files and done-marker.

    ``skip_batches`` (where the previous stage left the batch stream) overrides ``data.skip_batches``;
    ``callbacks`` go to the stage's trainer (:func:`build_stage`).
    """
    out = recipe.out / stage
    extra = (
        {"init_controls": str(recipe.out / "stage1" / "controls.safetensors")}
        if stage == "stage2" and "stage1" in recipe.active_stages
        else None
    )
    data_extra = None if skip_batches is None else {"skip_batches": skip_batches}
    init_controls = (extra or {}).get("init_controls") or ((recipe.stage(stage).model or {}).get("init_args") or {}).get(
        "init_controls"
    )
    if init_controls:
        read_controls_metadata(Path(init_controls))  # missing/foreign file: one line now, not after the model loads
    memory = PeakRSSByPhase()
    memory.enter("load")  # building the stage, loading model and data (until the first step or sanity check)
    cli = build_stage(recipe, stage, extra, data_extra, callbacks)
    identity = data_identity_of(cli.datamodule)
    cli.model.data_identity = identity  # into every checkpoint of this stage
    precision = stage_precision(recipe, stage)
    log(f"{stage}: precision {precision.precision} ({precision.reason})")
    last = out / "checkpoints" / "last.ckpt"
    resume = resume_point(stage, ckpt_path, last, identity, log)
    cli.trainer.callbacks.append(RecordRecipe(recipe))
    cli.trainer.callbacks.insert(0, MemoryPhases(memory))  # first: checkpoint saving falls in between_steps
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=resume, weights_only=True)
    memory.enter("after_fit")  # the last checkpoint, validating the selected one, stage 1's controls file
    cli.trainer.save_checkpoint(last, weights_only=False)
    # read before validating a checkpoint: restoring one also restores the callbacks' states
    progress = {
        "global_step": cli.trainer.global_step,
        "batch_stream_position": stream_position(cli),
        **next(c for c in cli.trainer.callbacks if isinstance(c, ThroughputMeter)).summary(),
    }
    cli, metrics = validate_selected(recipe, stage, cli, last, progress["global_step"], extra, data_extra)
    if stage == "stage1":
        write_stage1_controls(cli, out)
    metrics.update(global_step=progress.pop("global_step"), **progress)
    log(f"{stage}: done — " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    memory.enter(None)
    record = {
        **metrics,
        "precision": precision.precision,
        "precision_reason": precision.reason,
        **memory.summary(),
        "data_identity": identity,
    }
    write_done(cli, out, stage, record, log)
    finish_tracker_runs(cli.trainer)
    cli.trainer.strategy.barrier()
    return record


def validate_selected(
    recipe: Recipe, stage: str, cli: LightningCLI, last: Path, step: int, extra: dict | None, data_extra: dict | None
) -> tuple[LightningCLI, dict[str, float]]:
    """Validates the checkpoint ``select`` chose (loading its weights, so the controls written next are the ones
    reported); returns the stage's CLI that holds them and the metrics, with ``selected_step`` (``step``: the last)."""
    selected = selected_checkpoint(recipe, stage)
    reloaded = str(selected) if selected != last else None
    if is_sharded(cli.model):
        # FSDP wrapped the LM's blocks in place, and a second trainer call wraps only a model with no FSDP unit
        # inside: the root's parameters (embeddings, controls) would stay flat shards. A fresh stage validates.
        cli = build_stage(recipe, stage, extra, data_extra)
        reloaded_now = str(selected)
    else:
        reloaded_now = reloaded
    validated = cli.trainer.validate(cli.model, cli.datamodule, ckpt_path=reloaded_now, weights_only=True, verbose=False)
    metrics = {k: float(v) for k, v in (validated or [{}])[0].items()}
    metrics["selected_step"] = check_checkpoint_file(selected)["global_step"] if reloaded else step
    return cli, metrics


def resume_point(stage: str, ckpt_path: str | None, last: Path, identity: Any, log) -> str | None:
    """Where the stage resumes: ``ckpt_path``, else its own ``last.ckpt`` if there is one, else ``None`` (a fresh
    start). A checkpoint file must have been written on the same data (:func:`check_same_data`)."""
    resume = ckpt_path or (str(last) if last.exists() else None)
    if resume and Path(resume).is_dir():  # a DeepSpeed checkpoint folder: Lightning reads it itself
        log(f"{stage}: restoring from {resume} (sharded checkpoint folder)")
    elif resume:
        checkpoint = check_checkpoint_file(Path(resume))
        fix = "pass a --ckpt_path written on this data" if ckpt_path else None  # own last.ckpt: --overwrite helps
        check_same_data(stage, Path(resume), checkpoint["meet"].get("data"), identity, fix)
        log(f"{stage}: restoring from {resume} at step {checkpoint.get('global_step', 0)}")
    return resume


def write_done(cli: LightningCLI, out: Path, stage: str, record: dict[str, Any], log) -> None:
    """Logs the stage's peak memory per phase and writes its done-marker (``done.json``, rank 0 only)."""
    for key, what in (("peak_rss_gb", "peak RSS"), ("peak_cuda_gb", "peak CUDA memory")):
        if key in record:
            log(f"{stage}: {what} by phase (GiB): " + ", ".join(f"{k} {v}" for k, v in record[key].items()))
    if cli.trainer.is_global_zero:
        write_text_atomic(out / DONE, json.dumps(record, indent=2))


def recipe_datamodule(recipe: Recipe) -> PreferenceDataModule:
    """The recipe's data module, as a stage builds it (its arguments checked; nothing read yet)."""
    data = dict(recipe.data)
    data["sources"] = [SourceConfig(**s) if isinstance(s, Mapping) else s for s in data.get("sources") or []] or None
    return PreferenceDataModule(**{**data, "model_name_or_path": recipe.model_name_or_path})


def data_identity_of(datamodule: PreferenceDataModule) -> str:
    """The identity of what ``datamodule`` serves (a streamed hub dataset by its options: it is not downloaded)."""
    return data_identity(datamodule.spec, datamodule.tokenizer, hub_contents=not datamodule.streaming)


def check_same_data(stage: str, where: Path, recorded: str | None, current: str, fix: str | None = None) -> None:
    """DataError when ``where`` (a checkpoint or done-marker) was written on other data than the run reads now.

    A resume on edited data would continue the optimizer, the schedule and the batch position of one dataset on
    another, and report the mix as one run. ``recorded`` empty (a file written before identities were recorded)
    is not checked. ``fix`` replaces the default advice (``--overwrite true``, which starts the run over).
    """
    if recorded and recorded != current:
        raise DataError(
            f"{stage}: {where} was trained on other data than this run reads now (data identity {recorded[:12]} ≠"
            f" {current[:12]}: a source file, the split or the tokenizer changed) — "
            + (fix or "pass --overwrite true to start over")
            + ", or restore the data it was trained on"
        )


def stream_position(cli: StageCLI) -> int:
    """Batches of the seeded training stream behind a finished stage: those it skipped and trained on (all ranks)."""
    trained = cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed  # restored on resume
    return cli.datamodule.skip_batches + trained * cli.trainer.world_size


def write_stage1_controls(cli: StageCLI, out: Path) -> None:
    """``stage1/controls.safetensors`` from the module's weights (those of the selected checkpoint)."""
    module: MeetModule = cli.model
    if cli.trainer.is_global_zero:
        save_controls(module.control, out / "controls.safetensors", module.schema, module.base_fingerprint)
    cli.trainer.strategy.barrier()


def check_checkpoint_file(path: Path) -> dict[str, Any]:
    """The checkpoint, memory-mapped (weights only); CheckpointError for a missing, truncated or foreign file."""
    if not path.is_file():
        raise CheckpointError(f"--ckpt_path {path}: file not found — pass a .ckpt written by this run")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - any unreadable file is the same user error
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(error).__name__}) — delete it to restart the stage, or pass another --ckpt_path"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not a Lightning checkpoint (no state_dict) — pass a .ckpt written by meet_lightning")
    if "meet" not in checkpoint:
        raise CheckpointError(f"{path}: checkpoint has no meet_lightning metadata — pass a checkpoint written by meet_lightning")
    return checkpoint


def stage_checkpoint(recipe: Recipe, stage: str | None) -> tuple[str, Path]:
    """The stage (default: the last active one) and its selected checkpoint for validate/test/predict."""
    stages = recipe.active_stages
    stage = stage or stages[-1]
    if stage not in stages:
        raise ConfigError(f"--stage {stage} is not in this recipe (stages: {', '.join(stages)}) — pass one of them")
    last = recipe.out / stage / "checkpoints" / "last.ckpt"
    if not last.exists():
        raise CheckpointError(f"{last}: not found — run `fit` with this recipe first")
    return stage, selected_checkpoint(recipe, stage)


def single_file_checkpoint(path: Path) -> Path:
    """``path``, or for a DeepSpeed checkpoint folder one file converted from it beside it (once, on rank zero)."""
    if not Path(path).is_dir():
        return Path(path)
    target = Path(path).with_name(f"{Path(path).name}.consolidated")
    if not target.is_file() or target.stat().st_mtime < Path(path).stat().st_mtime:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        convert_zero_checkpoint_to_fp32_state_dict(str(path), str(target))  # needs the deepspeed package
    return target


def restore_module(module: MeetModule, checkpoint: Path) -> MeetModule:
    """Builds ``module``'s LM and loads a stage checkpoint into it (weights only, checked against the run)."""
    state = check_checkpoint_file(single_file_checkpoint(checkpoint))
    module.configure_model()
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"])
    return module.eval()


def evaluate_stage(recipe: Recipe, command: str, stage: str | None, log=print) -> Any:
    """``validate`` / ``test`` / ``predict`` with one stage's ``last.ckpt``."""
    check_recipe(recipe)
    stage, last = stage_checkpoint(recipe, stage)
    cli = build_stage(recipe, stage)
    if not last.is_dir():  # a DeepSpeed folder is read by Lightning itself (predict converts it to one file)
        check_checkpoint_file(last)
    if command == "predict":
        out = recipe.out / stage / "predictions.jsonl"
        return predict_to_file(cli, last, out, recipe.predict, log=log)
    run = getattr(cli.trainer, command)
    return run(cli.model, cli.datamodule, ckpt_path=str(last), weights_only=True)


def predict_to_file(cli: Any, checkpoint: Path, out: Path, decoding: DecodingOptions, log=print) -> list[dict[str, Any]]:
    """``predict``: generations for ``data.predict_path`` with a stage checkpoint, decoded as ``decoding``, written to ``out``."""
    predict_path = cli.datamodule.predict_path
    if not predict_path:
        raise ConfigError("predict needs --data.predict_path FILE.jsonl (lines with 'prompt' and optional 'controls')")
    rows = read_prompt_file(Path(predict_path), "--data.predict_path")
    ids = [row_controls(cli.model.schema, r, predict_path) for r in rows]  # before the model loads: fail fast
    module = restore_module(cli.model, checkpoint)
    if decoding.seed is not None:
        torch.manual_seed(decoding.seed)
    prompts = [r["prompt"] for r in rows]
    texts = generate_responses(module.lm, module.tokenizer, module.control, prompts, ids, decoding, progress=True)
    results = [{"prompt": r["prompt"], "controls": r["controls"], "response": t} for r, t in zip(rows, texts, strict=True)]
    write_jsonl_atomic(out, results)
    log(f"wrote {len(results)} predictions to {out}")
    return results
