"""A stage's checkpoint files: which one ``select`` keeps and picks, and reading one back safely.

``select: last`` uses ``last.ckpt``; ``select: best`` also keeps ``best.ckpt`` (:func:`best_checkpoint`).
:func:`selected_checkpoint` is the one rule every step after training follows. A checkpoint is read weights-only
and memory-mapped, and refused in one line when it is missing, truncated or not meet_lightning's
(:func:`check_checkpoint_file`); :func:`restore_module` loads one into a module (a DeepSpeed folder converted first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from meet_lightning.errors import CheckpointError, ConfigError
from meet_lightning.modules.base import MeetModule
from meet_lightning.recipe import Recipe

BEST = "best"
"""File stem of the checkpoint ``select: best`` keeps."""


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
