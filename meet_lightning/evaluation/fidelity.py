"""Generation-based metrics: what each control does to the model's own responses.

:func:`control_fidelity` generates under every control with identical decoding and measures each attribute
function (:data:`Attribute`: word count by default, any callable, a reward model) per control, with a KL
estimate to the base model (:func:`kl_to_base`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from meet_lightning.controls.tokens import controlled_response_logps, plain_logps
from meet_lightning.data.rows import ControlledExample, ControlSchema, Message
from meet_lightning.data.tokenization import PromptTokenizer, collate_rows
from meet_lightning.evaluation.judges import RewardModel
from meet_lightning.evaluation.loading import NO_CONTROL, EvalModel
from meet_lightning.inference.generation import DecodingOptions, generate_responses, resolve_controls
from meet_lightning.stats import mean_interval, words

Attribute = Callable[[Sequence[Message], str], float]
"""An attribute function: ``(prompt messages, response) → value`` (word count, a reward, …)."""


def word_count(prompt: Sequence[Message], response: str) -> float:
    """Words in ``response`` (:func:`~meet_lightning.stats.words`): the verbosity attribute."""
    return float(words(response))


DEFAULT_ATTRIBUTES: dict[str, Attribute] = {"words": word_count}


def control_ids_for(model: EvalModel, control: str) -> list[int]:
    """Control ids of one mode (``none`` = no control)."""
    return resolve_controls(model.schema, None if control == NO_CONTROL else control)


def generate_under(model: EvalModel, prompts: Sequence[Sequence[Message]], control: str, options: DecodingOptions) -> list[str]:
    """Responses to ``prompts`` under one control (``none`` = plain), decoded as ``options``."""
    ids = [control_ids_for(model, control)] * len(prompts)
    return generate_responses(model.lm, model.tokenizer, model.control, list(prompts), ids, options)


@torch.no_grad()
def kl_to_base(
    model: EvalModel,
    base: nn.Module,
    prompts: Sequence[Sequence[Message]],
    responses: Sequence[str],
    control: str,
    max_length: int = 1024,
    batch_size: int = 8,
) -> float:
    """Monte-Carlo KL estimate ``E[log p_model(y|x, control) − log p_base(y|x)]`` per response token.

    ``responses`` are the model's own samples under ``control``; they are re-tokenized (with their end-of-turn
    token), so the estimate is over the tokens of the text as the tokenizer writes it.
    """
    encoder = PromptTokenizer(model.tokenizer, max_length)
    ids = control_ids_for(model, control)  # (P,) the same for every row
    rows = [
        encoder.tokenize(ControlledExample(tuple(p), r, {}), ControlSchema({})) for p, r in zip(prompts, responses, strict=True)
    ]
    rows = [r for r in rows if r is not None]
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = {
            k: v.to(model.device) for k, v in collate_rows(rows[start : start + batch_size], model.tokenizer.pad_token_id).items()
        }
        batch["control_ids"] = torch.tensor([ids], dtype=torch.long, device=model.device).expand(len(batch["input_ids"]), -1)
        own, mask = controlled_response_logps(model.lm, model.control, batch)  # (B, T+C-1): controls spliced in
        base_logps, base_mask = plain_logps(base.to(model.device), batch)  # (B, T-1): the same response tokens
        total += float((own * mask).sum() - (base_logps * base_mask).sum())
        count += int(mask.sum())
    return total / count if count else float("nan")


def control_fidelity(
    model: EvalModel,
    prompts: Sequence[Sequence[Message]],
    attributes: Mapping[str, Attribute] | None = None,
    controls: Sequence[str] | None = None,
    base: nn.Module | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Generates under every control with identical decoding and measures each attribute per control.

    Args:
        model: The model to probe.
        prompts: Chat prompts, the same for every control.
        attributes: ``{name: (prompt, response) → value}``; default word count (``words``).
        controls: Modes to generate under; default every control of the schema (``none`` for plain models).
        base: The base model for the KL estimate; ``None`` skips it.
        max_new_tokens: Longest response (identical for every control).
        temperature: 0 = greedy (identical for every control).
        batch_size: Prompts per generate call.

    Returns:
        ``{"controls", "attributes", "matrix": {control: {attribute: mean}}, "matrix_ci95", "values":
        {control: {attribute: [per prompt]}}, "kl_to_base": {control: nats per token}, "samples":
        {control: [responses]}, "prompts": n, "decoding": {...}}``.
    """
    attributes = dict(attributes or DEFAULT_ATTRIBUTES)
    controls = list(controls or (model.schema.names if model.has_controls else [NO_CONTROL]))
    result: dict[str, Any] = {
        "controls": controls,
        "attributes": list(attributes),
        "prompts": len(prompts),
        "decoding": {"max_new_tokens": max_new_tokens, "temperature": temperature},
        "matrix": {},
        "matrix_ci95": {},
        "values": {},
        "samples": {},
        "kl_to_base": {},
    }
    decoding = DecodingOptions(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size)
    for control in controls:
        responses = generate_under(model, prompts, control, decoding)
        values = {name: [float(fn(p, r)) for p, r in zip(prompts, responses, strict=True)] for name, fn in attributes.items()}
        values.update(_batched_attributes(attributes, prompts, responses))
        result["samples"][control] = responses
        result["values"][control] = values
        result["matrix"][control] = {name: sum(v) / len(v) if v else float("nan") for name, v in values.items()}
        intervals = {name: mean_interval(v) for name, v in values.items()}  # None below MIN_ITEMS prompts
        result["matrix_ci95"][control] = {name: list(i) if i else None for name, i in intervals.items()}
        if base is not None:
            result["kl_to_base"][control] = kl_to_base(model, base, prompts, responses, control, batch_size=batch_size)
    return result


def _batched_attributes(attributes, prompts, responses) -> dict[str, list[float]]:
    # Reward models score a whole list at once (much faster than one call per response).
    return {name: fn.score(prompts, responses) for name, fn in attributes.items() if isinstance(fn, RewardModel)}
