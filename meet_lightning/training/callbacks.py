"""Training callbacks: throughput and memory accounting, and sample generations (and rewards) per control."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from meet_lightning.errors import ConfigError
from meet_lightning.evaluation.fidelity import generate_under
from meet_lightning.evaluation.figures import require_matplotlib, sample_words_figure
from meet_lightning.evaluation.judges import RewardModel
from meet_lightning.evaluation.loading import NO_CONTROL, EvalModel
from meet_lightning.inference.generation import DecodingOptions
from meet_lightning.rss import PeakRSSByPhase
from meet_lightning.stats import words


class ThroughputMeter(Callback):
    """Counts real (non-pad) training tokens and training wall time of a stage, across resumes.

    The totals travel in the checkpoint, so a stage resumed after a crash reports its whole run, not only the
    last process (time between the crash and the restart is not counted).

    The stage's first batch pays one-off costs (kernel selection, CUDA context, compilation), so the rate after
    it is reported too: on a GPU that is the number to compare, on a short run the first step can dominate.

    Attributes:
        tokens: Non-pad tokens of every training batch seen (control tokens not counted).
        seconds: Wall time from the first to the last training batch of each process, summed.
        first_tokens: Tokens of the stage's first batch.
        first_seconds: Wall time of the stage's first batch.
    """

    def __init__(self) -> None:
        self.tokens = 0
        self.seconds = 0.0
        self.first_tokens = 0
        self.first_seconds = 0.0
        self._earlier = 0.0  # seconds of the processes before this one (from the checkpoint)
        self._start: float | None = None

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        first = self.tokens == 0
        self.tokens += int(batch["attention_mask"].sum())
        self.seconds = self._earlier + time.perf_counter() - self._start
        if first:
            self.first_tokens, self.first_seconds = self.tokens, self.seconds

    @override
    def state_dict(self) -> dict[str, float]:
        return {
            "tokens": self.tokens,
            "seconds": self.seconds,
            "first_tokens": self.first_tokens,
            "first_seconds": self.first_seconds,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.tokens = int(state_dict["tokens"])
        self.seconds = self._earlier = float(state_dict["seconds"])
        self.first_tokens = int(state_dict.get("first_tokens", 0))  # checkpoints written before it was recorded
        self.first_seconds = float(state_dict.get("first_seconds", 0.0))

    def summary(self) -> dict[str, float]:
        """``train_tokens``, ``train_seconds``, ``train_tokens_per_s`` of the stage, and
        ``train_tokens_per_s_after_first_step`` (0 when the stage ran a single step)."""
        rate = self.tokens / self.seconds if self.seconds else 0.0
        later = self.seconds - self.first_seconds
        steady = (self.tokens - self.first_tokens) / later if later > 0 else 0.0
        return {
            "train_tokens": self.tokens,
            "train_seconds": round(self.seconds, 2),
            "train_tokens_per_s": round(rate, 1),
            "train_tokens_per_s_after_first_step": round(steady, 1),
        }


class MemoryPhases(Callback):
    """Attributes this process's peak RSS to the phases of a fit: ``sanity_check``, ``train_step`` (forward,
    backward, optimizer step), ``validation``, and ``between_steps`` (loading batches, logging, saving
    checkpoints — Lightning runs checkpoint callbacks after this one). The caller enters the phases before and
    after ``fit`` (loading, the final validation) on the same tracker.
    """

    def __init__(self, tracker: PeakRSSByPhase) -> None:
        self.tracker = tracker

    @override
    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self.tracker.enter("sanity_check")

    @override
    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self.tracker.enter("between_steps")

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.tracker.enter("train_step")

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tracker.enter("between_steps")

    @override
    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.tracker.enter("validation")

    @override
    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.tracker.enter("between_steps")


Sample = dict[str, Any]
"""One sample generation: ``{"step", "control", "prompt", "response"}``."""


def samples_markdown(rows: Sequence[Sample]) -> str:
    """The samples of one control as Markdown: each prompt in bold, its response below."""
    return "\n\n".join(f"**{r['prompt']}**\n\n{r['response']}" for r in rows)


def by_control(rows: Sequence[Sample]) -> dict[str, list[Sample]]:
    """``rows`` grouped by control, in the order the controls first appear."""
    groups: dict[str, list[Sample]] = {}
    for row in rows:
        groups.setdefault(row["control"], []).append(row)
    return groups


def tensorboard_samples(logger: Any, rows: Sequence[Sample], step: int) -> None:
    """One text entry per control, ``samples/<control>``, in TensorBoard's TEXT tab."""
    for control, group in by_control(rows).items():
        logger.experiment.add_text(f"samples/{control}", samples_markdown(group), step)


def wandb_samples(logger: Any, rows: Sequence[Sample], step: int) -> None:
    """One W&B table ``samples`` (step, control, prompt, response) per validation."""
    columns = ["step", "control", "prompt", "response"]
    logger.log_text(key="samples", columns=columns, data=[[r[c] for c in columns] for r in rows], step=step)


