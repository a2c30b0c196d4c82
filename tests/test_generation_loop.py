"""The own decoding loop (rows leave the batch when they stop) decodes exactly as ``lm.generate``."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

from meet_lightning.controls.tokens import LoRAControl
from meet_lightning.data.rows import ControlSchema
from meet_lightning.inference import generation
from meet_lightning.inference.generation import (
    DecodingOptions,
    decode_dropping_finished,
    decoding_processors,
    generate_responses,
    repetition_penalty,
    reproduces_generation_config,
)
from meet_lightning.models import build_tiny_model, build_tiny_tokenizer

SCHEMA = ControlSchema.from_dict({"length": ["concise", "verbose"]})
ROWS = 6
STEPS = 14


@pytest.fixture(scope="module")
def lm() -> torch.nn.Module:
    return build_tiny_model(build_tiny_tokenizer(), seed=3)


def left_padded_prompts(lm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(ROWS, L, H) prompt vectors of lengths 3…8, left padded, and their (ROWS, L) mask."""
    generator = torch.Generator().manual_seed(0)
    lengths = [3 + i for i in range(ROWS)]
    ids = torch.randint(3, 200, (ROWS, max(lengths)), generator=generator)
    mask = torch.tensor([[0] * (max(lengths) - n) + [1] * n for n in lengths])
    return lm.get_input_embeddings()(ids * mask), mask


def reference(lm: torch.nn.Module, embeds, mask, o: DecodingOptions, stop: list[int]) -> list[list[int]]:
    """``lm.generate``'s new tokens per row, cut after the row's first stop id (it pads the rest), with the penalty
    :func:`generate_responses` gives it."""
    sampling = {"do_sample": True, "temperature": o.temperature, "top_p": o.top_p, "top_k": o.top_k or None}
    out = lm.generate(
        inputs_embeds=embeds,
        attention_mask=mask,
        max_new_tokens=o.max_new_tokens,
        eos_token_id=stop,
        pad_token_id=0,
        repetition_penalty=1.0,
        logits_processor=LogitsProcessorList(repetition_penalty(o)),
        **(sampling if o.temperature > 0 else {"do_sample": False, "top_p": None, "top_k": None}),
    )
    rows = []
    for row in out.tolist():
        ends = [i for i, t in enumerate(row) if t in stop]
        rows.append(row[: ends[0] + 1] if ends else row)
    return rows


def stops_that_end_rows_early(lm, embeds, mask) -> list[int]:
    """Two ids that greedy decoding emits mid-answer in some rows, so rows stop at different steps."""
    free = reference(lm, embeds, mask, DecodingOptions(max_new_tokens=STEPS), stop=[258])
    return sorted({free[0][4], free[3][9]})


@torch.no_grad()
def test_greedy_rows_that_stop_early_leave_the_batch_and_the_answers_equal_generate(lm):
    embeds, mask = left_padded_prompts(lm)
    stop = stops_that_end_rows_early(lm, embeds, mask)
    o = DecodingOptions(max_new_tokens=STEPS, repetition_penalty=1.3)
    expected = reference(lm, embeds, mask, o, stop)
    assert min(map(len, expected)) < STEPS and max(map(len, expected)) == STEPS  # early stops and a capped row

    batch_sizes = []
    hook = lm.register_forward_pre_hook(
        lambda _, args, kwargs: batch_sizes.append(len(kwargs["attention_mask"])), with_kwargs=True
    )
    try:
        answers = decode_dropping_finished(lm, embeds, mask, decoding_processors(lm, o), stop, o)
    finally:
        hook.remove()
    assert answers == expected
    # the batch shrinks as rows stop: each step computes only the rows still decoding
    assert batch_sizes[0] == ROWS and batch_sizes == sorted(batch_sizes, reverse=True) and batch_sizes[-1] < ROWS
    assert sum(batch_sizes) == sum(len(a) for a in answers)


@torch.no_grad()
def test_sampling_draws_the_same_tokens_as_generate_from_the_same_seed(lm):
    # no stop id is emitted within the cap: every step samples the whole batch, as generate does
    embeds, mask = left_padded_prompts(lm)
    o = DecodingOptions(max_new_tokens=STEPS, temperature=0.7, top_p=0.9, top_k=40, repetition_penalty=1.1)
    torch.manual_seed(11)
    expected = reference(lm, embeds, mask, o, stop=[258])
    torch.manual_seed(11)
    answers = decode_dropping_finished(lm, embeds, mask, decoding_processors(lm, o), [258], o)
    assert answers == expected and {len(a) for a in answers} == {STEPS}


