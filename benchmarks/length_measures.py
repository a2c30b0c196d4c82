"""The length task's measures, apart from the runs that feed them (``compare.py --task length``).

- The primary statistic is the geometric mean over prompts of verbose ÷ concise words (the mean per-prompt log
  ratio, exponentiated): unlike the median it uses every prompt, and a ratio and its inverse weigh alike.
- Over several seeds the interval resamples prompts *and* seeds (:func:`pooled_interval`): a seed is a whole
  training run (data order, control initialisation, decoding), the variance a user meets when training again.
- The cap: an answer that reaches ``max_new_tokens`` was cut, so a capped verbose answer understates the ratio;
  :func:`cap_share` reports how many did, and :func:`ceiling_ratio` the data's own answers under the same cap —
  the most any arm can show.
- The quality guard: each answer's per-token NLL under the untrained base (:func:`answer_nll`), so a ratio
  bought with rambling shows as a higher NLL, beside the repeated-4-gram share.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from meet_lightning.stats import MIN_ITEMS, enough_items, repeated_4gram_share, word_ratios, words


def log_ratios(verbose: Sequence[str], concise: Sequence[str]) -> np.ndarray:
    """Per prompt ``log(words(verbose) / words(concise))``; NaN where ``word_ratios`` has none (empty answers)."""
    ratios = np.array(word_ratios(verbose, concise), dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ratios > 0, np.log(ratios), np.nan)


def pooled_interval(values: np.ndarray, samples: int = 2000, seed: int = 0) -> list[float | None]:
    """``[estimate, low, high]`` of the mean of ``values`` (seeds × prompts), a 95 % interval over both.

    Each bootstrap draw resamples seeds, then prompts (the same prompts for every seed, as they are the same
    prompts); NaN entries (no ratio) are left out of each mean. With one seed it is the prompt bootstrap. Below
    ``MIN_ITEMS`` prompts with a value (in the sparsest seed) there is no interval: ``[estimate, None, None]``.
    """
    values = np.atleast_2d(np.asarray(values, dtype=float))
    n_seeds, n_prompts = values.shape
    if not enough_items(int(np.isfinite(values).sum(1).min())):
        return [float(np.nanmean(values)), None, None]
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, n_seeds, (samples, n_seeds)) if n_seeds > 1 else np.zeros((samples, 1), dtype=int)
    prompt_draws = rng.integers(0, n_prompts, (samples, n_prompts))
    with warnings.catch_warnings():  # a resample of undefined ratios only has no mean: left out
        warnings.simplefilter("ignore", RuntimeWarning)
        means = np.array([np.nanmean(values[s][:, p]) for s, p in zip(seed_draws, prompt_draws, strict=True)])
    low, high = np.nanpercentile(means, [2.5, 97.5])
    return [float(np.nanmean(values)), float(low), float(high)]


def geometric_ratio(log_values: np.ndarray) -> list[float]:
    """``[ratio, low, high]``: the geometric-mean ratio over seeds and prompts with its pooled interval."""
    return [None if v is None else float(np.exp(v)) for v in pooled_interval(log_values)]


def per_seed_verdicts(differences: np.ndarray, samples: int = 2000) -> list[str]:
    """For each seed's row of paired per-prompt differences: ``wins``/``loses``/``tie`` by its prompt interval."""
    out = []
    for row in np.atleast_2d(differences):
        _, low, high = pooled_interval(row[None, :], samples)
        out.append(f"n/a (n < {MIN_ITEMS})" if low is None else "tie" if low <= 0 <= high else "wins" if low > 0 else "loses")
    return out


def cap_share(token_counts: Sequence[int], max_new_tokens: int) -> float:
    """Share of answers that used every allowed new token (cut by the cap, not ended by the model)."""
    return float(np.mean([n >= max_new_tokens for n in token_counts])) if token_counts else float("nan")


