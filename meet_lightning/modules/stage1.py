"""Stage 1: control tokens trained on a frozen LM."""

from __future__ import annotations

from meet_lightning.modules.base import MeetModule


class ControlTokenModule(MeetModule):
    """MEET stage 1: only the control tokens train; the LM is frozen and bit-identical afterwards.

    The LM's parameters do not require grad, so backward computes input gradients only (no weight
    gradients), the optimizer never sees them, and checkpoints do not contain them. Takes the same arguments
    as :class:`~meet_lightning.modules.base.MeetModule`; ``lr`` is the control tokens' learning rate.
    """

    def configure_trainable(self) -> None:
        self.lm.requires_grad_(False)
        self.control.requires_grad_(True)
        if not list(self.control.parameters()):
            raise ValueError(
                f"{type(self.control).__name__} has no parameters to train in stage 1 — use PromptTuningControl or LoRAControl"
            )
