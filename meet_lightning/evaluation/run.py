"""``evaluate``'s report: the options it takes and everything it computes, as one metrics dict.

:class:`EvaluateOptions` is the command's flags and the Python call's arguments at once (its field docstrings
are the ``--help`` text), so a notebook gets what the command prints with ``run_evaluation(EvaluateOptions(...))``.
The metrics themselves live in the modules :mod:`meet_lightning.evaluation.metrics` names (and explains); this module
only assembles them and draws plots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from meet_lightning.data.formats import SourceConfig
from meet_lightning.data.rows import Message
from meet_lightning.errors import ConfigError, DataError, raise_failed
from meet_lightning.evaluation.fidelity import DEFAULT_ATTRIBUTES, Attribute, control_fidelity, generate_under
from meet_lightning.evaluation.figures import require_matplotlib
from meet_lightning.evaluation.judges import RewardModel, import_callable, win_rate
from meet_lightning.evaluation.loading import EvalModel, load_for_evaluation, schema_model_name
from meet_lightning.evaluation.pair_scores import evaluate_pairs, preferred_mode, read_pairs
from meet_lightning.evaluation.plots import write_plots
from meet_lightning.evaluation.summary import summarize
from meet_lightning.inference.generation import DecodingOptions, read_prompt_file
from meet_lightning.models import load_model
from meet_lightning.precision import WeightsDtype


def read_generation_prompts(path: Path) -> list[dict[str, Any]]:
    """Rows of ``--fidelity_prompts``: ``prompt`` (text or messages) and an optional ``reference`` response."""
    rows = read_prompt_file(path, "--fidelity_prompts", fields=("reference",))
    for row in rows:
        if row["reference"] is not None and not isinstance(row["reference"], str):
            raise DataError(f"{path}:{row['row']}: 'reference' must be a string — fix the row")
    return rows


def parse_attributes(specs: Sequence[str]) -> dict[str, Attribute]:
    """``NAME=module:function`` specs → ``{name: function}`` (``words`` is always there)."""
    attributes = dict(DEFAULT_ATTRIBUTES)
    for spec in specs:
        name, _, target = spec.partition("=")
        if not name or not target:
            raise ConfigError(f"--attribute {spec!r} is not NAME=module:function — e.g. --attribute polite=my_attrs:politeness")
        attributes[name] = import_callable(target, "--attribute")
    return attributes


@dataclass
class EvalData:
    """Pairwise data for ``evaluate``'s pair metrics (``--data.*``)."""

    path: str | None = None
    """pairwise data for the pair metrics"""
    format: str = "auto"
    """its format (auto: detected from the rows)"""
    preference: str | None = None
    """its preference label (default: the format's)"""
    max_length: int = 512
    """longest row in tokens"""
    cache_dir: str | None = None
    """where its tokenized pairs are cached (default $HF_DATASETS_CACHE/meet_lightning)"""


@dataclass
class EvaluateOptions:
    """Everything ``evaluate`` can be asked for: the command's flags, and the Python call's arguments."""

    model: str
    """export/ folder, plain Hugging Face model folder, alias or hub id"""
    data: EvalData = field(default_factory=EvalData)
    max_pairs: int | None = None
    """score only the first N pairs"""
    batch_size: int = 8
    """pairs (or prompts) per forward"""
    good_control: str | None = None
    """preferred-mode control (default: the pair's chosen control)"""
    bad_control: str | None = None
    """the control classifier's other control"""
    reference_model: str | None = None
    """DPO reference (default: the export's base_model)"""
    fidelity_prompts: str | None = None
    """JSONL prompts: generate under every control"""
    attribute: list[str] = field(default_factory=list)
    """NAME=module:function attribute; repeat"""
    base_model: str | None = None
    """base model of the KL estimate (default: the export's)"""
    reward_model: str | None = None
    """Hugging Face sequence-classification reward model"""
    judge: str | None = None
    """win-rate judge: reward-model folder or module:function"""
    max_generations: int = 32
    """prompts answered for reward/win rate"""
    max_new_tokens: int = 64
    """longest generated response"""
    plots: str | None = None
    """write PNG plots to this folder (needs matplotlib)"""
    device: str = "cpu"
    """where the model runs"""
    dtype: WeightsDtype = "float32"
    """weights dtype; float32 by default: bf16 moves control-classifier margins by ~1.4 nats on average and flipped 8 % of pairs (docs: guides/evaluation.md); auto: bfloat16 where the device computes it natively"""
    progress: bool = True
    """show pairs scored and pairs/s on stderr"""

    def check(self) -> None:
        """ConfigError naming every bad option, before any model is loaded."""
        checks = (
            (
                not self.data.path and not self.fidelity_prompts,
                "nothing to evaluate — pass --data.path FILE and/or --fidelity_prompts FILE.jsonl",
            ),
            (
                self.plots and not self.fidelity_prompts,
                "--plots needs --fidelity_prompts FILE.jsonl (the plots show generations per control)",
            ),
            (self.batch_size < 1, f"--batch_size {self.batch_size} must be ≥ 1"),
            (self.max_new_tokens < 1, f"--max_new_tokens {self.max_new_tokens} must be ≥ 1"),
            (self.max_generations < 1, f"--max_generations {self.max_generations} must be ≥ 1"),
        )
        raise_failed(checks)
        if self.plots:
            require_matplotlib()


