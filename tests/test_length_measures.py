"""benchmarks/length_measures.py: the length task's pooled statistics, cap, ceiling and quality guard."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import length_measures as lm  # noqa: E402


def test_geometric_ratio_is_the_exponentiated_mean_log_ratio():
    verbose, concise = ["a b c d", "a b", "a"] * 7, ["a b", "a b", "a b c d"] * 7  # ratios 2, 1, 1/4
    ratio, low, high = lm.geometric_ratio(lm.log_ratios(verbose, concise)[None, :])
    assert ratio == pytest.approx((2 * 1 * 0.25) ** (1 / 3))
    assert low <= ratio <= high


def test_below_twenty_prompts_there_is_no_interval_and_no_verdict():
    few = {"concise": ["a"] * 19, "verbose": ["a b c d"] * 19}
    assert lm.geometric_ratio(lm.log_ratios(few["verbose"], few["concise"])[None, :])[1:] == [None, None]
    base = {"concise": ["a"] * 19, "verbose": ["a"] * 19}
    assert lm.paired_across_seeds([few], [base])["verdict"] == "n/a (n < 20)"


def test_pooled_interval_counts_seed_to_seed_variance():
    """Two seeds that disagree: resampling seeds widens the interval that prompts alone would give."""
    rng = np.random.default_rng(0)
    values = np.stack([rng.normal(0.0, 0.1, 100), rng.normal(1.0, 0.1, 100)])  # (seeds, prompts)
    _, low, high = lm.pooled_interval(values)
    _, prompt_low, prompt_high = lm.pooled_interval(values.reshape(1, -1))  # the seeds taken as more prompts
    assert high - low > 3 * (prompt_high - prompt_low)
    assert low < 0.1 and high > 0.9


def test_pooled_interval_leaves_out_missing_ratios():
    values = np.array([[0.0, np.nan, 0.0, 0.0] * 10])  # 30 values, 10 missing
    assert lm.pooled_interval(values)[0] == 0.0


def test_paired_verdict_wins_only_when_every_seed_agrees():
    base = {"concise": ["a"] * 40, "verbose": ["a b"] * 40}  # ratio 2
    better = {"concise": ["a"] * 40, "verbose": ["a b c d"] * 40}  # ratio 4
    worse = {"concise": ["a"] * 40, "verbose": ["a"] * 40}  # ratio 1
    assert lm.paired_across_seeds([better, better], [base, base])["verdict"] == "wins"
    assert lm.paired_across_seeds([worse, worse], [base, base])["verdict"] == "loses"
    d = lm.paired_across_seeds([better] * 9 + [worse], [base] * 10)  # pooled > 0, one seed the other way
    assert d["verdict"] == "mixed" and d["per_seed_verdicts"][-1] == "loses"
    assert lm.paired_across_seeds([base], [base])["verdict"] == "tie"
    assert lm.paired_across_seeds([better], [better, base])["ratio_factor"][0] == pytest.approx(1.0)


def test_cap_share_and_the_datas_own_ceiling_under_the_same_cap():
    from meet_lightning.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    assert lm.cap_share([3, 8, 8, 2], 8) == 0.5
    long = " ".join(["word"] * 50)
    rows = [{"concise": "one two", "verbose": long}] * 4
    uncut = lm.ceiling_ratio(tokenizer, rows, max_new_tokens=10_000)
    cut = lm.ceiling_ratio(tokenizer, rows, max_new_tokens=20)
    assert uncut["ratio"][0] == pytest.approx(25.0) and uncut["verbose_cap_share"] == 0.0
    assert cut["ratio"][0] < uncut["ratio"][0] and cut["verbose_cap_share"] == 1.0
    assert cut["uncapped_ratio"][0] == pytest.approx(25.0)
    assert lm.new_token_counts(tokenizer, [lm.capped(tokenizer, long, 20)]) == [20]
    # the answers' own loop share: 50 words give 47 4-grams, 46 of them repeat the first
    assert uncut["repeated_4grams"] == pytest.approx(46 / 47)
    assert (
        lm.ceiling_ratio(tokenizer, [{"concise": "a b", "verbose": "one two three four five"}] * 4, 100)["repeated_4grams"] == 0
    )


def test_answer_nll_is_the_mean_response_token_nll_under_the_plain_prompt():
    import torch

    from meet_lightning.models import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer).eval()
    prompts, texts = ["Say hi.", "Count to three please."], ["Hi there!", "One, two, three."]
    got = lm.answer_nll(model, tokenizer, prompts, texts, batch_size=2)
    for prompt, text, value in zip(prompts, texts, got, strict=True):
        context = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        full = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}], tokenize=True, return_dict=False
        )
        ids = torch.tensor([full])
        with torch.no_grad():
            logps = model(ids).logits.float().log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        start = len(context) - 1  # logits at position t predict token t+1
        response = logps[start:]
        # the scored response ends at its end-of-turn token; the template may add a newline after it
        n = len(response) - (len(full) - len(full[: full.index(tokenizer.convert_tokens_to_ids("<|im_end|>"), len(context)) + 1]))
        assert value == pytest.approx(float(-response[:n].mean()), rel=1e-4)