def new_token_counts(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Tokens per answer, counted by re-encoding its text (the count generation spent, ±1 at the edges)."""
    return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def capped(tokenizer: Any, text: str, max_new_tokens: int) -> str:
    """``text`` cut to its first ``max_new_tokens`` tokens, as a generation with that cap would have ended."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_new_tokens]
    return tokenizer.decode(ids, skip_special_tokens=True)


def ceiling_ratio(tokenizer: Any, rows: Sequence[dict[str, str]], max_new_tokens: int) -> dict[str, Any]:
    """The data's own verbose ÷ concise answers, each cut at the cap: the ratio no arm can much exceed, and the
    repeated-4-gram share of its verbose answers (what the report's loop line is read against)."""
    verbose = [capped(tokenizer, r["verbose"], max_new_tokens) for r in rows]
    concise = [capped(tokenizer, r["concise"], max_new_tokens) for r in rows]
    uncut = log_ratios([r["verbose"] for r in rows], [r["concise"] for r in rows])
    return {
        "ratio": geometric_ratio(log_ratios(verbose, concise)[None, :]),
        "uncapped_ratio": geometric_ratio(uncut[None, :]),
        "verbose_cap_share": cap_share(new_token_counts(tokenizer, [r["verbose"] for r in rows]), max_new_tokens),
        "median_words": [float(np.median([words(t) for t in concise])), float(np.median([words(t) for t in verbose]))],
        "repeated_4grams": repeated_4gram_share(verbose),
    }


def answer_nll(lm: Any, tokenizer: Any, prompts: Sequence[str], texts: Sequence[str], batch_size: int = 8) -> list[float]:
    """Per-token NLL of each answer under ``lm`` with no control (the quality guard; NaN for an empty answer).

    The answer is scored as the assistant turn after the plain user prompt, in the chat template the model was
    trained with; the prompt's tokens are context only.
    """
    import torch

    from meet_lightning.controls.tokens import plain_logps
    from meet_lightning.data.rows import ControlledExample, ControlSchema
    from meet_lightning.data.tokenization import PromptTokenizer, collate_rows

    encoder, schema = PromptTokenizer(tokenizer, max_length=4096), ControlSchema.from_dict({})
    rows = [
        encoder.tokenize(ControlledExample(({"role": "user", "content": p},), t, {}), schema)
        for p, t in zip(prompts, texts, strict=True)
    ]
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate_rows(rows[start : start + batch_size], tokenizer.pad_token_id)
            token_logps, mask = plain_logps(lm, batch, fp32_head=True)  # (B, T-1)
            counts = mask.sum(-1)
            out += [float(-(lp * m).sum() / n) if n else float("nan") for lp, m, n in zip(token_logps, mask, counts, strict=True)]
    return out


# ------------------------------------------------------------------------------------- several seeds
def arm_summary(seed_scores: Sequence[dict[str, Any]], max_new_tokens: int) -> dict[str, Any]:
    """One arm over its seeds: the geometric ratio pooled over seeds and prompts, each seed's own ratio, the
    cap share and the quality guard (means over seeds and answers). ``seed_scores``: one scores dict per seed
    (``concise``/``verbose`` answers, optional ``new_tokens``, ``base_nll`` and ``pairs``)."""
    from meet_lightning.stats import repeated_4gram_share

    if not all("verbose" in s for s in seed_scores):
        return {"seeds": len(seed_scores)}
    logs = np.array([log_ratios(s["verbose"], s["concise"]) for s in seed_scores])  # (seeds, prompts)
    out: dict[str, Any] = {
        "seeds": len(seed_scores),
        "geo_ratio": geometric_ratio(logs),
        "geo_ratio_per_seed": [geometric_ratio(row[None, :])[0] for row in logs],
        "median_ratio_per_seed": [float(np.exp(np.nanmedian(row))) for row in logs],
        "repeated_4grams": float(np.mean([repeated_4gram_share(s["verbose"]) for s in seed_scores])),
    }
    if all("new_tokens" in s for s in seed_scores):
        out["cap_share"] = {c: float(np.mean([cap_share(s["new_tokens"][c], max_new_tokens) for s in seed_scores]))
                            for c in ("concise", "verbose")}  # fmt: skip
    if all("base_nll" in s for s in seed_scores):
        out["base_nll"] = {c: pooled_interval(np.array([s["base_nll"][c] for s in seed_scores])) for c in ("concise", "verbose")}
    accuracy = [s["pairs"]["control_accuracy"] for s in seed_scores if (s.get("pairs") or {}).get("control_accuracy")]
    if len(accuracy) == len(seed_scores):
        out["control_accuracy"] = pooled_interval(np.array(accuracy))
    return out


def paired_across_seeds(reference: Sequence[dict[str, Any]], other: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Reference minus ``other`` in log ratio, seed by seed on the same prompts, pooled with its interval.

    ``wins``/``loses`` only where the pooled interval excludes 0 *and* every seed's own difference points the same
    way; ``mixed`` where the pooled interval excludes 0 but a seed disagrees; ``tie`` otherwise. Seeds pair up in
    order (seed k of both arms); the shorter list decides how many.
    """
    pairs = [(r, o) for r, o in zip(reference, other, strict=False) if "verbose" in r and "verbose" in o]
    if not pairs:
        return None
    diffs = np.array([log_ratios(r["verbose"], r["concise"]) - log_ratios(o["verbose"], o["concise"]) for r, o in pairs])
    estimate, low, high = pooled_interval(diffs)
    per_seed = [float(np.nanmean(row)) for row in diffs]
    if low is None:
        word = f"n/a (n < {MIN_ITEMS})"
    elif low <= 0 <= high:
        word = "tie"
    elif all((d > 0) == (low > 0) for d in per_seed):
        word = "wins" if low > 0 else "loses"
    else:
        word = "mixed"
    return {
        "log_ratio_difference": [estimate, low, high],
        "ratio_factor": [None if v is None else float(np.exp(v)) for v in (estimate, low, high)],
        "per_seed": per_seed,
        "per_seed_verdicts": per_seed_verdicts(diffs),
        "verdict": word,
    }


def _cell(values: Sequence[float | None] | None, digits: int = 2) -> str:
    if not values:
        return "–"
    if values[1] is None:
        return f"{values[0]:.{digits}f} [n/a, n < {MIN_ITEMS}]"
    return f"{values[0]:.{digits}f} [{values[1]:.{digits}f}, {values[2]:.{digits}f}]"


def seeds_table(summaries: dict[str, dict[str, Any]], labels: dict[str, str], ceiling: dict[str, Any] | None) -> str:
    """Markdown: one row per arm pooled over its seeds, the data's own ceiling, then MEET minus each arm."""
    head = ("| arm | seeds | geometric-mean ratio [95 % CI, prompts × seeds] | per seed | verbose answers at the cap "
            "| base NLL/token verbose · concise | repeated 4-grams | control_accuracy |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, m in summaries.items():
        per_seed = ", ".join(f"{v:.2f}" for v in m.get("geo_ratio_per_seed", [])) or "–"
        cap = f"{100 * m['cap_share']['verbose']:.0f} %" if "cap_share" in m else "–"
        nll = " · ".join(f"{m['base_nll'][c][0]:.2f}" for c in ("verbose", "concise")) if "base_nll" in m else "–"
        loops = f"{100 * m['repeated_4grams']:.1f} %" if "repeated_4grams" in m else "–"
        cells = [labels.get(name, name), str(m["seeds"]), _cell(m.get("geo_ratio")), per_seed, cap, nll, loops,
                 _cell(m.get("control_accuracy"), 3)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if ceiling:
        cap, loops = f"{100 * ceiling['verbose_cap_share']:.0f} %", f"{100 * ceiling['repeated_4grams']:.1f} %"
        lines.append(
            f"| the data's own answers, cut at the cap (ceiling) | – | {_cell(ceiling['ratio'])} | – | {cap} | – | {loops} | – |"
        )
    lines += ["", "Paired, MEET (prompt) ÷ each arm (geometric-mean factor, same prompts, seed k with seed k):", ""]
    lines += ["| arm | factor [95 % CI] | per seed | verdict |", "|---|---|---|---|"]
    for name, m in summaries.items():
        d = m.get("vs_reference")
        if d:
            seeds = ", ".join(f"{np.exp(v):.2f} ({w})" for v, w in zip(d["per_seed"], d["per_seed_verdicts"], strict=True))
            lines.append(f"| {labels.get(name, name)} | {_cell(d['ratio_factor'])} | {seeds} | {d['verdict']} |")
    return "\n".join(lines)
