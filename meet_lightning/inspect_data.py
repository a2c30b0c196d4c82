"""``inspect-data``: what a data file turns into. The tool to run when data "doesn't work"."""

from __future__ import annotations

from collections import Counter
from statistics import quantiles

from meet_lightning.examples import ControlSchema, ParsedSource
from meet_lightning.formats import SourceConfig, read_source
from meet_lightning.models import load_tokenizer
from meet_lightning.stats import words
from meet_lightning.tokenization import PromptTokenizer

PERCENTILES = (50, 90, 95, 99)


def length_percentiles(lengths: list[int]) -> dict[str, int]:
    """``{"p50": …, "p90": …, "p95": …, "p99": …, "max": …}`` of ``lengths``."""
    if len(lengths) < 2:
        return {"max": max(lengths, default=0)}
    cuts = quantiles(lengths, n=100, method="inclusive")
    return {**{f"p{p}": round(cuts[p - 1]) for p in PERCENTILES}, "max": max(lengths)}


def example_lengths(parsed: ParsedSource, model: str | None, max_length: int) -> tuple[list[int], Counter]:
    """Length of every example (tokens with ``model``, else whitespace words) and rows too long to fit."""
    dropped: Counter = Counter()
    if model is None:
        counts = [sum(words(m["content"]) for m in e.prompt) + words(e.response) for e in parsed.examples]
        return counts, dropped
    tokenizer = load_tokenizer(model)
    tokenizer.model_max_length = 1 << 30
    untruncated = PromptTokenizer(tokenizer, 1 << 30)
    fitted = PromptTokenizer(tokenizer, max_length)
    schema = ControlSchema.from_dict(parsed.preferences())
    lengths = []
    for example in parsed.examples:
        lengths.append(len(untruncated.tokenize(example, schema).input_ids))
        if fitted.tokenize(example, schema) is None:
            dropped[f"response longer than max_length {max_length}"] += 1
    return lengths, dropped


def inspect_data(source: SourceConfig, model: str | None = None, max_length: int = 512) -> str:
    """A plain-text report: format, rows, examples per control, drops with reasons, length percentiles."""
    parsed = read_source(source)
    path, format = source.path, source.format
    lengths, too_long = example_lengths(parsed, model, max_length)
    per_control = Counter(f"{p}/{c}" for e in parsed.examples for p, c in e.controls.items())
    unit = f"tokens ({model}, chat template)" if model else "whitespace words"
    lines = [
        f"file:      {path}",
        f"format:    {parsed.format}" + ("  (detected)" if format == "auto" else ""),
        f"rows read: {parsed.rows_read}",
        f"pairs:     {len(parsed.pairs)}",
        f"examples:  {len(parsed.examples)}",
        *(f"  {name}: {count}" for name, count in sorted(per_control.items())),
        f"skipped:   {sum(parsed.skipped.values())}",
        *(f"  {reason}: {count}" for reason, count in parsed.skipped.most_common()),
        *([f"warnings:  {sum(parsed.warnings.values())}"] if parsed.warnings else []),
        *(f"  {reason}: {count}" for reason, count in parsed.warnings.most_common()),
    ]
    if model:
        lines += [f"too long to train at max_length {max_length}: {sum(too_long.values())}"]
    lines += [f"length in {unit}: " + ", ".join(f"{k} {v}" for k, v in length_percentiles(lengths).items())]
    return "\n".join(lines)
