"""The checks a fit runs before it writes anything, each reporting one line that names the flag to fix.

:func:`check_recipe` runs those that need no model or data (the model path, the control, the data module's and
every stage's own arguments, the loggers), so that a bad stage-2 setting fails before stage 1 trains.
:func:`check_output_dir` refuses an ``output_dir`` holding another recipe (:func:`recipe_difference`: budget,
hardware and neutral keys may change), and :func:`check_run_data` one whose stages were trained on other data
(the data identity in their done-markers and checkpoints); ``--overwrite true`` clears either (:func:`clear_run`).
:func:`module_message` and :func:`trainer_message` turn a module's or the Trainer's complaint into that one line.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from meet_lightning._moved import current_name
from meet_lightning.controls.tokens import build_control
from meet_lightning.data.cache import data_identity
from meet_lightning.data.datamodule import PreferenceDataModule
from meet_lightning.data.formats import SourceConfig
from meet_lightning.errors import ConfigError, DataError, MeetError
from meet_lightning.models import resolve_model_path
from meet_lightning.modules.base import MeetModule
from meet_lightning.recipe import STAGES, Recipe
from meet_lightning.training.checkpoints import check_checkpoint_file
from meet_lightning.training.distributed import is_global_zero
from meet_lightning.training.loggers import check_loggers

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


def check_stage_settings(recipe: Recipe, stage: str) -> None:
    """ConfigError, listing every problem, for stage settings Lightning would accept silently or crash on."""
    problems = recipe.stage(stage).problems(stage)
    if problems:
        raise ConfigError("; ".join(problems))


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


def recipe_datamodule(recipe: Recipe) -> PreferenceDataModule:
    """The recipe's data module, as a stage builds it (its arguments checked; nothing read yet)."""
    data = dict(recipe.data)
    data["sources"] = [SourceConfig(**s) if isinstance(s, Mapping) else s for s in data.get("sources") or []] or None
    return PreferenceDataModule(**{**data, "model_name_or_path": recipe.model_name_or_path})


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


def trainer_message(stage: str, message: str) -> str:
    """A Lightning Trainer complaint as one line naming the flag (``--stage1.trainer.max_steps``)."""
    text = " ".join(message.split())
    named = re.search(r"`(\w+)`", text) or re.search(r"\b(max_steps|max_epochs|val_check_interval|precision|devices)\b", text)
    flag = f"--{stage}.trainer.{named.group(1)}" if named else f"--{stage}.trainer"
    return f"{flag}: {text} — fix {flag}"


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
