"""Tiny models built in code for the inference tests (chat, serve, playground)."""

from __future__ import annotations

import torch

from meet_lightning import PromptTuningControl
from meet_lightning.data.rows import ControlSchema
from meet_lightning.inference.export import AlignedModel
from meet_lightning.models import build_tiny_model, build_tiny_tokenizer


def controlled_tiny_model() -> AlignedModel:
    """The tiny LM with two length controls strong enough that each changes its greedy answer."""
    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()
    lm = build_tiny_model(tokenizer)
    schema = ControlSchema.from_dict({"length": ["concise", "verbose"]})
    control = PromptTuningControl(num_tokens=2, init="random", seed=1)
    control.setup(lm, tokenizer, schema)
    with torch.no_grad():
        control.bank.mul_(20)  # controls that visibly change the tiny model's greedy answer
        lm.get_output_embeddings().weight[:3] = 0  # the untrained tiny model would end every answer at once
    return AlignedModel(lm, tokenizer, control, schema)
