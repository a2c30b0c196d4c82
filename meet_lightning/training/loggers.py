"""The experiment trackers a stage logs to: ``--logger`` names as Lightning loggers.

:data:`LOGGERS` maps each name to its Lightning logger class and the package that class needs;
:func:`check_loggers` refuses an unknown or uninstalled one before anything runs; :func:`stage_loggers` gives a
stage its loggers (the ``evaluate`` command's ``--logger`` reuses them); :func:`finish_tracker_runs` closes the
W&B run a stage opened.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from meet_lightning.errors import ConfigError
from meet_lightning.recipe import Recipe

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


def next_log_version(logs: Path) -> int:
    """The first free ``version_N`` under ``logs`` (a resumed stage logs to a new one, as Lightning does)."""
    numbers = [p.name.removeprefix("version_") for p in logs.glob("version_*")]
    return max((int(n) for n in numbers if n.isdigit()), default=-1) + 1


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
