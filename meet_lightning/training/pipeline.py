"""The two-stage orchestrator: stage 1 fit → ``controls.safetensors`` → stage 2 fit → export.

Each stage is an ordinary ``LightningCLI(args=stage_dict, run=False)`` built from the recipe, so Lightning saves
each stage's own hyperparameters in its own checkpoints. A stage with its done-marker is skipped; an
unfinished one resumes from its ``last.ckpt`` — bit-identically, even after ``SIGKILL``: the checkpoints are
written atomically and carry the RNG states and the sampler position (see :mod:`meet_lightning.training.reliability`).
Under DDP only global rank zero writes the stage files (``recipe.yaml``, ``controls.safetensors``,
``done.json``, ``export/``); the stages are separated by barriers.

What a fit relies on but is not its story lives beside it: the checks run before anything is written
(:mod:`~meet_lightning.training.checks`), the checkpoint files and ``select`` (:mod:`~meet_lightning.training.checkpoints`),
the experiment trackers (:mod:`~meet_lightning.training.loggers`) and which rank writes
(:mod:`~meet_lightning.training.distributed`).
"""

from __future__ import annotations

import copy
import json
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
from typing_extensions import override

from meet_lightning.atomic import write_text_atomic
from meet_lightning.controls.files import read_controls_metadata, save_controls
from meet_lightning.data.datamodule import PreferenceDataModule
from meet_lightning.errors import ConfigError
from meet_lightning.inference.export import SCHEMA_FILE, export_model
from meet_lightning.inference.generation import (
    DecodingOptions,
    generate_responses,
    read_prompt_file,
    row_controls,
    write_jsonl_atomic,
)
from meet_lightning.modules.base import MeetModule
from meet_lightning.precision import Resolved, resolve_precision
from meet_lightning.recipe import Recipe
from meet_lightning.rss import PeakRSSByPhase
from meet_lightning.training.callbacks import MemoryPhases, ThroughputMeter
from meet_lightning.training.checkpoints import (
    best_checkpoint,
    check_checkpoint_file,
    restore_module,
    selected_checkpoint,
    selects_best,
    stage_checkpoint,
)
from meet_lightning.training.checks import (
    DONE,
    _meet_error_in,
    check_output_dir,
    check_recipe,
    check_run_data,
    check_same_data,
    check_stage_settings,
    data_identity_of,
    module_message,
    trainer_message,
)
from meet_lightning.training.distributed import is_global_zero, is_sharded, rank_zero_log
from meet_lightning.training.loggers import (
    finish_tracker_runs,
    stage_loggers,
)
from meet_lightning.training.reliability import AtomicCheckpointIO, GradientCheck, RNGState


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


def stage_precision(recipe: Recipe, stage: str) -> Resolved:
    """The stage's trainer precision with ``auto`` resolved from the hardware it runs on, and why."""
    trainer = recipe.stage(stage).trainer
    return resolve_precision(trainer.get("precision"), trainer.get("accelerator"))


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
    start). A checkpoint file must have been written on the same data (:func:`~meet_lightning.training.checks.check_same_data`)."""
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
