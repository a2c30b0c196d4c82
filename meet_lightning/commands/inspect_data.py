"""``inspect-data``: what a data file turns into. The tool to run when data "doesn't work"."""

from __future__ import annotations

from collections import Counter
from statistics import quantiles

from meet_lightning.data.cache import DataSpec, TokenizedData, prepare_tokenized
from meet_lightning.data.formats import SourceConfig, read_source
from meet_lightning.data.heldout import DUPLICATES, drop_duplicates
from meet_lightning.data.rows import ParsedSource
from meet_lightning.models import load_tokenizer
from meet_lightning.stats import words

PERCENTILES = (50, 90, 95, 99)


def length_percentiles(lengths: list[int]) -> dict[str, int]:
    """``{"p50": …, "p90": …, "p95": …, "p99": …, "max": …}`` of ``lengths``."""
    if len(lengths) < 2:
        return {"max": max(lengths, default=0)}
    cuts = quantiles(lengths, n=100, method="inclusive")
    return {**{f"p{p}": round(cuts[p - 1]) for p in PERCENTILES}, "max": max(lengths)}


def example_lengths(
    parsed: ParsedSource, source: SourceConfig, model: str | None, max_length: int, cache_dir: str | None = None
) -> tuple[list[int], Counter, TokenizedData | None]:
    """Length of every example (tokens with ``model``, else whitespace words), rows too long to fit, and the cache.

    With ``model`` the rows are tokenized once into the tokenized-data cache (``cache_dir``), like a run's,
    and a second inspection of the same file reads them back.
    """
    dropped: Counter = Counter()
    if model is None:
        counts = [sum(words(m["content"]) for m in e.prompt) + words(e.response) for e in parsed.examples]
        return counts, dropped, None
    tokenizer = load_tokenizer(model)
    tokenizer.model_max_length = 1 << 30
    spec = DataSpec((source,), None, max_length, val_fraction=0.0, train_units="rows", full_lengths=True)
    prepared = prepare_tokenized(spec, tokenizer, cache_dir)
    too_long = prepared.train.lengths().count(0)
    if too_long:
        dropped[f"response longer than max_length {max_length}"] += too_long
    return prepared.train.column("full_length"), dropped, prepared


def inspect_data(source: SourceConfig, model: str | None = None, max_length: int = 512, cache_dir: str | None = None) -> str:
    """A plain-text report: format, rows, examples per control, drops with reasons, exact duplicates (a run drops
    them), length percentiles, the cache."""
    parsed = read_source(source)
    duplicates = drop_duplicates(parsed).skipped[DUPLICATES]
    path, format = source.path, source.format
    lengths, too_long, prepared = example_lengths(parsed, source, model, max_length, cache_dir)
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
        *([f"duplicates: {duplicates} records repeat an earlier one exactly (a run drops them)"] if duplicates else []),
    ]
    if model:
        lines += [f"too long to train at max_length {max_length}: {sum(too_long.values())}"]
    lines += [f"length in {unit}: " + ", ".join(f"{k} {v}" for k, v in length_percentiles(lengths).items())]
    if prepared is None:
        lines += ["cache:     none (lengths in words; --model tokenizes through the tokenized-data cache)"]
    else:
        how = f"built in {prepared.seconds:.1f} s" if prepared.built else f"reused, loaded in {prepared.seconds:.2f} s"
        lines += [f"cache:     {prepared.path} ({how})"]
    return "\n".join(lines)
