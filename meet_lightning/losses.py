"""Pure tensor functions: response log-probabilities, NLL, DPO and the control classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from meet_lightning.heads import LMHead

IGNORE_INDEX = -100


def response_token_logps(
    hidden: torch.Tensor, labels: torch.Tensor, head: LMHead, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the labelled tokens, computing logits only where a label exists.

    The LM head is ~21 % of SmolLM2's forward FLOPs; prompt positions never need it. Where ``head.recompute`` (the
    LM's gradient checkpointing) and gradients are on, each chunk's logits are computed again in backward instead
    of being kept: the same values and gradients, one chunk of (positions × vocabulary) logits held at a time.

    Args:
        hidden: (B, T, H) last hidden states.
        labels: (B, T) token ids, ``-100`` where there is nothing to predict (unshifted: the label at ``t`` is
            predicted from position ``t - 1``).
        head: The LM head, (N, H) → (N, V) (:class:`~meet_lightning.heads.LMHead`), which applies the model's
            own logit processing and, for scoring, computes in float32.
        chunk: Positions per head call, bounding the (N, V) logits held at once.

    Returns:
        ``logps`` (B, T-1) with 0 where unlabelled, and ``mask`` (B, T-1) bool of labelled positions.
    """
    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE_INDEX
    states = hidden[:, :-1][mask]  # (N, H) only positions that predict a response token
    picked = targets[mask]  # (N,)

    def picked_logps(states: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:  # (n, H), (n,) → (n,)
        return -F.cross_entropy(head(states).float(), picked, reduction="none")

    recompute = head.recompute and torch.is_grad_enabled()
    parts = [
        checkpoint(picked_logps, states[s : s + chunk], picked[s : s + chunk], use_reentrant=False)
        if recompute
        else picked_logps(states[s : s + chunk], picked[s : s + chunk])
        for s in range(0, states.shape[0], chunk)
    ]
    logps = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    logps[mask] = torch.cat(parts) if parts else logps[mask]
    return logps, mask


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """(B,) summed (or per-token averaged) log-probability of each row's response."""
    total = (token_logps * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood over every response token of the batch (a scalar): the training loss."""
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)


def per_response_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over responses (those with at least one token) of each one's mean token NLL (a scalar): every
    response counts once, however long, where :func:`nll` weighs each by its length."""
    present = mask.sum(-1) > 0  # (B,)
    return response_nll(token_logps[present], mask[present]).mean() if present.any() else nll(token_logps, mask)


def response_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) each response's mean per-token negative log-likelihood.

    ``chosen_nll`` (``evaluate`` and ``val/chosen_nll`` alike) is the mean of this over the chosen responses:
    every response counts once whatever its length, so a few long answers do not decide it.
    """
    return -sequence_logps(token_logps, mask, average=True)


def pairwise_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """(B,) 1 where chosen scores higher, 0.5 on a tie, 0 otherwise."""
    return (chosen_scores > rejected_scores).float() + 0.5 * (chosen_scores == rejected_scores).float()


def control_classifier_scores(logps_good: torch.Tensor, logps_bad: torch.Tensor) -> torch.Tensor:
    """MEET's control classifier: ``log p(y | x, good) − log p(y | x, bad)`` per response, (N,)."""
    return logps_good - logps_bad


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al., 2023) on summed response log-probs, each (B,).

    Returns:
        The mean loss, and the implicit rewards ``beta · (policy − reference)`` of chosen and rejected (B,).
    """
    chosen_reward = beta * (policy_chosen - reference_chosen)
    rejected_reward = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    return loss, chosen_reward.detach(), rejected_reward.detach()
