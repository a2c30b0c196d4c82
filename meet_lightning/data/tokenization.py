"""Tokenization and batching: preference rows as token ids, collated into tensors; the train/validation split.

Rows are tokenized once, without their control tokens: the control implementation splices its tokens in at
``prefix_pos`` or ``response_start`` inside the model, so one tokenized row serves every control (the control
classifier scores each response under ``good`` and ``bad`` without re-tokenizing). Core: no Lightning here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from meet_lightning.data.rows import ControlledExample, ControlSchema, Message, PreferencePair
from meet_lightning.losses import IGNORE_INDEX
from meet_lightning.models import end_of_turn_id


@dataclass(frozen=True)
class TokenizedRow:
    """One row as token ids, controls not yet inserted.

    Attributes:
        input_ids: Prompt (chat template, generation header included) followed by the response tokens.
        labels: ``-100`` on prompt tokens, the token id on response tokens (end-of-turn token included).
        prefix_pos: Where ``prefix`` controls go: after a template BOS token, else 0.
        response_start: Where ``infix`` controls go: the first response token (= prompt length).
        control_ids: One global control id per preference in schema order, ``-1`` = no label.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    prefix_pos: int
    response_start: int
    control_ids: tuple[int, ...]


class PromptTokenizer:
    """Renders chat prompts and responses with a tokenizer's template, with response-only labels.

    Args:
        tokenizer: A Hugging Face tokenizer with a chat template (see ``models.load_tokenizer``).
        max_length: Longest sequence in text tokens (control tokens come on top).
    """

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.eot_id = end_of_turn_id(tokenizer)
        # A template that writes the BOS token itself (Llama 3) keeps it first; prefix controls follow it.
        template = getattr(tokenizer, "chat_template", None) or ""
        self.bos_first = tokenizer.bos_token_id is not None and "bos_token" in template

    def render_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of ``messages`` followed by the assistant header."""
        return list(self._apply(list(messages), add_generation_prompt=True))

    def response_ids(self, prompt: Sequence[Message], response: str, prompt_ids: list[int]) -> list[int]:
        """Token ids of ``response`` as the template writes it, up to and including the end-of-turn token."""
        full = list(self._apply([*prompt, {"role": "assistant", "content": response}], add_generation_prompt=False))
        if full[: len(prompt_ids)] == prompt_ids:
            ids = full[len(prompt_ids) :]
        else:  # templates that rewrite earlier turns: fall back to the plain response tokens
            ids = self.tokenizer(response, add_special_tokens=False)["input_ids"] + [self.eot_id]
        cut = ids.index(self.eot_id) + 1 if self.eot_id in ids else len(ids)
        return ids[:cut] if self.eot_id in ids else [*ids, self.eot_id]

    def prefix_pos(self, ids: Sequence[int]) -> int:
        """Index prefix controls are inserted at."""
        return 1 if self.bos_first and ids and ids[0] == self.tokenizer.bos_token_id else 0

    def fit_prompt(self, messages: Sequence[Message], budget: int) -> list[int] | None:
        """Prompt ids within ``budget`` tokens, dropping oldest turns, then oldest tokens of the first turn.

        The system turn is kept. Returns ``None`` when even an empty last user turn does not fit.
        """
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = list(messages[len(system) :])
        ids = self.render_prompt([*system, *turns])
        while len(ids) > budget and len(turns) > 1:
            turns = turns[1:]
            while len(turns) > 1 and turns[0]["role"] != "user":  # a conversation restarts on a user turn
                turns = turns[1:]
            ids = self.render_prompt([*system, *turns])
        if len(ids) <= budget:
            return ids
        return self._truncate_first_turn(system, turns, budget)

    def _truncate_first_turn(self, system: list[Message], turns: list[Message], budget: int) -> list[int] | None:
        content = self.tokenizer(turns[0]["content"], add_special_tokens=False)["input_ids"]
        overflow = len(self.render_prompt([*system, *turns])) - budget
        for _ in range(4):  # decoding can merge or split tokens: re-render until it fits
            if overflow >= len(content):
                return None
            content = content[overflow:]
            head = {"role": turns[0]["role"], "content": self.tokenizer.decode(content)}
            ids = self.render_prompt([*system, head, *turns[1:]])
            overflow = len(ids) - budget
            if overflow <= 0:
                return ids
        return None

    def tokenize(self, example: ControlledExample, schema: ControlSchema) -> TokenizedRow | None:
        """Tokenizes one training row; ``None`` when its response alone leaves no room for a prompt."""
        rows = self.tokenize_same_prompt([example], schema)
        return rows[0] if rows else None

    def tokenize_pair(self, pair: PreferencePair, schema: ControlSchema) -> tuple[TokenizedRow, TokenizedRow] | None:
        """Chosen and rejected rows of ``pair`` (under their controls), with one prompt; ``None`` if they do not fit."""
        rows = self.tokenize_same_prompt(pair.examples(), schema)
        return (rows[0], rows[1]) if rows else None

    def tokenize_same_prompt(self, examples: Sequence[ControlledExample], schema: ControlSchema) -> list[TokenizedRow] | None:
        """Rows of responses to one prompt, whose prompt is cut once, to leave room for the longest response.

        Cut per row, a long prompt would be cut deeper before a longer response: the two sides of a pair would
        answer different conversations, and comparing their log-probs would compare contexts, not responses.
        ``None`` when the longest response leaves no room for a prompt.
        """
        full_prompt = self.render_prompt(examples[0].prompt)
        responses = [self.response_ids(e.prompt, e.response, full_prompt) for e in examples]
        budget = self.max_length - max(map(len, responses))
        prompt = full_prompt if len(full_prompt) <= budget else self.fit_prompt(examples[0].prompt, budget)
        if prompt is None:
            return None
        return [self._row(prompt, response, e, schema) for response, e in zip(responses, examples, strict=True)]

    def _row(self, prompt: list[int], response: list[int], example: ControlledExample, schema: ControlSchema) -> TokenizedRow:
        return TokenizedRow(
            input_ids=tuple(prompt + response),
            labels=tuple([IGNORE_INDEX] * len(prompt) + response),
            prefix_pos=self.prefix_pos(prompt),
            response_start=len(prompt),
            control_ids=tuple(schema.encode(example.controls)),
        )

    def _apply(self, messages: list[Message], add_generation_prompt: bool) -> list[int]:
        out = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
        )
        return list(out["input_ids"] if isinstance(out, Mapping) else out)


def collate_rows(rows: Sequence[TokenizedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pads rows into a batch.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (B, L); ``prefix_pos``, ``response_start`` (B,);
        ``control_ids`` (B, P).
    """
    length = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        mask[i, :n] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "prefix_pos": torch.tensor([r.prefix_pos for r in rows]),
        "response_start": torch.tensor([r.response_start for r in rows]),
        "control_ids": torch.tensor([r.control_ids for r in rows], dtype=torch.long).reshape(len(rows), -1),
    }


