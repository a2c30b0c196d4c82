"""A control vector: steering without training, by adding a direction to the residual stream (a baseline for MEET).

Contrastive activation addition (Turner et al. 2023, "Activation Addition"; Rimsky et al. 2024, "Steering Llama
2 via Contrastive Activation Addition"; the ``repeng`` library, which llama.cpp's ``--control-vector`` also
serves): for each steered decoder layer, the direction is the mean hidden state over the response tokens of the
*chosen* responses minus that of the *rejected* ones. Generating with ``+strength`` moves the model toward the
chosen kind (e.g. verbose), ``-strength`` toward the rejected kind. The strength is chosen on validation pairs
(:func:`choose_strength`): the strongest whose steered model predicts held-out responses of the requested kind at
most 5 % worse (per-token NLL) than the unsteered one — 0 when even the weakest costs more.

Nothing is trained: fitting is one forward pass over the pairs. It is what a user could pick instead of MEET, so
the length study compares against it (``benchmarks/compare.py``, arm ``control_vector``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from meet_lightning.data.rows import ControlledExample, ControlSchema, PreferencePair
from meet_lightning.data.tokenization import IGNORE_INDEX, PromptTokenizer, TokenizedRow, collate_rows

STRENGTHS = (0.05, 0.1, 0.2, 0.35, 0.5, 1.0)
"""The strengths :func:`choose_strength` tries by default (0, the unsteered model, always)."""
MAX_COST = 0.05
"""The validation NLL a chosen strength may add, relative to the unsteered model's (5 %)."""


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's stack of decoder layers (the longest ``ModuleList`` in it: ``model.layers`` in Llama-like models)."""
    lists = [m for m in lm.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(lm).__name__} has no list of decoder layers to steer")
    return max(lists, key=len)


