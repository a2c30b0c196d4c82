"""Stage 2: the LM and the control tokens fine-tuned jointly, starting from stage 1's controls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from typing_extensions import override

from meet_lightning.controls.files import load_controls
from meet_lightning.errors import ConfigError
from meet_lightning.modules.base import MeetModule

CONTROL_MODES = ("train", "frozen")
"""``JointFinetuneModule(controls=...)``: the controls train on in stage 2, or keep their stage-1 values."""


class JointFinetuneModule(MeetModule):
    """MEET stage 2: LM (full, or LoRA on the LM) and controls train together with separate learning rates.

    Args:
        init_controls: ``controls.safetensors`` written by stage 1 (set by ``fit`` for two-stage recipes);
            ``None`` keeps the control's own initialisation (the stage-2-only ablations).
        lm_lora_rank: ``0`` fine-tunes every LM weight; ``> 0`` trains a LoRA of this rank on the LM instead
            (merged into the weights on export), for small GPUs.
        lm_lora_alpha: Scaling numerator of the LM LoRA.
        lm_lora_target_modules: Linear layers the LM LoRA adapts.
        controls: What the controls do in this stage. ``train`` (default): they train on with the LM at
            ``control_lr``, with fresh AdamW moments (stage 1's optimizer state is not carried over; to continue
            at stage 1's rate, set ``control_lr`` to stage 1's ``lr``). ``frozen``: they keep stage 1's values and
            only the LM trains (as in ProMoT). ``train/update_ratio_controls`` and ``train/update_ratio_lm``
            show how far each step moves them either way.
        lr: Peak learning rate of the LM.
        control_lr: Peak learning rate of the controls.
        *args, **kwargs: The other arguments of :class:`~meet_lightning.modules.base.MeetModule`, passed on
            (``--help``, ``--print_config`` and the saved hyperparameters list them all).
    """

    def __init__(
        self,
        *args: Any,
        lr: float = 1e-5,
        control_lr: float | None = 1e-3,
        init_controls: str | None = None,
        lm_lora_rank: int = 0,
        lm_lora_alpha: float = 16.0,
        lm_lora_target_modules: list[str] | None = None,
        controls: str = "train",
        **kwargs: Any,
    ) -> None:
        if controls not in CONTROL_MODES:
            raise ConfigError(f"controls {controls!r} is not one of {', '.join(CONTROL_MODES)} — set model.init_args.controls")
        super().__init__(*args, lr=lr, control_lr=control_lr, **kwargs)

    @override
    def configure_model(self) -> None:
        fresh = self.lm is None
        super().configure_model()
        if fresh and self.hparams.init_controls:
            # A resumed stage 2 then restores its own trained controls from last.ckpt on top of these.
            load_controls(self.control, Path(self.hparams.init_controls), self.schema, self.base_fingerprint)

    def wrap_lm(self, lm: nn.Module) -> nn.Module:
        if self.hparams.lm_lora_rank <= 0:
            return lm
        from peft import LoraConfig, get_peft_model

        targets = self.hparams.lm_lora_target_modules or [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        config = LoraConfig(
            r=self.hparams.lm_lora_rank, lora_alpha=self.hparams.lm_lora_alpha, target_modules=targets, lora_dropout=0.0
        )
        return get_peft_model(lm, config)

    def configure_trainable(self) -> None:
        if self.hparams.lm_lora_rank <= 0:
            self.lm.requires_grad_(True)
        self.control.requires_grad_(self.hparams.controls == "train")

    def merged_lm(self) -> nn.Module:
        """The LM with any LM LoRA merged in (for export)."""
        return self.lm.merge_and_unload() if self.hparams.lm_lora_rank > 0 else self.lm