def collate_pairs(pairs: Sequence[tuple[TokenizedRow, TokenizedRow]], pad_id: int) -> dict[str, torch.Tensor]:
    """Batches pairs as ``[chosen_1..chosen_B; rejected_1..rejected_B]`` (2B rows), ``num_pairs`` = B.

    Each row carries its own training control (chosen → e.g. ``good``, rejected → ``bad``); swapping the two
    halves of ``control_ids`` gives every response under the other control (the control classifier).
    """
    batch = collate_rows([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
    batch["num_pairs"] = torch.tensor(len(pairs))
    return batch


@dataclass
class Split:
    """Training rows and comparisons of one side of the train/validation split."""

    examples: list[ControlledExample] = field(default_factory=list)
    pairs: list[PreferencePair] = field(default_factory=list)


SEQUENCE_KEYS = ("input_ids", "attention_mask", "labels")
"""The (B, L) entries of a collated batch (right-padded): a part of the batch is cut to its own longest row."""


def batch_units(batch: Mapping[str, torch.Tensor]) -> list[int]:
    """The length of each unit a batch splits into without breaking its loss: each pair of a paired batch (its
    longer row), each row otherwise."""
    lengths = batch["attention_mask"].sum(-1).tolist()  # (B,)
    if "num_pairs" not in batch:
        return lengths
    pairs = int(batch["num_pairs"])
    return [max(chosen, rejected) for chosen, rejected in zip(lengths[:pairs], lengths[pairs:], strict=True)]


def longest_batch(batch: Mapping[str, torch.Tensor], max_length: int) -> dict[str, torch.Tensor]:
    """``batch`` with every row continued to ``max_length`` tokens (repeating its last token) and every token after
    the first labelled as a response token: the LM head, which runs on response tokens only, computes the most a
    row of that length can ask of it. No batch of the same size and layout computes more, so it is what a memory
    probe runs. The rows keep their prompts' tokens, their controls and their split points."""
    rows, width = batch["input_ids"].shape
    lengths = batch["attention_mask"].sum(-1)  # (B,)
    last = batch["input_ids"].gather(1, (lengths - 1).clamp(min=0)[:, None])  # (B, 1)
    ids = torch.cat([batch["input_ids"], last.expand(rows, max(0, max_length - width))], dim=1)  # (B, L')
    real = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]  # (B, L') the original tokens
    longest = dict(batch)
    longest["input_ids"] = torch.where(real, ids, last)
    longest["attention_mask"] = torch.ones_like(ids)
    longest["labels"] = longest["input_ids"].clone()
    longest["labels"][:, 0] = IGNORE_INDEX  # nothing predicts the first token
    return longest


def batch_part(batch: Mapping[str, torch.Tensor], units: Sequence[int]) -> dict[str, torch.Tensor]:
    """The ``units`` of a collated batch (pairs of a paired batch, rows otherwise; see :func:`batch_units`) as a
    batch of the same layout, cut to its longest row: ``[chosen; rejected]`` stays in that order."""
    rows = batch["input_ids"].shape[0]
    picked = list(units)
    if "num_pairs" in batch:
        pairs = int(batch["num_pairs"])
        picked += [pairs + unit for unit in units]
    index = torch.tensor(picked, device=batch["input_ids"].device)
    part = {key: value[index] for key, value in batch.items() if value.ndim and value.shape[0] == rows}
    width = int(part["attention_mask"].sum(-1).max())
    part.update({key: part[key][:, :width] for key in SEQUENCE_KEYS})
    if "num_pairs" in batch:
        part["num_pairs"] = torch.tensor(len(units))
    return part