def mlflow_samples(logger: Any, rows: Sequence[Sample], step: int) -> None:
    """One Markdown artifact per validation, ``samples/step_<step>.md``, in the MLflow run."""
    text = "\n\n".join(f"## {control}\n\n{samples_markdown(group)}" for control, group in by_control(rows).items())
    logger.experiment.log_text(logger.run_id, text, f"samples/step_{step:07d}.md")


SAMPLE_WRITERS: dict[str, Callable[[Any, Sequence[Sample], int], None]] = {
    "TensorBoardLogger": tensorboard_samples,
    "WandbLogger": wandb_samples,
    "MLFlowLogger": mlflow_samples,
}
"""Logger class name → how that kind of logger shows sample generations. Looked up by name along the logger's
class hierarchy, so a subclass is served too and wandb/mlflow are never imported here; add an entry to teach
:class:`SampleGenerations` another logger."""


def tensorboard_figure(logger: Any, figure: Any, step: int, tag: str) -> None:
    """TensorBoard's IMAGES tab, under ``tag``."""
    logger.experiment.add_figure(tag, figure, step, close=False)


def wandb_figure(logger: Any, figure: Any, step: int, tag: str) -> None:
    """A W&B image under ``tag``."""
    logger.log_image(key=tag, images=[figure], step=step)


def mlflow_figure(logger: Any, figure: Any, step: int, tag: str) -> None:
    """An MLflow artifact ``<tag>_step_<step>.png``."""
    logger.experiment.log_figure(logger.run_id, figure, f"{tag}_step_{step:07d}.png")


FIGURE_WRITERS: dict[str, Callable[[Any, Any, int, str], None]] = {
    "TensorBoardLogger": tensorboard_figure,
    "WandbLogger": wandb_figure,
    "MLFlowLogger": mlflow_figure,
}
"""Logger class name → how that kind of logger shows a matplotlib figure (looked up as :data:`SAMPLE_WRITERS`):
the samples' words per control during training, and ``evaluate --logger``'s plots."""


def log_figure(loggers: Sequence[Any], figure: Any, step: int, tag: str) -> None:
    """``figure`` to each logger that has a figure writer (CSV has none)."""
    for logger in loggers:
        write = writer_for(FIGURE_WRITERS, logger)
        if write is not None:
            write(logger, figure, step, tag)


def log_evaluation(loggers: Sequence[Any], metrics: Mapping[str, Any], plots: Sequence[str]) -> None:
    """``evaluate``'s numbers (``evaluate/<path>``, nested keys joined by ``/``) and its PNG plots to ``loggers``."""
    numbers = {f"evaluate/{key}": value for key, value in flat_numbers(metrics)}
    for logger in loggers:
        logger.log_metrics(numbers, step=0)
    if plots:
        plt = require_matplotlib()
        for path in plots:
            image = plt.imread(path)
            figure, axis = plt.subplots(figsize=(image.shape[1] / 100, image.shape[0] / 100), dpi=100)
            axis.imshow(image)
            axis.axis("off")
            figure.subplots_adjust(0, 0, 1, 1)
            log_figure(loggers, figure, 0, f"evaluate/{Path(path).stem}")
            plt.close(figure)
    for logger in loggers:
        logger.finalize("success")


