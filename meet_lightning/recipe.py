"""The recipe as typed data: what ``fit`` / ``validate`` / ``test`` / ``predict`` run, after parsing.

The command line and the YAML files are parsed by jsonargparse (``cli.recipe_parser``, whose defaults are the
ones below); :meth:`Recipe.from_dict` turns the parsed result into a :class:`Recipe`, and every pipeline
function takes that. :meth:`Recipe.to_dict` is the YAML written beside a run (``output_dir/recipe.yaml``), which
a resumed run is compared with. The module and trainer of a stage, the control and the data stay
``class_path`` / ``init_args`` mappings: they are the arguments of classes a user may replace (their own
LightningModule, control or Trainer options), checked by those classes' own constructors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meet_lightning.errors import ConfigError, failed_checks
from meet_lightning.inference.generation import DecodingOptions
from meet_lightning.models import DEFAULT_MODEL

STAGES = ("stage1", "stage2")
DEFAULT_LOGGERS = ("csv", "tensorboard")
SELECT = ("last", "best")


@dataclasses.dataclass
class StageSpec:
    """One stage: its LightningModule, its Trainer and which checkpoint it keeps."""

    model: dict[str, Any] | None = None
    """The stage's LightningModule as ``class_path`` / ``init_args`` (``None``: the stage does not run)."""
    trainer: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Lightning ``Trainer`` arguments (``precision: auto`` is resolved from the hardware when the stage runs)."""
    select: str = "last"
    """Checkpoint the stage keeps: ``last``, or ``best`` by ``val/control_accuracy``."""
    checkpoint_every_n_steps: int = 100
    """``last.ckpt`` is written every this many optimizer steps (what a killed run resumes from)."""

    def problems(self, stage: str) -> list[str]:
        """Settings Lightning would accept silently or crash on, each naming its flag and the fix."""
        every, trainer = self.checkpoint_every_n_steps, self.trainer
        accumulate = trainer.get("accumulate_grad_batches", 1)
        clip = trainer.get("gradient_clip_val")
        max_steps = trainer.get("max_steps", -1)
        return failed_checks(
            (
                (
                    not isinstance(every, int) or every < 1,
                    f"--{stage}.checkpoint_every_n_steps {every} must be ≥ 1 (a run must checkpoint to resume)",
                ),
                (
                    not isinstance(accumulate, int) or accumulate < 1,
                    f"--{stage}.trainer.accumulate_grad_batches {accumulate} must be ≥ 1",
                ),
                (
                    clip is not None and float(clip) < 0,
                    f"--{stage}.trainer.gradient_clip_val {clip} must be ≥ 0 (or null for none)",
                ),
                (
                    isinstance(max_steps, int) and (max_steps == 0 or max_steps < -1),
                    f"--{stage}.trainer.max_steps {max_steps} must be ≥ 1 (or -1 to train by epochs)",
                ),
                (self.select not in SELECT, f"--{stage}.select {self.select!r} must be one of {', '.join(SELECT)}"),
            )
        )


@dataclasses.dataclass
class Recipe:
    """A whole run: the base model, the control, the data, both stages and the decoding of ``predict``."""

    output_dir: str
    """Folder holding ``stage1/``, ``stage2/``, ``export/`` and ``recipe.yaml``."""
    model_name_or_path: str = DEFAULT_MODEL
    """Hub id, local folder, ``.gguf`` file or alias of the base LM."""
    seed_everything: int = 1234
    """Seed applied before each stage's module is built."""
    logger: str | list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_LOGGERS))
    """Experiment trackers of both stages (csv is always kept: ``done.json`` and the reports read it)."""
    control: dict[str, Any] | None = None
    """The control implementation shared by both stages, as ``class_path`` / ``init_args``."""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Arguments of :class:`~meet_lightning.data.datamodule.PreferenceDataModule` (``model_name_or_path`` comes from above)."""
    predict: DecodingOptions = dataclasses.field(default_factory=DecodingOptions)
    """Decoding of the ``predict`` command."""
    stage1: StageSpec = dataclasses.field(default_factory=StageSpec)
    """Stage 1 (MEET: the controls on a frozen LM)."""
    stage2: StageSpec = dataclasses.field(default_factory=StageSpec)
    """Stage 2 (MEET: LM and controls jointly); ``model: null`` makes a single-stage recipe."""

    @classmethod
    def from_dict(cls, recipe: Mapping[str, Any]) -> Recipe:
        """A recipe from its plain form (the parsed command line and YAML, or a ``recipe.yaml``)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(recipe) - fields)
        if unknown:
            raise ConfigError(f"recipe key {unknown[0]!r} is not one of {', '.join(sorted(fields))} — remove or rename it")
        values = dict(recipe)
        for stage in STAGES:
            values[stage] = StageSpec(**(values.get(stage) or {}))
        values["predict"] = DecodingOptions(**(values.get("predict") or {}))
        values["data"] = dict(values.get("data") or {})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML types, as written to ``output_dir/recipe.yaml`` and into an export's metadata."""
        return dataclasses.asdict(self)

    @property
    def out(self) -> Path:
        """``output_dir`` as a path."""
        return Path(self.output_dir)

    def stage(self, name: str) -> StageSpec:
        """``stage1`` or ``stage2``."""
        return {"stage1": self.stage1, "stage2": self.stage2}[name]

    @property
    def active_stages(self) -> list[str]:
        """Stages whose ``model`` is set (``stage2.model: null`` makes a single-stage recipe)."""
        return [s for s in STAGES if self.stage(s).model]

    @property
    def logger_names(self) -> list[str]:
        """The recipe's ``logger`` (one name or a list), csv first and always: the stage's ``metrics.csv`` is
        what ``done.json``, the benchmarks and the reports read."""
        chosen = [self.logger] if isinstance(self.logger, str) else list(self.logger or [])
        return list(dict.fromkeys(["csv", *chosen]))