@dataclasses.dataclass
class ControlVector:
    """One direction per steered decoder layer.

    Attributes:
        layers: Indices of the steered layers.
        directions: (len(layers), H) what ``strength = 1`` adds to each layer's output.
        pairs: Pairs the directions were fitted on.
        skipped: Pairs left out because a side did not fit ``max_length``.
    """

    layers: tuple[int, ...]
    directions: torch.Tensor
    pairs: int
    skipped: int

    @contextlib.contextmanager
    def steer(self, lm: nn.Module, strength: float) -> Iterator[None]:
        """Within the block, each steered layer's output (every position) gets ``strength × direction`` added."""
        stack = decoder_layers(lm)
        handles = []
        for layer, direction in zip(self.layers, self.directions, strict=True):

            def add(_module: nn.Module, _inputs: Any, output: Any, direction: torch.Tensor = direction) -> Any:
                hidden = output[0] if isinstance(output, tuple) else output
                shifted = hidden + (strength * direction).to(hidden.dtype)
                return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

            handles.append(stack[layer].register_forward_hook(add))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def middle_layers(lm: nn.Module) -> tuple[int, ...]:
    """The middle half of the decoder layers, where steering directions are most linear (CAA, repeng)."""
    count = len(decoder_layers(lm))
    return tuple(range(count // 4, max(count // 4 + 1, (3 * count) // 4)))


def tokenized_sides(
    tokenizer: Any, pairs: Sequence[PreferencePair], max_length: int
) -> tuple[list[TokenizedRow], list[TokenizedRow], int]:
    """(chosen rows, rejected rows, skipped): each pair's two responses after its prompt, no control."""
    encoder, schema = PromptTokenizer(tokenizer, max_length), ControlSchema.from_dict({})
    chosen, rejected, skipped = [], [], 0
    for pair in pairs:
        rows = [encoder.tokenize(ControlledExample(pair.prompt, text, {}), schema) for text in (pair.chosen, pair.rejected)]
        if None in rows:
            skipped += 1
            continue
        chosen.append(rows[0])
        rejected.append(rows[1])
    return chosen, rejected, skipped


@torch.no_grad()
def mean_response_states(lm: nn.Module, rows: Sequence[TokenizedRow], pad_id: int, batch_size: int) -> torch.Tensor:
    """(layers + 1, H) each layer's output averaged over every response token of ``rows`` (index 0: embeddings)."""
    device = next(lm.parameters()).device
    total, count = None, 0
    for start in range(0, len(rows), batch_size):
        batch = collate_rows(rows[start : start + batch_size], pad_id)
        out = lm(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), output_hidden_states=True
        )
        mask = (batch["labels"] != IGNORE_INDEX).to(device)  # (B, T) response tokens
        states = torch.stack(out.hidden_states, 0).float()  # (layers + 1, B, T, H)
        summed = (states * mask[None, :, :, None]).sum((1, 2))  # (layers + 1, H)
        total = summed if total is None else total + summed
        count += int(mask.sum())
    return total / count


def fit_control_vector(
    lm: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    layers: Sequence[int] | None = None,
    max_length: int = 1024,
    batch_size: int = 8,
) -> ControlVector:
    """The direction from ``rejected`` toward ``chosen`` responses at each of ``layers`` (default: the middle half).

    Raises:
        ValueError: No pair fits ``max_length``.
    """
    chosen, rejected, skipped = tokenized_sides(tokenizer, pairs, max_length)
    if not chosen:
        raise ValueError(f"none of the {len(pairs)} pairs fits max_length {max_length} — pass a larger max_length")
    layers = tuple(layers) if layers is not None else middle_layers(lm)
    difference = mean_response_states(lm, chosen, tokenizer.pad_token_id, batch_size) - mean_response_states(
        lm, rejected, tokenizer.pad_token_id, batch_size
    )  # (layers + 1, H)
    return ControlVector(layers, difference[[layer + 1 for layer in layers]], len(chosen), skipped)


@torch.no_grad()
def response_nll(lm: nn.Module, rows: Sequence[TokenizedRow], pad_id: int, batch_size: int) -> float:
    """Mean per-token NLL of the response tokens of ``rows`` under ``lm``."""
    device = next(lm.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collate_rows(rows[start : start + batch_size], pad_id)
        logits = lm(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        labels = batch["labels"][:, 1:].to(device)  # (B, T-1) next tokens
        nll = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels.clamp(min=0), reduction="none")
        mask = labels != IGNORE_INDEX
        total += float((nll * mask).sum())
        count += int(mask.sum())
    return total / count


def choose_strength(
    lm: nn.Module,
    tokenizer: Any,
    vector: ControlVector,
    pairs: Sequence[PreferencePair],
    strengths: Sequence[float] = STRENGTHS,
    max_cost: float = MAX_COST,
    max_length: int = 1024,
    batch_size: int = 8,
) -> tuple[float, dict[float, float]]:
    """The strongest steering whose cost in likelihood stays within ``max_cost``, and every strength's NLL.

    A strength's NLL is the mean of two per-token NLLs on validation pairs: the chosen responses under
    ``+strength`` and the rejected ones under ``-strength`` (responses of the kind each sign asks for). A style
    such as length lives in a few tokens (where the answer ends), so it barely moves a per-token likelihood, while
    every added vector perturbs all tokens: the NLL rises with the strength from the first step. The rule is
    therefore the largest strength whose NLL is at most ``(1 + max_cost)`` times the unsteered one (0 when none is).
    """
    chosen, rejected, _ = tokenized_sides(tokenizer, pairs, max_length)
    if not chosen:
        raise ValueError(f"none of the {len(pairs)} validation pairs fits max_length {max_length}")
    scores = {}
    for strength in sorted({0.0, *strengths}):
        with vector.steer(lm, strength):
            toward = response_nll(lm, chosen, tokenizer.pad_token_id, batch_size)
        with vector.steer(lm, -strength):
            away = response_nll(lm, rejected, tokenizer.pad_token_id, batch_size)
        scores[strength] = (toward + away) / 2
    affordable = [s for s, nll in scores.items() if nll <= (1 + max_cost) * scores[0.0]]
    return max(affordable), scores
