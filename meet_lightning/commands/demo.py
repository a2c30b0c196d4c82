"""``python -m meet_lightning demo``: train concise/verbose controls, then show what they do.

The report compares, on 20 held-out prompts and with one set of decoding settings for both arms: the trained
model under ``concise`` and ``verbose``, and the untrained model asked through a system prompt (what a user gets
without training). Where the shared AlpacaEval file is there (``MEET_SHARED_DATA``, or ``../shared/data``), the
trained model also answers 20 of its real prompts, which the demo data never saw: its style carrying over (or not)
to real prompts is reported beside its own. Its last line is ``verbose/concise median word ratio: X.XX``.
"""

from __future__ import annotations

import gzip
import json
import os
import statistics
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from meet_lightning.commands.cli import parse_recipe
from meet_lightning.controls.tokens import build_control
from meet_lightning.data.rows import ControlSchema
from meet_lightning.inference.export import AlignedModel
from meet_lightning.models import load_model, load_tokenizer
from meet_lightning.precision import resolve_dtype
from meet_lightning.recipe import Recipe
from meet_lightning.stats import bootstrap_median_ratio, median_ratio, repeated_4gram_share, words
from meet_lightning.training import pipeline

DECODING = {"max_new_tokens": 160, "temperature": 0.0, "repetition_penalty": 1.2, "batch_size": 40}
"""Greedy with a mild repetition penalty, 160 new tokens: the same for every arm (asserted in
:func:`generate_arm`). A 135M model decoding greedily falls into loops on long answers; the penalty is the usual
remedy and applies to every arm alike. 160 tokens (~120 words) keep a verbose answer's first paragraphs and the
report within the demo's time in fp32 (256 tokens took ~100 s an arm on an AVX2 CPU, when every row of a batch
was decoded until its longest answer stopped)."""

SYSTEM_PROMPTS = {"concise": "Be as concise as possible.", "verbose": "Always answer with as much detail as possible."}


REAL_PROMPTS = "alpaca_eval_concise_verbose.train.jsonl.gz"
"""The shared AlpacaEval file the demo reads real prompts from, when it is there (never shipped with the package)."""


def real_prompts(count: int = 20) -> list[str]:
    """``count`` prompts of the shared AlpacaEval file (every n-th, a fixed choice), or none if the file is absent."""
    folder = Path(os.environ.get("MEET_SHARED_DATA", Path.cwd().parent / "shared" / "data"))
    path = folder / REAL_PROMPTS
    if not path.is_file():
        return []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    step = max(len(prompts) // count, 1)
    return prompts[::step][:count]


def heldout_prompts() -> list[str]:
    """The 20 held-out demo prompts (package data, no answers)."""
    text = (resources.files("meet_lightning") / "demo_data" / "length_heldout.jsonl").read_text()
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def generate_arm(model: Any, prompts: Sequence[Any], first: Any, second: Any, **decoding: Any) -> tuple[list[str], list[str]]:
    """One model's answers to every prompt under ``first`` and under ``second``, in one mixed batch.

    ``prompts`` is a list, or a pair of lists (a different prompt per side, e.g. two system prompts).
    Refuses decoding settings other than :data:`DECODING`, so no arm can be favoured.
    """
    assert decoding == DECODING, f"every arm must decode with {DECODING}, got {decoding}"
    left, right = prompts if isinstance(prompts, tuple) else (prompts, prompts)
    texts = model.generate([*left, *right], controls=[first] * len(left) + [second] * len(right), **decoding)
    return texts[: len(left)], texts[len(left) :]


def untrained_model(recipe: Recipe, schema: ControlSchema) -> Any:
    """The base model (with freshly initialised controls, which the system-prompt arm leaves unused), in the
    device's dtype."""
    lm = load_model(recipe.model_name_or_path, resolve_dtype("auto")[0])
    tokenizer = load_tokenizer(recipe.model_name_or_path)
    control = build_control(recipe.control)
    control.setup(lm, tokenizer, schema)
    return AlignedModel(lm, tokenizer, control, schema)


def report(recipe: Recipe, log=print) -> float:
    """Generates every arm and prints the comparison; returns the trained median ratio."""
    prompts = heldout_prompts()
    dtype, reason = resolve_dtype("auto")
    log(f"generation dtype: {str(dtype).removeprefix('torch.')} ({reason})")
    trained = AlignedModel.from_pretrained(recipe.out / "export", dtype="auto")
    started = time.perf_counter()
    concise, verbose = generate_arm(trained, prompts, "concise", "verbose", **DECODING)
    base = untrained_model(recipe, trained.schema)
    asked = tuple(
        [[{"role": "system", "content": SYSTEM_PROMPTS[side]}, {"role": "user", "content": p}] for p in prompts]
        for side in ("concise", "verbose")
    )
    asked_concise, asked_verbose = generate_arm(base, asked, None, None, **DECODING)
    seconds = time.perf_counter() - started

    for prompt, short, long in list(zip(prompts, concise, verbose, strict=True))[:3]:
        log(f"\n### {prompt}\n[concise, {words(short)} words] {short}\n[verbose, {words(long)} words] {long}")
    ratio = median_ratio(verbose, concise)
    interval = bootstrap_median_ratio(verbose, concise)  # None with fewer than 20 defined ratios
    log(f"\ngeneration: 2 arms × 2 sides × {len(prompts)} held-out prompts, {DECODING} — {seconds:.0f} s")
    log(
        f"median words, trained: concise {statistics.median(map(words, concise))}, verbose {statistics.median(map(words, verbose))}"
    )
    log(
        f"untrained model asked by system prompt:  verbose/concise median word ratio {median_ratio(asked_verbose, asked_concise):.2f}"
    )
    log(
        f"repeated 4-grams in verbose answers: trained {100 * repeated_4gram_share(verbose):.1f} % (target ≤ 10 %),"
        f" system prompt {100 * repeated_4gram_share(asked_verbose):.1f} %"
    )
    report_real_prompts(trained, log)
    shown = f"[{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "n/a (fewer than 20 prompts with a ratio)"
    log(f"trained ratio 95 % bootstrap interval: {shown}")
    log(f"verbose/concise median word ratio: {ratio:.2f}")
    return ratio


def report_real_prompts(trained: Any, log=print) -> None:
    """The trained model on real AlpacaEval prompts (same decoding): ratio and loops, or why it was skipped."""
    prompts = real_prompts()
    if not prompts:
        log(f"real prompts: skipped ({REAL_PROMPTS} not found; set MEET_SHARED_DATA to its folder)")
        return
    concise, verbose = generate_arm(trained, prompts, "concise", "verbose", **DECODING)
    log(
        f"real prompts ({len(prompts)} from AlpacaEval, never trained on): verbose/concise median word ratio"
        f" {median_ratio(verbose, concise):.2f}, repeated 4-grams in verbose answers {100 * repeated_4gram_share(verbose):.1f} %"
    )


def demo_command(argv: Sequence[str]) -> int:
    """``demo [fit flags]``: fit the shipped ``demo`` recipe (resumes; finished stages are skipped), then report."""
    argv = list(argv)
    if "--config" not in argv:
        argv = ["--config", "demo", *argv]
    recipe, cfg = parse_recipe("fit", argv)
    started = time.perf_counter()
    pipeline.fit(recipe, overwrite=cfg.overwrite, ckpt_path=cfg.ckpt_path)
    print(f"training: {time.perf_counter() - started:.0f} s (both stages, including loading and validation)")
    report(recipe)
    return 0
