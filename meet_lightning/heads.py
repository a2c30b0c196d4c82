"""The LM head as the model's own forward applies it: the output embedding, then the model's logit processing.

Losses and scoring compute logits only at response positions, from the decoder's hidden states, so they must
repeat what ``model.forward`` does after the decoder. Some architectures do more than the output projection:
Cohere multiplies the logits by ``logit_scale``, Granite divides them by ``logits_scaling``, Gemma 2 and 3 cap
them with ``final_logit_softcapping``. :class:`LMHead` reproduces those; :func:`check_lm_head` refuses a model
whose own logits differ from it anyway, instead of training on wrong log-probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meet_lightning.errors import ConfigError

CHECK_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
"""Largest |Δ logit| (relative to the largest logit) between :class:`LMHead` and the model's own forward that
:func:`check_lm_head` accepts; 3e-2 for 16-bit weights, whose forward rounds its logits. Every processing this
guards against (a scale of 0.0625, a cap of 30) changes logits far more."""


def is_checkpointed(lm: nn.Module) -> bool:
    """Whether the LM recomputes its layers in backward (its gradient checkpointing is on)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in lm.modules())


class LMHead:
    """Logits from last hidden states, exactly as the model's forward computes them.

    Args:
        lm: A causal LM (or a peft model wrapping one).
        fp32: Compute in float32 even under bf16 autocast or with bf16 weights. Scoring sets it: the control
            classifier subtracts two sums of log-probs, and bf16 logits (8 bits of mantissa) decide close
            pairs by rounding. Training keeps the autocast dtype (the head is a fifth of its FLOPs).

    ``recompute`` follows the LM's gradient checkpointing: with it on, the logits are not kept for backward but
    computed again there, a chunk of positions at a time (:func:`~meet_lightning.losses.response_token_logps`).
    Logits are (positions × vocabulary): with the layers checkpointed they are most of what a step keeps.
    """

    def __init__(self, lm: nn.Module, fp32: bool = False) -> None:
        config = lm.config
        self.out: nn.Module = lm.get_output_embeddings()
        self.fp32 = fp32
        self.recompute = is_checkpointed(lm)  # nothing routes the head (LoRA controls refuse it): no context to re-enter
        self.scale = float(getattr(config, "logit_scale", None) or 1.0)  # Cohere: logits × scale
        self.divisor = float(getattr(config, "logits_scaling", None) or 1.0)  # Granite: logits ÷ scaling
        self.cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3: cap · tanh(logits / cap)

    def __call__(self, states: torch.Tensor) -> torch.Tensor:
        """(N, H) hidden states → (N, V) logits."""
        logits = self.project_fp32(states) if self.fp32 else self.out(states)
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.divisor != 1.0:
            logits = logits / self.divisor
        if self.cap:
            logits = torch.tanh(logits / self.cap) * self.cap
        return logits

    def project_fp32(self, states: torch.Tensor) -> torch.Tensor:
        """The output projection in float32, outside autocast (forward hooks on the head still run for fp32
        weights; with bf16 weights the weight is upcast for this product)."""
        with torch.autocast(states.device.type, enabled=False):
            weight = self.out.weight
            if weight.dtype == torch.float32:
                return self.out(states.float())
            bias = getattr(self.out, "bias", None)
            return F.linear(states.float(), weight.float(), None if bias is None else bias.float())


@torch.no_grad()
def check_lm_head(lm: nn.Module, name: str) -> None:
    """ConfigError when :class:`LMHead` does not give the model's own logits (an unknown logit processing).

    Runs one forward of six tokens outside autocast (milliseconds on small models), in eval mode.
    """
    was_training = lm.training
    lm.eval()
    try:
        vocab = lm.get_input_embeddings().weight.shape[0]
        ids = torch.arange(1, 7, device=lm.get_input_embeddings().weight.device).remainder(vocab)[None]  # (1, 6)
        with torch.autocast(ids.device.type, enabled=False):
            own = lm(input_ids=ids).logits.float()  # (1, 6, V)
            hidden = lm.get_decoder()(input_ids=ids).last_hidden_state
            ours = LMHead(lm, fp32=True)(hidden[0])[None]
    finally:
        lm.train(was_training)
    gap = float((own - ours).abs().max())
    scale = max(float(own.abs().max()), 1.0)
    if gap > CHECK_TOLERANCE.get(lm.get_input_embeddings().weight.dtype, 3e-2) * scale:
        raise ConfigError(
            f"model {name}: its forward post-processes logits in a way meet_lightning does not reproduce"
            f" (max |Δ logit| {gap:.3g}) — this architecture ({type(lm).__name__}) is not supported; use another"
            " --model_name_or_path"
        )
