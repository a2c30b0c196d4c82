"""One pass over a prompt that several rows share: the pair's chosen and rejected response (and any further copies of
them, e.g. under swapped controls) continue from the same key/value cache instead of each computing the prompt again.
Scoring (``evaluate``, ``score_pairs``) shares by default: a pair's four scored rows compute the prompt once (1.74× the
unsorted path with infix controls against 1.24× with prefix ones, benchmarks/results/scoring_shared_prompt_2026-12-07).
Training opts in (``share_prompt``): on a 2-core CPU it gained 3–4 % pairs/s for ~0.5 GiB more peak memory.

A paired batch holds ``k`` groups of ``B`` rows, ``[group_1; …; group_k]``, where row ``p`` of every group has the same
prompt. The prompt pass runs on ``B`` rows; its cache is repeated for the ``k·B`` continuations, which attend to it
at their own positions. Log-probabilities equal the full pass's (tests/test_shared_prompt.py, fp32), and gradients
flow through the cache into the prompt pass. Only valid where the control leaves the prompt's computation alone:
controls inserted after the prompt (``infix``) or none, and no per-row weight deltas (LoRA controls route every
token of a row, so a row's prompt states depend on its control).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from meet_lightning.heads import LMHead
from meet_lightning.losses import response_token_logps
from meet_lightning.models import cache_keyword


def shared_prompt_split(batch: Mapping[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
    """(B,) where each prompt's rows part (one token before the response, so that its first token is predicted in
    the continuation), or ``None`` when the rows of a prompt are not identical up to there.

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
    return split


def padded_tokens(ends: torch.Tensor, groups: list[list[int]]) -> int:
    """Tokens the full pass computes: each group of rows padded to its longest (``ends`` (N,) one past the last)."""
    return sum(len(g) * int(ends[g].max()) for g in groups)


def shared_prompt_tokens(split: torch.Tensor, ends: torch.Tensor, groups: list[list[int]]) -> int:
    """Tokens the shared pass computes for these groups of prompts: each prompt once, padded to its group's longest,
    and each of the ``k`` rows from its split on, padded likewise. Where prompts and responses vary in length in
    opposite directions, this can exceed :func:`padded_tokens`, and the full pass is taken instead."""
    pairs = split.shape[0]
    tails = (ends.view(-1, pairs) - split).amax(0)  # (B,) a prompt's longest continuation
    copies = ends.shape[0] // pairs
    return sum(len(g) * (int(split[g].max()) + copies * max(int(tails[g].max()), 2)) for g in groups)


def shared_prompt_logps(
    lm: nn.Module,
    embed: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    split: torch.Tensor,
    fp32_head: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token response log-probs of ``k·B`` rows whose groups share prompts, as the full pass computes them.

    Args:
        lm: The causal LM.
        embed: Input vectors for ids, (N, L) → (N, L, H) (the control's learned slots included).
        ids, mask, labels: (k·B, T) the spliced rows, ``[group_1; …; group_k]``.
        split: (B,) from :func:`shared_prompt_split`.
        fp32_head: LM head and log-softmax in float32.

    Returns:
        ``token_logps`` and ``mask``, both (k·B, T-1), aligned with the full sequence.
    """
    decoder = lm.get_decoder()
    pairs, width = split.shape[0], ids.shape[1]
    groups = ids.shape[0] // pairs
    length = int(split.max())
    positions = torch.arange(width, device=ids.device)
    prompt_mask = mask[:pairs, :length] * (positions[:length] < split[:, None])  # (B, S)
    cache_name = cache_keyword(decoder.forward)
    out = decoder(inputs_embeds=embed(ids[:pairs, :length]), attention_mask=prompt_mask, use_cache=True)
    cache = getattr(out, cache_name)
    cache.batch_select_indices(torch.arange(pairs, device=ids.device).repeat(groups))  # (k·B,) rows of the cache

    starts = split.repeat(groups)  # (k·B,)
    ends = (mask.bool() * (positions + 1)).amax(-1)  # (k·B,) one past each row's last real token
    span = max(int((ends - starts).max()), 2)
    place = starts[:, None] + positions[:span]  # (k·B, C) each continuation token's place in its row
    real = place < ends[:, None]
    where = place.clamp(max=width - 1)
    tail_ids = ids.gather(1, where).masked_fill(~real, 0)
    tail_mask = mask.gather(1, where) * real
    tail_labels = labels.gather(1, where).masked_fill(~real, -100)
    hidden = decoder(
        inputs_embeds=embed(tail_ids),
        attention_mask=torch.cat([prompt_mask.repeat(groups, 1), tail_mask], 1),
        position_ids=place,  # the row's own positions: rotary embeddings as in the full pass
        use_cache=True,
        **{cache_name: cache},
    ).last_hidden_state  # (k·B, C, H)
    tail_logps, tail_picked = response_token_logps(hidden, tail_labels, LMHead(lm, fp32=fp32_head))  # (k·B, C-1)
    row, step = tail_picked.nonzero(as_tuple=True)
    logps = torch.zeros(ids.shape[0], width - 1, dtype=tail_logps.dtype, device=ids.device)
    picked = torch.zeros(ids.shape[0], width - 1, dtype=torch.bool, device=ids.device)
    logps[row, starts[row] + step] = tail_logps[row, step]
    picked[row, starts[row] + step] = True
    return logps, picked