def evaluate_generations(
    model: EvalModel, prompts: Sequence[Sequence[Message]], references: Sequence[str | None], options: EvaluateOptions
) -> dict[str, Any]:
    """``reward_model_score`` and ``win_rate`` of the model's generations in its preferred mode."""
    mode = preferred_mode(model, options.data.preference, options.good_control)
    greedy = DecodingOptions(max_new_tokens=options.max_new_tokens, batch_size=options.batch_size)
    responses = generate_under(model, prompts, mode, greedy)
    metrics: dict[str, Any] = {"generation_mode": mode}
    if options.reward_model:
        reward = RewardModel(options.reward_model, options.device)
        metrics.update(summarize("reward_model_score", reward.score(prompts, responses), count="prompts"))
        metrics["reward_model"] = options.reward_model
    if options.judge:
        kept = [(p, r, ref) for p, r, ref in zip(prompts, responses, references, strict=True) if ref is not None]
        if not kept:
            raise ConfigError(
                "--judge needs reference responses — pass --data.path (pairs: chosen) or 'reference' in the prompts file"
            )
        ps, rs, refs = (list(x) for x in zip(*kept, strict=True))
        metrics.update(win_rate(options.judge, ps, rs, refs, options.device))
    return metrics


def run_evaluation(options: EvaluateOptions) -> dict[str, Any]:
    """Everything ``evaluate`` was asked for, as one metrics dict (the command prints this)."""
    options.check()
    attributes = parse_attributes(options.attribute)
    model = load_for_evaluation(options.model, options.device, options.dtype)
    metrics: dict[str, Any] = {
        "model": options.model,
        "dtype": str(model.lm.dtype).removeprefix("torch."),
        "kind": model.kind,
        "mode": preferred_mode(model, options.data.preference, options.good_control),
    }
    prompts: list[list[Message]] = []
    references: list[str | None] = []
    data = options.data
    if data.path:
        source = SourceConfig(path=data.path, format=data.format, preference=data.preference)
        metrics.update(
            evaluate_pairs(
                model,
                source,
                options.max_pairs,
                data.max_length,
                options.batch_size,
                options.good_control,
                options.bad_control,
                options.reference_model,
                options.progress,
                data.cache_dir,
            )
        )
        if options.reward_model or options.judge:
            pairs = read_pairs(source, options.max_generations)
            prompts, references = [list(p.prompt) for p in pairs], [p.chosen for p in pairs]
    fidelity_rows = read_generation_prompts(Path(options.fidelity_prompts)) if options.fidelity_prompts else []
    if not prompts and fidelity_rows:
        prompts = [r["prompt"] for r in fidelity_rows][: options.max_generations]
        references = [r["reference"] for r in fidelity_rows][: options.max_generations]
    if (options.reward_model or options.judge) and prompts:
        metrics.update(evaluate_generations(model, prompts, references, options))
    if fidelity_rows:
        if options.reward_model:
            attributes["reward"] = RewardModel(options.reward_model, options.device)
        metrics["fidelity"] = control_fidelity(
            model,
            [r["prompt"] for r in fidelity_rows],
            attributes,
            base=_load_base(model, options.base_model),
            max_new_tokens=options.max_new_tokens,
            batch_size=options.batch_size,
        )
        if options.plots:
            metrics["plots"] = [str(p) for p in write_plots(metrics["fidelity"], Path(options.plots))]
    return metrics


def _load_base(model: EvalModel, override: str | None) -> nn.Module:
    """The base of the KL estimate: ``override``, the export's base model, or the model itself (plain models)."""
    name = override or schema_model_name(model, "base_model", "--base_model")
    return load_model(name, model.lm.dtype).to(model.device).eval() if name else model.lm
