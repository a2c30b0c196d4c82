"""Offline evaluation of an exported (or plain Hugging Face) model on pairwise data.

Metrics are named by their scorer: ``control_accuracy`` is MEET's control classifier
``log p(y|x, good) − log p(y|x, bad)`` (control-token models only); ``logp_accuracy`` and ``chosen_nll`` score
every model in its preferred mode (its ``good`` control, or plain). Each comes with a bootstrap 95 % interval
and the number of pairs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from meet_lightning.control import ControlTokens, controlled_response_logps
from meet_lightning.data import PromptTokenizer, collate_pairs
from meet_lightning.errors import ConfigError, DataError
from meet_lightning.examples import ControlSchema, PreferencePair
from meet_lightning.formats import SourceConfig, read_source
from meet_lightning.losses import control_classifier_scores, pairwise_accuracy, sequence_logps


def bootstrap_interval(values: Sequence[float], samples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the mean of ``values``."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(samples))
    return means[int(0.025 * samples)], means[int(0.975 * samples) - 1]


def summarize(name: str, values: Sequence[float]) -> dict[str, Any]:
    """``{name: mean, name_ci95: [lo, hi], "pairs": n}``."""
    mean = sum(values) / len(values) if values else float("nan")
    return {name: mean, f"{name}_ci95": list(bootstrap_interval(values)), "pairs": len(values)}


@torch.no_grad()
def score_pairs(
    lm: torch.nn.Module,
    tokenizer: Any,
    control: ControlTokens,
    schema: ControlSchema,
    pairs: Sequence[PreferencePair],
    max_length: int = 512,
    batch_size: int = 8,
) -> tuple[dict[str, list[float]], int]:
    """Per-pair scores: control margin/accuracy (when the model has the pair's controls), log-prob accuracy and
    chosen per-token NLL in the model's preferred mode; and the number of pairs too long to score."""
    encoder = PromptTokenizer(tokenizer, max_length)
    has_controls = bool(schema.num_controls)
    out: dict[str, list[float]] = {"control_accuracy": [], "control_margin": [], "logp_accuracy": [], "chosen_nll": []}
    too_long = 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows = [tuple(encoder.tokenize(e, schema if has_controls else ControlSchema({})) for e in p.examples()) for p in chunk]
        too_long += sum(None in r for r in rows)
        rows = [r for r in rows if None not in r]
        if not rows:
            continue
        batch = collate_pairs(rows, tokenizer.pad_token_id)
        n = len(rows)
        good = torch.cat([batch["control_ids"][:n], batch["control_ids"][:n]])  # both responses under "good"
        token_logps, mask = controlled_response_logps(lm, control, batch, good)
        per_token = sequence_logps(token_logps, mask, average=True)  # (2B,) preferred mode
        out["logp_accuracy"] += pairwise_accuracy(per_token[:n], per_token[n:]).tolist()
        out["chosen_nll"] += (-per_token[:n]).tolist()
        if has_controls:
            own = sequence_logps(*controlled_response_logps(lm, control, batch))
            other = sequence_logps(
                *controlled_response_logps(lm, control, batch, torch.cat([batch["control_ids"][n:], batch["control_ids"][:n]]))
            )
            chosen = control_classifier_scores(own[:n], other[:n])
            rejected = control_classifier_scores(other[n:], own[n:])
            out["control_accuracy"] += pairwise_accuracy(chosen, rejected).tolist()
            out["control_margin"] += (chosen - rejected).tolist()
    return {k: v for k, v in out.items() if v}, too_long


def load_for_evaluation(folder: str) -> tuple[torch.nn.Module, Any, ControlTokens, ControlSchema]:
    """An export folder (with controls) or any plain Hugging Face causal LM (no controls)."""
    from meet_lightning.export import SCHEMA_FILE, AlignedModel
    from meet_lightning.models import load_model, load_tokenizer

    if (Path(folder) / SCHEMA_FILE).is_file():
        model = AlignedModel.from_pretrained(folder)
        return model.lm, model.tokenizer, model.control, model.schema
    return load_model(folder).eval(), load_tokenizer(folder), ControlTokens(), ControlSchema({})


def evaluate_model(
    folder: str, source: SourceConfig, max_pairs: int | None = None, max_length: int = 512, batch_size: int = 8
) -> dict[str, Any]:
    """Every metric for ``folder`` on the pairs of ``source``."""
    lm, tokenizer, control, schema = load_for_evaluation(folder)
    parsed = read_source(source)
    pairs = parsed.pairs[:max_pairs]
    if not pairs:
        raise DataError(f"{source.path}: no pairs to evaluate — evaluate needs pairwise data (chosen/rejected)")
    missing = {p.preference for p in pairs} - set(schema.preferences) if schema.num_controls else set()
    if missing:
        raise ConfigError(
            f"the model has no preference {sorted(missing)[0]!r} (it has {', '.join(schema.preferences)}) — pass --data.preference with one of them"
        )
    scores, too_long = score_pairs(lm, tokenizer, control, schema, pairs, max_length, batch_size)
    metrics: dict[str, Any] = {"model": folder, "data": source.path, "pairs_skipped_too_long": too_long}
    for name, values in scores.items():
        summary = summarize(name, values)
        metrics[name], metrics[f"{name}_ci95"], metrics["pairs"] = summary[name], summary[f"{name}_ci95"], summary["pairs"]
    return metrics


def evaluate_command(argv: Sequence[str]) -> int:
    """``evaluate --model DIR --data.path FILE [--data.format NAME] [--output FILE.json]``."""
    from meet_lightning.cli import OneLineParser

    parser = OneLineParser(prog="meet_lightning evaluate", description="score a model on pairwise data")
    parser.add_argument("--model", type=str, required=True, help="export/ folder or a plain Hugging Face model")
    parser.add_argument("--data.path", type=str, required=True)
    parser.add_argument("--data.format", type=str, default="auto")
    parser.add_argument("--data.preference", type=str | None, default=None)
    parser.add_argument("--data.max_length", type=int, default=512)
    parser.add_argument("--max_pairs", type=int | None, default=None, help="score only the first N pairs")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--output", type=str | None, default=None, help="also write the metrics as JSON here")
    args = parser.parse_args(list(argv))
    source = SourceConfig(path=args.data.path, format=args.data.format, preference=args.data.preference)
    metrics = evaluate_model(args.model, source, args.max_pairs, args.data.max_length, args.batch_size)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 0
