"""``python -m meet_lightning demo``: train concise/verbose controls, then show what they do.

The report compares, on 20 held-out prompts and with one set of decoding settings for every arm: the trained
model under ``concise`` and ``verbose``; the untrained model with freshly initialised controls; and the
untrained model asked through a system prompt (what a user gets without training). Its last line is
``verbose/concise median word ratio: X.XX``.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from meet_lightning.examples import ControlSchema

DECODING = {"max_new_tokens": 256, "temperature": 0.0, "batch_size": 20}
"""Greedy, 256 new tokens: the same for every arm (asserted in :func:`generate_arm`)."""

SYSTEM_PROMPTS = {"concise": "Be as concise as possible.", "verbose": "Always answer with as much detail as possible."}


def heldout_prompts() -> list[str]:
    """The 20 held-out demo prompts (package data, no answers)."""
    text = (resources.files("meet_lightning") / "demo_data" / "length_heldout.jsonl").read_text()
    return [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]


def words(text: str) -> int:
    """Whitespace word count."""
    return len(text.split())


def median_ratio(verbose: Sequence[str], concise: Sequence[str]) -> float:
    """Median over prompts of ``words(verbose) / max(words(concise), 1)``."""
    return statistics.median(words(v) / max(words(c), 1) for v, c in zip(verbose, concise, strict=True))


def bootstrap_median_ratio(
    verbose: Sequence[str], concise: Sequence[str], samples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile bootstrap interval of :func:`median_ratio`, resampling prompts."""
    ratios = [words(v) / max(words(c), 1) for v, c in zip(verbose, concise, strict=True)]
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(samples))
    return medians[int(0.025 * samples)], medians[int(0.975 * samples) - 1]


def repeated_4gram_share(texts: Sequence[str]) -> float:
    """Share of 4-grams that repeat an earlier 4-gram of the same text (degenerate loops score high)."""
    repeated = total = 0
    for text in texts:
        tokens = text.lower().split()
        grams = Counter(tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3))
        total += sum(grams.values())
        repeated += sum(n - 1 for n in grams.values())
    return repeated / total if total else 0.0


def generate_arm(model: Any, prompts: Sequence[Any], control: Any, **decoding: Any) -> list[str]:
    """One arm of the comparison; refuses decoding settings other than :data:`DECODING`."""
    assert decoding == DECODING, f"every arm must decode with {DECODING}, got {decoding}"
    return model.generate(list(prompts), control=control, **decoding)


def untrained_model(recipe: dict[str, Any], schema: ControlSchema) -> Any:
    """The base model with freshly initialised controls (what stage 1 starts from), in bf16."""
    import torch

    from meet_lightning.export import AlignedModel
    from meet_lightning.models import load_model, load_tokenizer
    from meet_lightning.modules.base import build_control

    lm = load_model(recipe["model_name_or_path"], torch.bfloat16)
    tokenizer = load_tokenizer(recipe["model_name_or_path"])
    control = build_control(recipe["control"])
    control.setup(lm, tokenizer, schema)
    return AlignedModel(lm, tokenizer, control, schema)


def report(recipe: dict[str, Any], log=print) -> float:
    """Generates every arm and prints the comparison; returns the trained median ratio."""
    from meet_lightning.export import AlignedModel

    prompts = heldout_prompts()
    trained = AlignedModel.from_pretrained(Path(recipe["output_dir"]) / "export", dtype="bfloat16")
    started = time.perf_counter()
    concise = generate_arm(trained, prompts, "concise", **DECODING)
    verbose = generate_arm(trained, prompts, "verbose", **DECODING)
    base = untrained_model(recipe, trained.schema)
    base_concise = generate_arm(base, prompts, "concise", **DECODING)
    base_verbose = generate_arm(base, prompts, "verbose", **DECODING)
    asked = {
        name: [[{"role": "system", "content": text}, {"role": "user", "content": p}] for p in prompts]
        for name, text in SYSTEM_PROMPTS.items()
    }
    asked_concise = generate_arm(base, asked["concise"], None, **DECODING)
    asked_verbose = generate_arm(base, asked["verbose"], None, **DECODING)
    seconds = time.perf_counter() - started

    for prompt, short, long in list(zip(prompts, concise, verbose, strict=True))[:3]:
        log(f"\n### {prompt}\n[concise, {words(short)} words] {short}\n[verbose, {words(long)} words] {long}")
    ratio = median_ratio(verbose, concise)
    low, high = bootstrap_median_ratio(verbose, concise)
    log(f"\ngeneration: 6 arms × {len(prompts)} held-out prompts, {DECODING} — {seconds:.0f} s")
    log(
        f"median words, trained: concise {statistics.median(map(words, concise))}, verbose {statistics.median(map(words, verbose))}"
    )
    log(
        f"untrained controls (same settings):      verbose/concise median word ratio {median_ratio(base_verbose, base_concise):.2f}"
    )
    log(
        f"untrained model asked by system prompt:  verbose/concise median word ratio {median_ratio(asked_verbose, asked_concise):.2f}"
    )
    log(f"repeated 4-grams in trained verbose answers: {100 * repeated_4gram_share(verbose):.1f} % (target ≤ 10 %)")
    log(f"trained ratio 95 % bootstrap interval: [{low:.2f}, {high:.2f}]")
    log(f"verbose/concise median word ratio: {ratio:.2f}")
    return ratio


def demo_command(argv: Sequence[str]) -> int:
    """``demo [fit flags]``: fit ``configs/demo.yaml`` (resumes; finished stages are skipped), then report."""
    from meet_lightning import pipeline
    from meet_lightning.cli import parse_recipe

    argv = list(argv)
    if "--config" not in argv:
        argv = ["--config", "configs/demo.yaml", *argv]
    recipe, cfg = parse_recipe("fit", argv)
    started = time.perf_counter()
    pipeline.fit(recipe, overwrite=cfg.overwrite, ckpt_path=cfg.ckpt_path)
    print(f"training: {time.perf_counter() - started:.0f} s (both stages, including loading and validation)")
    report(recipe)
    return 0
