"""Control vectors (contrastive activation addition): fitted from pairs, steering through forward hooks."""

from __future__ import annotations

import pytest
import torch

from meet_lightning.controls.steering import (
    ControlVector,
    choose_strength,
    decoder_layers,
    fit_control_vector,
    middle_layers,
    tokenized_sides,
)
from meet_lightning.data.rows import PreferencePair
from meet_lightning.data.tokenization import IGNORE_INDEX, collate_rows
from meet_lightning.models import build_tiny_model, build_tiny_tokenizer

PROMPT = ({"role": "user", "content": "Tell me about rivers."},)
PAIRS = [
    PreferencePair(PROMPT, "Rivers flow to the sea, carving valleys over many thousands of years.", "Water.", "length"),
    PreferencePair(PROMPT, "A river is fresh water moving downhill, fed by rain, springs and snow.", "Wet.", "length"),
]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    return build_tiny_model(tokenizer).eval(), tokenizer


def logits(lm, tokenizer):
    batch = collate_rows(tokenized_sides(tokenizer, PAIRS, 256)[0], tokenizer.pad_token_id)
    return lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_the_direction_is_the_mean_difference_of_response_states(tiny):
    lm, tokenizer = tiny
    vector = fit_control_vector(lm, tokenizer, PAIRS, layers=[0], batch_size=1)
    assert vector.layers == (0,) and vector.pairs == 2 and vector.skipped == 0
    means = []
    for rows in tokenized_sides(tokenizer, PAIRS, 256)[:2]:  # by hand: every response token of one side, layer 0
        states = []
        for row in rows:
            out = lm(input_ids=torch.tensor([row.input_ids]), output_hidden_states=True).hidden_states[1][0]
            states.append(out[torch.tensor(row.labels) != IGNORE_INDEX])
        means.append(torch.cat(states).mean(0))
    torch.testing.assert_close(vector.directions[0], means[0] - means[1], rtol=1e-4, atol=1e-5)


def test_steering_adds_only_inside_the_block(tiny):
    lm, tokenizer = tiny
    before = logits(lm, tokenizer)
    vector = ControlVector(middle_layers(lm), torch.randn(len(middle_layers(lm)), lm.config.hidden_size), 2, 0)
    with vector.steer(lm, 0.0):
        torch.testing.assert_close(logits(lm, tokenizer), before)
    with vector.steer(lm, 3.0):
        assert not torch.allclose(logits(lm, tokenizer), before)
    torch.testing.assert_close(logits(lm, tokenizer), before)  # the hooks are gone
    assert 0 < len(middle_layers(lm)) <= len(decoder_layers(lm))


def test_the_strength_is_the_strongest_within_the_likelihood_cost_and_zero_when_none_is(tiny):
    lm, tokenizer = tiny
    noise = ControlVector(middle_layers(lm), 50 * torch.randn(len(middle_layers(lm)), lm.config.hidden_size), 2, 0)
    best, scores = choose_strength(lm, tokenizer, noise, PAIRS, strengths=(1.0, 2.0), max_cost=0.0)
    assert best == 0.0 and set(scores) == {0.0, 1.0, 2.0} and min(scores[1.0], scores[2.0]) > scores[0.0]  # noise costs
    fitted = fit_control_vector(lm, tokenizer, PAIRS)
    strengths = (0.01, 0.1, 1.0, 10.0)
    best, scores = choose_strength(lm, tokenizer, fitted, PAIRS, strengths=strengths, max_cost=0.05)
    within = [s for s in scores if scores[s] <= 1.05 * scores[0.0]]
    assert best == max(within) and best in (0.0, *strengths)
    assert choose_strength(lm, tokenizer, fitted, PAIRS, strengths=strengths, max_cost=100.0)[0] == 10.0  # all allowed


def test_pairs_that_do_not_fit_are_counted_or_refused(tiny):
    lm, tokenizer = tiny
    long = PreferencePair(PROMPT, "word " * 400, "short", "length")
    assert fit_control_vector(lm, tokenizer, [*PAIRS, long], max_length=128).skipped == 1
    with pytest.raises(ValueError, match="pass a larger max_length"):
        fit_control_vector(lm, tokenizer, [long], max_length=128)