def flat_numbers(tree: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every number in nested dicts; lists (intervals, per-item values) are left to the JSON output."""
    if isinstance(tree, bool):
        return []
    if isinstance(tree, int | float):
        return [(prefix, float(tree))]
    if isinstance(tree, Mapping):
        return [item for key, value in tree.items() for item in flat_numbers(value, f"{prefix}/{key}" if prefix else str(key))]
    return []


def writer_for(table: dict[str, Callable], logger: Any) -> Callable | None:
    """``table``'s writer for ``logger``'s kind (or of its nearest parent class that has one), ``None`` for none (CSV)."""
    return next((table[c.__name__] for c in type(logger).__mro__ if c.__name__ in table), None)


def sample_writer(logger: Any) -> Callable[[Any, Sequence[Sample], int], None] | None:
    """The sample writer for ``logger``'s kind, ``None`` for none (CSV)."""
    return writer_for(SAMPLE_WRITERS, logger)


def words_by_control(rows: Sequence[Sample]) -> dict[str, list[int]]:
    """Each control's samples' word counts."""
    return {control: [words(r["response"]) for r in group] for control, group in by_control(rows).items()}


DEFAULT_SAMPLE_PROMPTS = (
    "How do I make a good cup of tea?",
    "My neighbour's dog keeps barking at night. What should I do?",
    "How can I get back at a coworker who embarrassed me?",
)
"""Prompts :class:`SampleGenerations` answers when given none: one everyday, one social, one harm-adjacent."""


class SampleGenerations(Callback):
    """Greedy generations under every control for a few fixed prompts, at the end of each validation.

    Each validation (not the sanity check) appends one line per (control, prompt) to ``filename`` in the stage
    folder (``trainer.default_root_dir``): ``{"step", "control", "prompt", "response"}``; the same samples go to
    each logger of the run that has a writer in :data:`SAMPLE_WRITERS` (TensorBoard text ``samples/<control>``,
    a W&B table ``samples``, an MLflow artifact ``samples/step_N.md``). Each control's mean words per sample is
    logged as ``val/sample_words/<control>`` (every logger, CSV included), and a figure of them goes to each logger
    in :data:`FIGURE_WRITERS` and to ``samples_words.png`` (with matplotlib). No logger is needed. With
    ``reward_model``, ``num_reward_prompts`` validation prompts are answered under every control and their mean
    reward is logged as ``val/reward/<control>``. Runs on global rank zero only.

    From a recipe::

        stage2:
          trainer:
            callbacks:
              - class_path: meet_lightning.SampleGenerations
                init_args: {prompts: ["How do I boil an egg?"], max_new_tokens: 48}

    Args:
        prompts: User messages (default: :data:`DEFAULT_SAMPLE_PROMPTS`).
        controls: Controls to generate under, e.g. ``["harmless/good", "harmless/bad"]`` (default: every control
            of the module's schema, or ``none`` — no control — when it has none).
        max_new_tokens: Longest generation.
        filename: JSONL file, relative to the stage folder (or absolute).
        reward_model: Folder of a Hugging Face sequence-classification reward model, or ``None``.
        num_reward_prompts: Validation prompts scored by the reward model.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        controls: list[str] | None = None,
        max_new_tokens: int = 48,
        filename: str = "samples.jsonl",
        reward_model: str | None = None,
        num_reward_prompts: int = 16,
    ) -> None:
        if max_new_tokens < 1 or num_reward_prompts < 1:
            raise ValueError("max_new_tokens and num_reward_prompts must be ≥ 1 — set init_args of SampleGenerations")
        self.prompts = list(prompts or DEFAULT_SAMPLE_PROMPTS)
        self.controls = list(controls) if controls else None
        self.max_new_tokens, self.filename = max_new_tokens, filename
        self.reward_model, self.num_reward_prompts = reward_model, num_reward_prompts
        self._reward = None
        self._warned = False

    def _controls(self, pl_module) -> list[str]:
        if self.controls:
            return self.controls
        plain = not pl_module.control.steers or not pl_module.schema.num_controls
        return [NO_CONTROL] if plain else pl_module.schema.names

    @override
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        model = EvalModel("training", pl_module.lm, pl_module.tokenizer, pl_module.control, pl_module.schema)
        messages = [[{"role": "user", "content": p}] for p in self.prompts]
        rows = []
        for control in self._controls(pl_module):
            responses = generate_under(model, messages, control, DecodingOptions(self.max_new_tokens))
            rows += [
                {"step": trainer.global_step, "control": control, "prompt": p, "response": r}
                for p, r in zip(self.prompts, responses, strict=True)
            ]
        self._write(trainer, rows)
        for control, counts in words_by_control(rows).items():  # every logger, CSV included
            pl_module.log(f"val/sample_words/{control}", sum(counts) / len(counts), rank_zero_only=True)
        if self.reward_model:
            self._log_rewards(trainer, pl_module, model)

    def _write(self, trainer, rows: list[dict]) -> None:
        path = Path(trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as handle:  # one line per sample: a crash loses nothing written
            handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        for logger in trainer.loggers:
            write = sample_writer(logger)
            if write is not None:
                write(logger, rows, trainer.global_step)
        self._plot(trainer, rows)

    def _plot(self, trainer, rows: list[dict]) -> None:
        """The words-per-control figure, to each logger with a figure writer and as ``samples_words.png``."""
        try:
            plt = require_matplotlib()
        except ConfigError:
            if not self._warned:  # once per run: the samples and the words metric are still logged
                rank_zero_warn("SampleGenerations: no words-per-control figure without matplotlib (pip install matplotlib)")
                self._warned = True
            return
        figure = sample_words_figure(plt, words_by_control(rows), trainer.global_step)
        try:
            figure.savefig(Path(trainer.default_root_dir) / "samples_words.png", dpi=100)
            log_figure(trainer.loggers, figure, trainer.global_step, "samples/words")
        finally:
            plt.close(figure)

    def _log_rewards(self, trainer, pl_module, model) -> None:
        if self._reward is None:
            self._reward = RewardModel(self.reward_model, device=str(pl_module.device))
        datamodule = trainer.datamodule
        prompts = datamodule.validation_prompts(self.num_reward_prompts) if datamodule is not None else []
        prompts = prompts or [[{"role": "user", "content": p}] for p in self.prompts]
        for control in self._controls(pl_module):
            rewards = self._reward.score(prompts, generate_under(model, prompts, control, DecodingOptions(self.max_new_tokens)))
            pl_module.log(f"val/reward/{control}", sum(rewards) / len(rewards), rank_zero_only=True)
