"""One pass over a prompt that several rows share: the pair's chosen and rejected response (and any further copies of
them, e.g. under swapped controls) continue from the same key/value cache instead of each computing the prompt again.
Scoring (``evaluate``, ``score_pairs``) shares by default: a pair's four scored rows compute the prompt once (1.74× the
unsorted path with infix controls, 1.27× with prefix ones, whose rows share per control:
benchmarks/results/scoring_shared_prompt_2026-12-07).
Training opts in (``share_prompt``): on a 2-core CPU it gained 3–4 % pairs/s for ~0.5 GiB more peak memory.

A :class:`PromptSharing` says which rows continue from which prompt pass. Two ways to find one:

- :func:`shared_prompt_split`, for a paired batch of ``k`` groups of ``B`` rows, ``[group_1; …; group_k]``, whose
  controls come after the prompt (``infix``) or are absent: row ``p`` of every group reads the same prompt, so the
  ``k·B`` rows continue from ``B`` prompt passes, each from one token before its control.
- :func:`prompt_families`, for any batch: rows that read the same tokens up to their response (a ``prefix`` control
  and the prompt), e.g. scoring's chosen and rejected response under the same control, continue from one pass over
  that part.

The continuations attend to the cache at their own positions. Log-probabilities equal the full pass's
(tests/test_shared_prompt.py, fp32), and gradients flow through the cache into the prompt pass. Only valid where the
control adds nothing per row beyond its tokens: LoRA controls route every token of a row through their adapter, so
a row's prompt states depend on its control.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from meet_lightning.heads import LMHead
from meet_lightning.losses import IGNORE_INDEX, response_token_logps
from meet_lightning.models import cache_keyword


@dataclass(frozen=True)
class PromptSharing:
    """Which rows of a batch continue from which shared prompt pass.

    Attributes:
        heads: (M,) one row per shared prompt; the prompt pass runs on these rows' first ``split`` tokens.
        family: (N,) each row's prompt, an index into ``heads``.
        split: (M,) where each prompt's pass ends: one token before the first token its rows predict after it.
    """

    heads: torch.Tensor
    family: torch.Tensor
    split: torch.Tensor

    def select(self, prompts: torch.Tensor) -> tuple[torch.Tensor, PromptSharing]:
        """The batch rows of ``prompts`` (m,) (indices into ``heads``), and the sharing of that sub-batch."""
        rows = torch.isin(self.family, prompts).nonzero().flatten()  # (r,) in batch order
        at = torch.full_like(self.family, -1)
        at[rows] = torch.arange(rows.shape[0], device=rows.device)
        local = torch.full_like(self.heads, -1)
        local[prompts] = torch.arange(prompts.shape[0], device=prompts.device)
        return rows, PromptSharing(at[self.heads[prompts]], local[self.family[rows]], self.split[prompts])

    def tokens(self, ends: torch.Tensor, groups: list[list[int]]) -> int:
        """Tokens the shared pass computes for these groups of prompts: each prompt once, padded to its group's
        longest, and each of its rows from the split on, padded likewise. Where prompts and responses vary in length
        in opposite directions, this can exceed :func:`padded_tokens`, and the full pass is taken instead.

        Args:
            ends: (N,) one past each row's last token.
            groups: Lists of prompt indices.
        """
        tails = ends - self.split[self.family]  # (N,)
        total = 0
        for group in groups:
            rows = torch.isin(self.family, torch.tensor(group, device=ends.device))
            total += len(group) * int(self.split[group].max()) + int(rows.sum()) * max(int(tails[rows].max()), 2)
        return total


def shared_prompt_split(batch: Mapping[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> PromptSharing | None:
    """Each pair's rows continuing from one pass over its prompt, which ends one token before the response (so that
    its first token is predicted in the continuation); ``None`` when the rows of a prompt are not identical up to
    there.

    Args:
        batch: A paired batch (``num_pairs`` = B), ``response_start`` (k·B,) as tokenized.
        ids, mask: (k·B, T) the rows with their controls spliced in (after the prompt, or none).
    """
    if "num_pairs" not in batch:
        return None
    pairs = int(batch["num_pairs"])
    if pairs < 1 or ids.shape[0] % pairs:
        return None
    groups = ids.shape[0] // pairs
    split = batch["response_start"].to(ids.device).view(groups, pairs) - 1  # (k, B)
    if (split != split[0]).any() or (split[0] < 1).any():
        return None
    split = split[0]  # (B,)
    inside = torch.arange(ids.shape[1], device=ids.device) < split[:, None]  # (B, T) the shared part
    first_ids, first_mask = ids[:pairs], mask[:pairs]
    for g in range(1, groups):
        rows = slice(g * pairs, (g + 1) * pairs)
        if ((ids[rows] != first_ids) & inside).any() or ((mask[rows] != first_mask) & inside).any():
            return None  # a prompt cut differently for one of its rows: computed in full
    heads = torch.arange(pairs, device=ids.device)
    return PromptSharing(heads, heads.repeat(groups), split)


def prompt_families(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> PromptSharing | None:
    """Rows that read the same tokens up to one before their first labelled token share one pass over them: with
    ``prefix`` controls, the rows of one prompt under one control. ``None`` where no two rows share, or a row has no
    label to split at.

    Args:
        ids, mask, labels: (N, T) the rows with their controls spliced in.
    """
    labelled = labels != IGNORE_INDEX  # (N, T)
    if not labelled.any(-1).all():
        return None
    split = labelled.int().argmax(-1) - 1  # (N,) first labelled position - 1
    if (split < 1).any():
        return None
    first: dict[tuple, int] = {}  # a prompt's tokens → its index
    heads, family = [], []
    for row, (s, tokens, attended) in enumerate(zip(split.tolist(), ids.tolist(), mask.tolist(), strict=True)):
        key = (tuple(tokens[:s]), tuple(attended[:s]))
        if key not in first:
            first[key] = len(heads)
            heads.append(row)
        family.append(first[key])
    if len(heads) == len(family):
        return None
    heads_t = torch.tensor(heads, device=ids.device)
    return PromptSharing(heads_t, torch.tensor(family, device=ids.device), split[heads_t])


def padded_tokens(ends: torch.Tensor, groups: list[list[int]]) -> int:
    """Tokens the full pass computes: each group of rows padded to its longest (``ends`` (N,) one past the last)."""
    return sum(len(g) * int(ends[g].max()) for g in groups)


def shared_prompt_logps(
    lm: nn.Module,
    embed: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    sharing: PromptSharing,
    fp32_head: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token response log-probs of rows that continue from shared prompt passes, as the full pass computes them.

    Args:
        lm: The causal LM.
        embed: Input vectors for ids, (N, L) → (N, L, H) (the control's learned slots included).
        ids, mask, labels: (N, T) the spliced rows.
        sharing: Which rows continue from which prompt (:func:`shared_prompt_split`, :func:`prompt_families`).
        fp32_head: LM head and log-softmax in float32.

    Returns:
        ``token_logps`` and ``mask``, both (N, T-1), aligned with the full sequence.
    """
    decoder = lm.get_decoder()
    width = ids.shape[1]
    length = int(sharing.split.max())
    positions = torch.arange(width, device=ids.device)
    prompt_mask = mask[sharing.heads, :length] * (positions[:length] < sharing.split[:, None])  # (M, S)
    cache_name = cache_keyword(decoder.forward)
    out = decoder(inputs_embeds=embed(ids[sharing.heads, :length]), attention_mask=prompt_mask, use_cache=True)
    cache = getattr(out, cache_name)
    cache.batch_select_indices(sharing.family)  # (N,) each row's prompt in the cache

    starts = sharing.split[sharing.family]  # (N,)
    ends = (mask.bool() * (positions + 1)).amax(-1)  # (N,) one past each row's last real token
    span = max(int((ends - starts).max()), 2)
    place = starts[:, None] + positions[:span]  # (N, C) each continuation token's place in its row
    real = place < ends[:, None]
    where = place.clamp(max=width - 1)
    tail_ids = ids.gather(1, where).masked_fill(~real, 0)
    tail_mask = mask.gather(1, where) * real
    tail_labels = labels.gather(1, where).masked_fill(~real, IGNORE_INDEX)
    hidden = decoder(
        inputs_embeds=embed(tail_ids),
        attention_mask=torch.cat([prompt_mask[sharing.family], tail_mask], 1),
        position_ids=place,  # the row's own positions: rotary embeddings as in the full pass
        use_cache=True,
        **{cache_name: cache},
    ).last_hidden_state  # (N, C, H)
    tail_logps, tail_picked = response_token_logps(hidden, tail_labels, LMHead(lm, fp32=fp32_head))  # (N, C-1)
    row, step = tail_picked.nonzero(as_tuple=True)
    logps = torch.zeros(ids.shape[0], width - 1, dtype=tail_logps.dtype, device=ids.device)
    picked = torch.zeros(ids.shape[0], width - 1, dtype=torch.bool, device=ids.device)
    logps[row, starts[row] + step] = tail_logps[row, step]
    picked[row, starts[row] + step] = True
    return logps, picked
