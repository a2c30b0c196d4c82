"""Padding-free batches: a batch's rows packed end to end into as few rows ("bins") as the longest row holds, each row
keeping its own positions (0, 1, …). transformers reads the restarts in ``position_ids`` as sequence boundaries and
keeps packed rows from attending to each other (a block-diagonal causal mask for ``sdpa``/``eager``, variable-length
kernels for flash attention), so each row's log-probabilities equal the padded pass's (tests/test_packing.py, fp32)
while the linear layers compute no padding.

Where it pays: a single forward over a whole batch (``forward_chunks`` 1, the default on a GPU), whose padding
grows with the spread of row lengths. On a CPU, length-sorted forward chunks already leave ~1 % padding, and a
materialised block mask makes attention cost ``bins × width²`` like the padded pass. Not measured on a GPU yet.

Only valid where a row's computation depends on its tokens alone: controls with per-row weight deltas (LoRA
controls) keep the padded pass. :func:`check_packing` refuses a model whose attention ignores the restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from meet_lightning.errors import ConfigError
from meet_lightning.heads import LMHead
from meet_lightning.losses import IGNORE_INDEX, response_token_logps


def pack_bins(lengths: Sequence[int]) -> list[list[int]]:
    """Row indices in bins that each hold at most ``max(lengths)`` tokens: first fit, longest rows first."""
    width = max(lengths)
    bins: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((b for b, free in enumerate(room) if lengths[row] <= free), None)
        if fit is None:
            bins.append([row])
            room.append(width - lengths[row])
        else:
            bins[fit].append(row)
            room[fit] -= lengths[row]
    return bins


def packed_layout(lengths: Sequence[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each slot of the bins reads from.

    Returns:
        ``row`` (N, W): the batch row of each slot, -1 for a bin's tail; ``col`` (N, W): the slot's position in
        that row; ``positions`` (N, W): the ``position_ids``, each row's own and the tail's restarting at 0 (so the
        tail is a sequence of its own that no row attends to).
    """
    width = max(lengths)
    bins = pack_bins(lengths)
    row = torch.full((len(bins), width), -1, dtype=torch.long)
    col = torch.zeros((len(bins), width), dtype=torch.long)
    positions = torch.zeros((len(bins), width), dtype=torch.long)
    for b, members in enumerate(bins):
        start = 0
        for member in members:
            n = lengths[member]
            row[b, start : start + n] = member
            col[b, start : start + n] = torch.arange(n)
            start += n
        positions[b] = torch.cat([col[b, :start], torch.arange(width - start)])
    return row.to(device), col.to(device), positions.to(device)


def packed_logps(
    lm: nn.Module,
    embed: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    fp32_head: bool,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-token response log-probs of right-padded rows, computed packed; ``None`` where a row's mask has holes
    (then only the padded pass is right).

    Args:
        lm: The causal LM.
        embed: Input vectors for ids, (N, L) → (N, L, H) (the control's learned slots included).
        ids, mask, labels: (B, T) the spliced rows.
        fp32_head: LM head and log-softmax in float32.

    Returns:
        ``token_logps`` and ``mask``, both (B, T-1), as the padded pass returns them.
    """
    lengths = mask.sum(-1)  # (B,)
    if not torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device) < lengths[:, None]):
        return None
    row, col, positions = packed_layout(lengths.tolist(), ids.device)  # (N, W) each
    real = row >= 0
    at = (row.clamp(min=0), col)
    bin_ids = torch.where(real, ids[at], 0)
    bin_labels = torch.where(real & (col > 0), labels[at], IGNORE_INDEX)  # a row's first token follows another row: unscored
    hidden = lm.get_decoder()(inputs_embeds=embed(bin_ids), position_ids=positions, use_cache=False).last_hidden_state
    bin_logps, bin_picked = response_token_logps(hidden, bin_labels, LMHead(lm, fp32=fp32_head))  # (N, W-1)
    rows, cols = row[:, 1:][bin_picked], col[:, 1:][bin_picked]  # the label at slot s is predicted at s - 1
    logps = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=bin_logps.dtype, device=ids.device)
    picked = torch.zeros(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool, device=ids.device)
    logps[rows, cols - 1] = bin_logps[bin_picked]
    picked[rows, cols - 1] = True
    return logps, picked


@torch.no_grad()
def check_packing(lm: nn.Module, name: str) -> None:
    """Refuses (``ConfigError``) a model whose attention lets packed rows see each other: two short random rows,
    packed and apart, must give the same hidden states."""
    decoder = lm.get_decoder()
    device = next(lm.parameters()).device
    vocab = lm.get_input_embeddings().weight.shape[0]
    first, second = (torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n)).to(device) for n in (5, 3))
    apart = [decoder(input_ids=row, use_cache=False).last_hidden_state[0] for row in (first, second)]
    positions = torch.cat([torch.arange(5), torch.arange(3)])[None].to(device)
    packed = decoder(input_ids=torch.cat([first, second], 1), position_ids=positions, use_cache=False).last_hidden_state[0]
    expected = torch.cat(apart)
    tolerance = 1e-3 if expected.dtype == torch.float32 else 5e-2
    if not torch.allclose(packed.float(), expected.float(), rtol=tolerance, atol=tolerance * float(expected.abs().max())):
        raise ConfigError(
            f"{name}: its attention lets packed rows attend to each other (it ignores the restarts in position_ids) "
            "— set model.init_args.pack_rows: false"
        )
