"""Control implementations: one parametrized suite over every ControlTokens class, plus the splice."""

from __future__ import annotations

import pytest
import torch

from meet_lightning.controls.tokens import (
    LoRAControl,
    PromptTuningControl,
    SpecialTokenControl,
    TextControl,
    controlled_response_logps,
    splice,
)
from meet_lightning.data.rows import ControlledExample, ControlSchema
from meet_lightning.data.tokenization import PromptTokenizer, collate_rows
from meet_lightning.inference.generation import DecodingOptions, generate_responses
from meet_lightning.models import build_tiny_model, build_tiny_tokenizer

SCHEMA = ControlSchema.from_dict({"harmless": ["good", "bad"], "length": ["concise", "verbose"]})
PHRASES = {"good": "A good answer:", "bad": "A bad answer:", "concise": "Briefly:", "verbose": "In detail:"}

CONTROLS = {
    "prompt_prefix": lambda: PromptTuningControl(num_tokens=3, init="vocab", placement="prefix"),
    "prompt_infix": lambda: PromptTuningControl(num_tokens=2, init="random", placement="infix"),
    "prompt_text_init": lambda: PromptTuningControl(num_tokens=4, init="text", init_text=PHRASES),
    "lora": lambda: LoRAControl(rank=2, target_modules=["q_proj", "v_proj"]),
    "text": lambda: TextControl(phrases=PHRASES),
    "special_token": lambda: SpecialTokenControl(),
}


def test_splice_inserts_at_each_rows_position_and_keeps_right_padding():
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.tensor([[-100, 2, 3, -100], [-100, 5, -100, -100]])
    inserts = torch.tensor([[-1, -2], [-3, 9]])
    out_ids, out_mask, out_labels = splice(ids, mask, labels, torch.tensor([1, 0]), inserts, torch.tensor([2, 1]), pad_id=0)
    assert out_ids.tolist() == [[1, -1, -2, 2, 3, 0], [-3, 4, 5, 0, 0, 0]]
    assert out_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]]
    assert out_labels.tolist() == [[-100, -100, -100, 2, 3, -100], [-100, -100, 5, -100, -100, -100]]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def make_batch(tokenizer, controls_per_row):
    encoder = PromptTokenizer(tokenizer, max_length=96)
    rows = []
    for i, controls in enumerate(controls_per_row):
        prompt = ({"role": "user", "content": f"Question number {i}: how are you?"},)
        rows.append(encoder.tokenize(ControlledExample(prompt, f"Fine, thanks {'!' * i}", controls), SCHEMA))
    return collate_rows(rows, tokenizer.pad_token_id)


def built(name, tokenizer, seed=0):
    lm = build_tiny_model(tokenizer, seed=seed).eval()
    control = CONTROLS[name]()
    control.setup(lm, tokenizer, SCHEMA)
    with torch.no_grad():  # move every parameter off its initial value (LoRA's B starts at zero)
        for p in control.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return lm, control


@pytest.mark.parametrize("name", CONTROLS)
def test_controls_change_the_output(name, tokenizer):
    lm, control = built(name, tokenizer)
    batch = make_batch(tokenizer, [{"harmless": "good"}, {"harmless": "bad"}])
    with torch.no_grad():
        with_controls, mask = controlled_response_logps(lm, control, batch)
        without, mask_without = controlled_response_logps(lm, control, batch, torch.full_like(batch["control_ids"], -1))
    assert mask.sum() == mask_without.sum() == (batch["labels"] != -100).sum()
    assert not torch.allclose(with_controls[mask], without[mask_without])


@pytest.mark.parametrize("name", CONTROLS)
def test_mixed_batch_equals_one_row_at_a_time(name, tokenizer):
    lm, control = built(name, tokenizer)
    rows = [{"harmless": "good"}, {"harmless": "bad", "length": "verbose"}, {}, {"length": "concise"}]
    batch = make_batch(tokenizer, rows)
    with torch.no_grad():
        mixed = controlled_response_logps(lm, control, batch)
        mixed_sums = (mixed[0] * mixed[1]).sum(-1)
        for i in range(len(rows)):
            alone = {k: v[i : i + 1] for k, v in batch.items()}  # the same row in a batch of one
            single = controlled_response_logps(lm, control, alone)
            assert torch.allclose((single[0] * single[1]).sum(), mixed_sums[i], atol=1e-4)


@pytest.mark.parametrize("name", CONTROLS)
def test_gradients_reach_only_the_controls_of_the_batch(name, tokenizer):
    lm, control = built(name, tokenizer)
    lm.requires_grad_(False)
    batch = make_batch(tokenizer, [{"harmless": "good"}, {"harmless": "good"}])
    if name == "text":
        assert list(control.parameters()) == []  # phrases are plain tokens: nothing of their own to train
        return
    token_logps, mask = controlled_response_logps(lm, control, batch)
    (-(token_logps * mask).sum()).backward()
    grads = [p.grad for p in control.parameters()]
    assert all(g is not None for g in grads) and sum(g.norm() for g in grads) > 0
    good = SCHEMA.control_id("harmless", "good")
    for p in control.parameters():  # rows were all "good": every other control's slice gets no gradient
        others = torch.cat([p.grad[:good], p.grad[good + 1 :]])
        assert torch.count_nonzero(others) == 0 and torch.count_nonzero(p.grad[good]) > 0


@pytest.mark.parametrize("name", CONTROLS)
def test_generation_with_cache_equals_without_and_mixed_equals_single(name, tokenizer):
    lm, control = built(name, tokenizer)
    prompts = [[{"role": "user", "content": "Say hi"}], [{"role": "user", "content": "Tell me a longer story please"}]]
    ids = [SCHEMA.encode({"harmless": "good"}), SCHEMA.encode({"harmless": "bad", "length": "concise"})]
    mixed = generate_responses(lm, tokenizer, control, prompts, ids, DecodingOptions(max_new_tokens=8))
    singles = [
        generate_responses(lm, tokenizer, control, [p], [i], DecodingOptions(max_new_tokens=8))[0]
        for p, i in zip(prompts, ids, strict=True)
    ]
    assert mixed == singles
    lm.generation_config.use_cache = False
    assert generate_responses(lm, tokenizer, control, prompts, ids, DecodingOptions(max_new_tokens=8)) == mixed
    lm.generation_config.use_cache = True
    assert generate_responses(lm, tokenizer, control, prompts, ids, DecodingOptions(max_new_tokens=8, cache="static")) == mixed


def test_decoding_options_name_a_bad_kv_cache():
    assert DecodingOptions(cache="paged").problems("--predict.") == ["--predict.cache 'paged' must be dynamic or static"]
    assert DecodingOptions(cache="static").problems() == []


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (lambda: PromptTuningControl(num_tokens=0), "num_tokens"),
        (lambda: PromptTuningControl(init="zeros"), "init"),
        (lambda: PromptTuningControl(placement="middle"), "placement"),
        (lambda: LoRAControl(rank=0), "rank"),
        (lambda: TextControl(phrases={}), "phrases"),
    ],
)
def test_bad_control_arguments_name_the_argument(bad, fragment):
    with pytest.raises(ValueError, match=fragment):
        bad()