@torch.no_grad()
def test_suppressed_tokens_of_the_lm_are_never_drawn(lm):
    embeds, mask = left_padded_prompts(lm)
    o = DecodingOptions(max_new_tokens=6)
    greedy = decode_dropping_finished(lm, embeds, mask, decoding_processors(lm, o), [258], o)
    lm.generation_config.suppress_tokens = sorted({row[0] for row in greedy})
    try:
        assert reproduces_generation_config(lm)
        answers = decode_dropping_finished(lm, embeds, mask, decoding_processors(lm, o), [258], o)
        assert answers == reference(lm, embeds, mask, o, stop=[258])
        assert not {row[0] for row in answers} & set(lm.generation_config.suppress_tokens)
    finally:
        lm.generation_config.suppress_tokens = None


def test_a_generation_config_the_loop_does_not_reproduce_goes_to_generate(lm):
    assert reproduces_generation_config(lm)
    before = lm.generation_config.no_repeat_ngram_size
    lm.generation_config.no_repeat_ngram_size = 3
    try:
        assert not reproduces_generation_config(lm)
    finally:
        lm.generation_config.no_repeat_ngram_size = before
    assert reproduces_generation_config(lm)


@torch.no_grad()
def test_per_row_lora_controls_follow_the_rows_still_decoding():
    # LoRA routes each row by its control: once rows leave the batch, the routing must follow the rows that stay
    tokenizer = build_tiny_tokenizer()
    lm = build_tiny_model(tokenizer, seed=5)
    control = LoRAControl(rank=2, target_modules=["q_proj", "v_proj"])
    control.build(lm, tokenizer, SCHEMA)
    for parameter in control.parameters():
        torch.nn.init.normal_(parameter, std=0.5)  # B starts at 0: give every adapter an effect
    control_ids = torch.tensor([SCHEMA.encode({"length": ["concise", "verbose"][i % 2]}) for i in range(ROWS)])
    embeds, mask = left_padded_prompts(lm)
    o = DecodingOptions(max_new_tokens=STEPS)

    def alone(i: int, stop: list[int]) -> list[int]:
        with control.route(control_ids[i : i + 1]):
            return reference(lm, embeds[i : i + 1], mask[i : i + 1], o, stop)[0]

    free = [alone(i, [258]) for i in range(ROWS)]
    stop = sorted({free[0][3], free[1][8]})
    expected = [alone(i, stop) for i in range(ROWS)]
    assert min(map(len, expected)) < STEPS and max(map(len, expected)) == STEPS
    route = lambda rows: control.route(control_ids[rows])  # noqa: E731
    assert decode_dropping_finished(lm, embeds, mask, decoding_processors(lm, o), stop, o, route) == expected


@pytest.mark.parametrize("own_loop", [True, False])
def test_a_rows_answer_does_not_depend_on_the_other_prompts_of_its_batch(lm, own_loop, monkeypatch):
    # Fails on the code before 2026-12-07: lm.generate's own penalty skipped a padded row's first new tokens
    monkeypatch.setattr(generation, "reproduces_generation_config", lambda lm: own_loop)
    tokenizer = build_tiny_tokenizer()
    control = LoRAControl(rank=2, target_modules=["q_proj"])
    control.build(lm, tokenizer, SCHEMA)
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "A much longer prompt than the first " * 3}]]
    ids = [SCHEMA.encode({"length": "concise"})] * 2
    o = DecodingOptions(max_new_tokens=STEPS, repetition_penalty=3.0, batch_size=2)
    batched = generate_responses(lm, tokenizer, control, prompts, ids, o)
    alone = [generate_responses(lm, tokenizer, control, [p], [i], o)[0] for p, i in zip(prompts, ids, strict=True)]
    unpenalised = generate_responses(lm, tokenizer, control, prompts[:1], ids[:1], DecodingOptions(max_new_tokens=STEPS))
    assert batched == alone and alone[0] != unpenalised[0]  # the penalty changes the short row's answer
