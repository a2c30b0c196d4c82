"""The LightningModule every stage and baseline derives from.

Subclasses change what trains (:meth:`MeetModule.configure_trainable`) and the objective
(:meth:`MeetModule.compute_loss`); the forward pass through the controls, validation with the control
classifier, the optimizer, the schedule and checkpoint hygiene are shared here.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from meet_lightning.controls.packing import check_packing
from meet_lightning.controls.tokens import ControlTokens, build_control, controlled_response_logps, length_chunks
from meet_lightning.data.datamodule import PreferenceDataModule
from meet_lightning.data.rows import ControlSchema
from meet_lightning.data.tokenization import batch_part, batch_units, longest_batch
from meet_lightning.errors import CheckpointError, ConfigError, raise_failed
from meet_lightning.losses import (
    IGNORE_INDEX,
    control_classifier_scores,
    nll,
    pairwise_accuracy,
    per_response_nll,
    sequence_logps,
)
from meet_lightning.models import compile_decoder, load_model, load_tokenizer, model_fingerprint
from meet_lightning.precision import DTYPES
from meet_lightning.training.distributed import is_sharded, unwrapped_name
from meet_lightning.training.memory_probe import fewest_chunks, memory_of
from meet_lightning.update_probe import UpdateProbe

CPU_FORWARD_CHUNKS = 4
"""``forward_chunks`` on a CPU where unset: the same loss with less padding computed (on the same HH batches one
padded pass, TRL's, computed 11 % padding and four chunks 1.2 %: benchmarks/results/backward_per_chunk_2026-12-07)
and, with ``backward_per_chunk``, a quarter of the activations held."""


class MeetModule(L.LightningModule):
    """Shared base: an LM with control tokens, trained on response-only NLL.

    Args:
        model_name_or_path: The base LM (linked from the recipe's top-level key).
        control: Control implementation (linked from the recipe's top-level ``control``).
        control_schema: ``{preference: [controls]}`` (linked from the data).
        lr: Peak learning rate of the LM parameters (or of the controls when only they train).
        control_lr: Peak learning rate of the control parameters (default ``lr``).
        weight_decay: Decoupled weight decay of matrices (biases, norms and control tokens get none).
        warmup_steps: Linear warm-up steps before the cosine decay.
        min_lr_ratio: Final learning rate as a fraction of the peak.
        dtype: Dtype the LM weights are loaded in (``float32``; ``bfloat16`` halves memory).
        trust_remote_code: Allow the model's own code from the hub.
        gradient_checkpointing: Recompute each decoder layer's activations in backward instead of keeping them
            (less memory, about one more forward pass of compute); loss and gradients are unchanged.
        optimizer: ``adamw`` (torch's default implementation), ``adamw_foreach``, ``adamw_fused`` or
            ``adamw_8bit`` (bitsandbytes, where it supports the device).
        quantize: ``nf4`` loads the frozen LM in 4 bits through bitsandbytes (stage 1 only: the LM must not
            train; needs a CUDA GPU); ``None`` keeps ``dtype``.
        forward_chunks: Up to this many forward passes per batch: the rows sorted by length and cut where the
            fewest padding tokens remain, each pass padded only to its own longest row. Same loss and gradients
            with less padding computed (pairs are padded to their batch's longest row otherwise); 1 = one pass.
            ``None`` (default): 4 on a CPU (measured: :data:`CPU_FORWARD_CHUNKS`); on one CUDA device the fewest
            that fit its memory, found before the first step by running the batch's worst case (every row at
            ``data.max_length``) at 1, 2, 4, … chunks (:mod:`~meet_lightning.training.memory_probe`), since a
            pass of few rows waits on kernel launches (an H200 ran at ≈ 1 % MFU with 4); 1 on other
            accelerators and several devices (set more where one pass does not fit).
        per_response_loss: The training NLL is the mean of each response's own mean token NLL (every response
            counts once) instead of the mean over every response token of the batch, where a long response weighs
            as much as its length (in AlpacaEval's concise/verbose answers, verbose ones hold 70 % of the tokens).
            Validation's ``val/loss`` stays the token mean, so runs compare.
        share_prompt: The rows of a paired batch share one pass over their prompt where the control allows
            (:mod:`~meet_lightning.controls.shared_prompt`; infix, text or no controls; with a prefix control,
            the rows under one control): same loss and gradients in fp32. Off by default: on a 2-core CPU (SmolLM2-135M, HH pairs, 512 tokens, bf16) it measured no clear
            gain (stage 2 infix 2.08× TRL DPO pairs/s with it, 1.96× without, in two runs) and ~0.5 GiB more
            peak memory; not measured on a GPU yet.
        backward_per_chunk: Back-propagate each forward chunk's loss as soon as it is computed (gradient
            accumulation inside the step), so a training step holds one chunk's activations instead of all
            ``forward_chunks`` of them: the same gradients (tested in fp32), less peak memory (stage 2 on a 2-core
            CPU: 5.2 GiB instead of 7.1, at the same speed). Chunks keep a pair's two rows together. Only where the
            loss splits over rows or pairs (:meth:`loss_weight`) and the trainer runs on one device; elsewhere
            (DDP, FSDP, DeepSpeed) one backward, as with ``false``.
        pack_rows: Each forward pass packs its rows end to end without padding
            (:mod:`~meet_lightning.controls.packing`), where neither ``share_prompt`` applies nor the control routes
            weights per row (LoRA controls): same loss and gradients in fp32, no padding computed. For one forward
            pass over a batch of uneven rows (an accelerator); checked against the model at load (a model whose
            attention ignores the restarts in ``position_ids`` is refused). Off by default: not measured on a GPU yet.
        compile: ``torch.compile`` the LM's decoder layers (:func:`~meet_lightning.models.compile_decoder`):
            the first steps pay the compilation; loss and gradients are unchanged (tested in fp32). Its speed is
            not measured yet; not tested with FSDP or DeepSpeed.
    """

    def __init__(
        self,
        model_name_or_path: str = "",
        control: ControlTokens | None = None,
        control_schema: dict[str, list[str]] | None = None,
        lr: float = 1e-3,
        control_lr: float | None = None,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        optimizer: str = "adamw",
        quantize: str | None = None,
        forward_chunks: int | None = None,
        compile: bool = False,
        per_response_loss: bool = False,
        share_prompt: bool = False,
        backward_per_chunk: bool = True,
        pack_rows: bool = False,
    ) -> None:
        super().__init__()
        problems = [
            (not model_name_or_path, "no model: set --model_name_or_path"),
            (not 0 < lr < 1, f"lr {lr} must be in (0, 1) — set model.init_args.lr"),
            (
                control_lr is not None and not 0 < control_lr < 10,
                f"control_lr {control_lr} must be in (0, 10) — set model.init_args.control_lr",
            ),
            (weight_decay < 0, f"weight_decay {weight_decay} must be ≥ 0"),
            (warmup_steps < 0, f"warmup_steps {warmup_steps} must be ≥ 0"),
            (not 0 <= min_lr_ratio <= 1, f"min_lr_ratio {min_lr_ratio} must be in [0, 1]"),
            (dtype not in DTYPES, f"dtype {dtype!r} is not one of {', '.join(DTYPES)}"),
            (
                optimizer not in OPTIMIZERS,
                f"optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)} — set model.init_args.optimizer",
            ),
            (quantize not in (None, "nf4"), f"quantize {quantize!r} is not nf4 or null — set model.init_args.quantize"),
            (
                forward_chunks is not None and forward_chunks < 1,
                f"forward_chunks {forward_chunks} must be ≥ 1 (or null: chosen by device) — set model.init_args.forward_chunks",
            ),
        ]
        raise_failed(problems)
        self.control = build_control(control)
        self.save_hyperparameters(ignore=["control"])
        self.hparams["control"] = self.control.config()  # YAML types only: weights_only loading rebuilds it
        self.schema = ControlSchema.from_dict(control_schema or {})
        self.lm: nn.Module | None = None
        self._matrices: set[int] = set()  # ids of the ≥ 2-D parameters, recorded before any wrapping
        self.tokenizer: Any = None
        self.base_fingerprint = ""
        self._update_probe: UpdateProbe | None = None
        self._one_pass = False  # a chunk of backward_per_chunk runs in one forward pass
        self._zeroed_early = False  # backward_per_chunk zeroed the gradients before its chunks' backward
        self._memory_chunks: int | None = None  # forward chunks the memory probe chose (or is trying)
        self._probed = False

    # ------------------------------------------------------------------ model
    @override
    def configure_model(self) -> None:
        """Loads the LM and tokenizer, builds the controls, then decides what trains (once)."""
        if self.lm is not None:
            return
        self.tokenizer = load_tokenizer(self.hparams.model_name_or_path, trust_remote_code=self.hparams.trust_remote_code)
        quantization = nf4_config(self.device_type()) if self.hparams.quantize else None
        lm = load_model(
            self.hparams.model_name_or_path,
            DTYPES[self.hparams.dtype],
            trust_remote_code=self.hparams.trust_remote_code,
            quantization_config=quantization,
        )
        self.base_fingerprint = self.fingerprint_base(lm)
        if self.hparams.pack_rows:
            check_packing(lm, self.hparams.model_name_or_path)
        self.control.setup(lm, self.tokenizer, self.schema)
        if self.hparams.gradient_checkpointing:
            enable_gradient_checkpointing(lm, self.control)
        self.lm = self.wrap_lm(lm).train()  # from_pretrained returns eval mode; Lightning keeps modes as found
        if self.hparams.compile:
            compile_decoder(self.lm)
        self.configure_trainable()
        if quantization is not None and self.lm_parameters():
            raise ConfigError(f"quantize: nf4 keeps the LM frozen, but {type(self).__name__} trains it — use it in stage 1 only")
        # FSDP turns every parameter into a flat 1-D shard before configure_optimizers: which are matrices
        # (decayed) is decided here, on the shapes the model has. The Parameter objects survive the wrap.
        self._matrices = {id(p) for p in self.parameters() if p.ndim >= 2}

    def fingerprint_base(self, lm: nn.Module) -> str:
        """The base model's fingerprint, the one stage 2, the export and ``evaluate`` compute on its full weights.

        A 4-bit model's weights are packed and rounded, so its fingerprint would match nothing: with ``quantize``
        the full-precision base is loaded once more on the CPU (in ``dtype``), fingerprinted and dropped.
        """
        if not self.hparams.quantize:
            return model_fingerprint(lm)
        full = load_model(
            self.hparams.model_name_or_path, DTYPES[self.hparams.dtype], trust_remote_code=self.hparams.trust_remote_code
        )
        return model_fingerprint(full)

    def forward_passes(self) -> int:
        """Forward passes per batch: ``forward_chunks`` (by device where unset), or one where FSDP sharded the LM.

        FSDP frees each block's gathered weights after its forward and gathers them again for backward; several
        forwards of the same blocks before one backward left the ranks waiting in different collectives (2 CPU
        ranks hung in ``reduce_scatter``: tests/test_distributed.py).
        """
        if self._one_pass or is_sharded(self.lm):
            return 1
        chosen = self.hparams.forward_chunks if self.hparams.forward_chunks is not None else self._memory_chunks
        return chosen if chosen is not None else CPU_FORWARD_CHUNKS if self.device.type == "cpu" else 1

    def shares_prompt(self) -> bool:
        """Whether the rows of a paired batch share one pass over their prompt
        (:mod:`~meet_lightning.controls.shared_prompt`): with ``share_prompt``, except under FSDP, whose sharded blocks must run one
        forward per backward (see :meth:`forward_passes`)."""
        return self.hparams.share_prompt and not is_sharded(self.lm)

    def forward_options(self) -> dict[str, Any]:
        """How this module's forward passes run (``chunks``, ``share_prompt``, ``pack``), as
        :func:`~meet_lightning.controls.tokens.controlled_response_logps` and ``plain_logps`` take them."""
        return {"chunks": self.forward_passes(), "share_prompt": self.shares_prompt(), "pack": self.hparams.pack_rows}

    def device_type(self) -> str:
        """``cpu``/``cuda``/…: where the trainer runs this module (``cpu`` outside a trainer)."""
        return self._trainer.strategy.root_device.type if self._trainer is not None else "cpu"

    def wrap_lm(self, lm: nn.Module) -> nn.Module:
        """Hook for subclasses that wrap the LM (LoRA on the LM); returns it unchanged by default."""
        return lm

    def configure_trainable(self) -> None:
        """Decides which parameters train. Default: everything (LM and controls)."""

    def lm_parameters(self) -> list[nn.Parameter]:
        """Trainable LM parameters (not the controls)."""
        return [p for p in self.lm.parameters() if p.requires_grad]

    def control_parameters(self) -> list[nn.Parameter]:
        """Trainable control parameters."""
        return [p for p in self.control.parameters() if p.requires_grad]

    # ---------------------------------------------------------------- forward
    def response_logps(
        self, batch: Mapping[str, torch.Tensor], control_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of each row's response under its controls (or ``control_ids`` (B, P)).

        Returns:
            ``token_logps`` and ``mask``, both (B, T-1) over the spliced sequence.
        """
        # scoring (validation, test) takes the head in fp32: close pairs must not be decided by bf16 rounding
        return controlled_response_logps(
            self.lm,
            self.control,
            batch,
            control_ids,
            fp32_head=not self.training,
            **self.forward_options(),
        )

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The training objective: response-only NLL under each row's controls. Override for new objectives.

        Returns:
            A dict with at least ``loss``; every other entry is logged as ``train/<key>``.
        """
        token_logps, mask = self.response_logps(batch)
        return {"loss": self.training_nll(token_logps, mask)}

    def training_nll(self, token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The NLL part of the training loss: per token, or per response with ``per_response_loss``."""
        return per_response_nll(token_logps, mask) if self.hparams.per_response_loss else nll(token_logps, mask)

    def loss_weight(self, batch: Mapping[str, torch.Tensor]) -> float | None:
        """How much a part of a batch counts in the batch's loss: the training loss of a batch is the mean of its
        parts' losses weighted by this (response tokens for the token-mean NLL, responses with
        ``per_response_loss``). ``None`` where the loss does not split that way (``backward_per_chunk`` then runs
        one backward). Override it with :meth:`compute_loss`: a subclass that overrides only
        :meth:`compute_loss` runs one backward (:func:`splits_loss`)."""
        counted = batch["labels"] != IGNORE_INDEX  # (B, L)
        return float(counted.any(-1).sum() if self.hparams.per_response_loss else counted.sum())

    @override
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        parts = self.backward_parts(batch)
        out = self._loss_in_parts(parts, batch_idx) if parts else self.compute_loss(batch)
        rows = batch["input_ids"].shape[0]
        for key, value in out.items():
            self.log(f"train/{key}", value, prog_bar=key == "loss", batch_size=rows)
        self.log("train/tokens", batch["attention_mask"].sum().float(), reduce_fx="sum", batch_size=rows)
        return out["loss"]

    def backward_parts(self, batch: Mapping[str, torch.Tensor]) -> list[tuple[dict[str, torch.Tensor], float]]:
        """The parts of a training batch that ``backward_per_chunk`` back-propagates one by one, with their
        :meth:`loss_weight`; empty where the batch runs as one (the option off, several devices, one chunk, a loss
        that does not split)."""
        single = isinstance(self.trainer.strategy, SingleDeviceStrategy)
        if not (self.hparams.backward_per_chunk and single and self.forward_passes() > 1 and splits_loss(type(self))):
            return []
        groups = length_chunks(batch_units(batch), self.forward_passes())
        parts = [batch_part(batch, group) for group in groups]
        weights = [self.loss_weight(part) for part in parts]
        if len(parts) < 2 or None in weights or not sum(weights):
            return []
        return list(zip(parts, weights, strict=True))

    def _loss_in_parts(self, parts: list[tuple[dict[str, torch.Tensor], float]], batch_idx: int) -> dict[str, torch.Tensor]:
        """:meth:`compute_loss` of each part, back-propagated at once but for the last, which Lightning
        back-propagates as usual; every entry is the parts' mean weighted by :meth:`loss_weight`."""
        accumulate = self.trainer.accumulate_grad_batches
        if batch_idx % accumulate == 0:  # Lightning zeroes gradients after training_step: the parts' come first
            self.optimizers().optimizer.zero_grad()
            self._zeroed_early = True
        total = sum(weight for _, weight in parts)
        summed: dict[str, torch.Tensor] = {}
        for i, (part, weight) in enumerate(parts):
            self._one_pass = True
            try:
                out = self.compute_loss(part)
            finally:
                self._one_pass = False
            loss = out["loss"] * (weight / total)
            if i < len(parts) - 1:
                self.trainer.strategy.backward(loss / accumulate, None)
                loss = loss.detach()  # the last part's loss carries the gradient Lightning computes; the sum is logged
            for key, value in out.items():
                summed[key] = summed.get(key, 0) + (loss if key == "loss" else value.detach() * (weight / total))
        return summed

    @override
    def on_train_batch_start(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        """Before this fit's first step: ``forward_chunks`` from the device's memory where it is unset."""
        if not self._probed:
            self._probed = True
            self._memory_chunks = self.probe_forward_chunks(batch)

    def probe_forward_chunks(self, batch: Mapping[str, torch.Tensor]) -> int | None:
        """The fewest forward chunks at which a step on the worst case of ``batch`` (every row continued to
        ``data.max_length``) fits the device with the optimizer's state
        (:func:`~meet_lightning.training.memory_probe.fewest_chunks`); ``None`` (the device's default) where
        ``forward_chunks`` is set, the device's memory cannot be read, or the trainer runs on several devices.
        Leaves no gradient and no random state."""
        memory = memory_of(self.device)
        single = isinstance(self.trainer.strategy, SingleDeviceStrategy)
        if self.hparams.forward_chunks is not None or not single or memory.capacity() is None:
            return None
        datamodule = self.trainer.datamodule
        length = datamodule.max_length if isinstance(datamodule, PreferenceDataModule) else batch["input_ids"].shape[1]
        longest = longest_batch(batch, length)
        units = len(batch_units(longest))
        what = f"{units} {'pairs' if 'num_pairs' in batch else 'rows'} of {length} tokens"
        rng_devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), self.trainer.precision_plugin.train_step_context():
            chunks = fewest_chunks(lambda c: self._probe_step(longest, c), memory, self.optimizer_state_bytes(), units, what)
        rank_zero_info(f"forward_chunks: {chunks} (the fewest at which {what} fit {memory.name})")
        return chunks

    def _probe_step(self, batch: Mapping[str, torch.Tensor], chunks: int) -> None:
        """A training step's forwards and backwards at ``chunks`` forward chunks, its gradients then dropped."""
        self._memory_chunks = chunks
        try:
            parts = self.backward_parts(batch) or [(batch, 1.0)]
            for part, _ in parts:
                self._one_pass = len(parts) > 1
                self.compute_loss(part)["loss"].backward()
        finally:
            self._one_pass = False
            self._memory_chunks = None
            self.zero_grad(set_to_none=True)

    def optimizer_state_bytes(self) -> int:
        """Bytes the optimizer's state will take at its first step (two moments per trainable element); 0 once it
        exists (a resumed run)."""
        if any(optimizer.state for optimizer in self.trainer.optimizers):
            return 0
        moment = MOMENT_BYTES.get(self.hparams.optimizer)
        params = [*self.lm_parameters(), *self.control_parameters()]
        return sum(2 * p.numel() * (moment or p.element_size()) for p in params)

    @override
    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Zeroes the gradients, unless ``backward_per_chunk`` did so before this step's first backward."""
        if self._zeroed_early:
            self._zeroed_early = False
            return
        super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    # ------------------------------------------------------------- validation
    @override
    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        with self.full_precision():
            self._evaluate(batch, "val")

    @override
    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        with self.full_precision():
            self._evaluate(batch, "test")

    def full_precision(self) -> torch.autocast:
        """Metrics in the weights' own precision: mixed precision's autocast is turned off for validation and test.

        A control-classifier margin sums log-probs over a whole response, so bf16 rounding adds up: on 62 held-out
        AlpacaEval pairs the demo model's margins moved by 1.36 nats on average (of 6.0) under bf16 and 5
        decisions flipped. Under ``bf16-mixed`` the weights are fp32, so the reported metrics (and the checkpoint
        chosen by ``select: best``) no longer depend on whether the hardware computes bf16; ``bf16-true`` weights
        stay bf16.
        """
        return torch.autocast(self.device.type, enabled=False)

    def _evaluate(self, batch: Mapping[str, torch.Tensor], split: str) -> None:
        token_logps, mask = self.response_logps(batch)
        rows = batch["input_ids"].shape[0]
        self.log(f"{split}/loss", nll(token_logps, mask), batch_size=rows, sync_dist=True, prog_bar=True)
        if "num_pairs" in batch and self.schema.num_controls:
            accuracy, margin = self.control_accuracy(batch, sequence_logps(token_logps, mask))
            pairs = int(batch["num_pairs"])
            self.log(f"{split}/control_accuracy", accuracy.mean(), batch_size=pairs, sync_dist=True, prog_bar=True)
            self.log(f"{split}/control_margin", margin.mean(), batch_size=pairs, sync_dist=True)

    def control_accuracy(self, batch: Mapping[str, torch.Tensor], own_logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Control-classifier accuracy on a paired batch ``[chosen; rejected]``; ties count half.

        Args:
            batch: Paired batch; rows carry their training controls (chosen → good, rejected → bad).
            own_logps: (2B,) response log-probs under those controls.

        Returns:
            Per-pair accuracy (B,) and margin ``score(chosen) − score(rejected)`` (B,).
        """
        pairs = int(batch["num_pairs"])
        ids = batch["control_ids"]
        swapped = torch.cat([ids[pairs:], ids[:pairs]])  # chosen under bad, rejected under good
        other_logps = sequence_logps(*self.response_logps(batch, swapped))  # (2B,)
        chosen_score = control_classifier_scores(own_logps[:pairs], other_logps[:pairs])
        rejected_score = control_classifier_scores(other_logps[pairs:], own_logps[pairs:])
        return pairwise_accuracy(chosen_score, rejected_score), chosen_score - rejected_score

    # -------------------------------------------------------------- optimizer
    def merged_lm(self) -> nn.Module:
        """The LM to export, loadable by plain ``transformers``. Override when the LM carries adapters to merge."""
        return self.lm

    def export_metadata(self) -> dict[str, Any]:
        """More fields for the export's schema file (e.g. DPO: its objective and reference). None by default."""
        return {}

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with LM and control parameter groups, linear warm-up then cosine decay per step."""
        decay = [p for p in self.lm_parameters() if id(p) in self._matrices or p.ndim >= 2]
        no_decay = [p for p in self.lm_parameters() if not (id(p) in self._matrices or p.ndim >= 2)]
        control_lr = self.hparams.control_lr or self.hparams.lr
        groups = [
            {"params": decay, "lr": self.hparams.lr, "weight_decay": self.hparams.weight_decay},
            {"params": no_decay, "lr": self.hparams.lr, "weight_decay": 0.0},
            {"params": self.control_parameters(), "lr": control_lr, "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise ConfigError(f"{type(self).__name__} has nothing to train — check the control and lm settings")
        optimizer = OPTIMIZERS[self.hparams.optimizer](groups)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Samples the trainable weights before the step, for ``train/update_ratio_{controls,lm}``."""
        if self._update_probe is None:
            self._update_probe = UpdateProbe({"controls": self.control_parameters(), "lm": self.lm_parameters()})
        self._update_probe.snapshot()

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Logs how far the step moved the controls and the LM (‖Δθ‖ / ‖θ‖): an inert stage shows as ~0."""
        for group, ratio in (self._update_probe.ratios() if self._update_probe else {}).items():
            self.log(f"train/update_ratio_{group}", ratio, batch_size=1)

    # ------------------------------------------------------------- checkpoint
    data_identity = ""
    """What the stage trains on (:func:`~meet_lightning.data.cache.data_identity`), set by the pipeline and
    recorded in every checkpoint: a resume on edited data is refused instead of mixing two datasets."""

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keeps only trainable tensors, and records the base model, control schema and data identity."""
        # Every name of a trainable tensor, tied ones too (a tied LM head): FSDP loads checkpoints strictly,
        # before on_load_checkpoint can fill gaps. Under FSDP the names carry wrapper segments; state-dict keys do not.
        named = self.named_parameters(remove_duplicate=False)
        trainable = {unwrapped_name(n) for n, p in named if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["meet"] = {
            "module": f"{type(self).__module__}.{type(self).__name__}",
            "fingerprint": self.base_fingerprint,
            "schema": self.schema.to_dict(),
            "control": self.control.config(),
            "data": self.data_identity,
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses a checkpoint of another base model or schema; fills frozen tensors from the base model."""
        meta = checkpoint.get("meet")
        if meta is None:
            raise CheckpointError("checkpoint has no meet_lightning metadata — pass a checkpoint written by meet_lightning")
        if meta["fingerprint"] != self.base_fingerprint:
            raise CheckpointError(
                f"checkpoint was trained on another base model (fingerprint {meta['fingerprint']} ≠ {self.base_fingerprint}) — use the model_name_or_path it was trained with"
            )
        if meta["schema"] != self.schema.to_dict():
            raise CheckpointError(
                f"checkpoint control schema {meta['schema']} ≠ this run's {self.schema.to_dict()} — use the same data preferences"
            )
        if "state_dict" not in checkpoint:  # FSDP loaded (and removed) it before this hook, strictly
            return
        own = self.state_dict()
        checkpoint["state_dict"] = {**own, **checkpoint["state_dict"]}


def enable_gradient_checkpointing(lm: nn.Module, control: ControlTokens) -> None:
    """Turns on the LM's own activation checkpointing, recomputing each layer under the routing it ran with.

    Non-reentrant checkpointing recomputes a layer during backward, after :meth:`ControlTokens.route` has
    exited; ``context_fn`` re-enters the control's routing for the recomputation (LoRA controls' per-row deltas),
    so the recomputed activations, and so the gradients, are those of the forward pass.
    """

    def contexts() -> tuple[Any, Any]:
        return contextlib.nullcontext(), control.recompute_context()

    kwargs = {"use_reentrant": False, "context_fn": contexts}
    if callable(getattr(lm, "activation_checkpointing_enable", None)):  # transformers ≥ 5.x renamed it (old name warns)
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    lm.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation


def _bitsandbytes_adamw(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(
            "optimizer adamw_8bit needs the bitsandbytes package — pip install bitsandbytes, or use adamw"
        ) from None
    return bitsandbytes.optim.AdamW8bit(groups)


def _fused_adamw(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(groups, fused=True)
    # A fused AdamW says it unscales a GradScaler's gradients inside its kernel, and Lightning's mixed-precision
    # plugin then refuses gradient clipping (every recipe clips). Unscaled before the step like any optimizer
    # instead, it clips and steps as the others do (bf16 has no scaler at all); only fp16's in-kernel unscale is lost.
    optimizer._step_supports_amp_scaling = False
    return optimizer


OPTIMIZERS = {
    "adamw": lambda groups: torch.optim.AdamW(groups),
    "adamw_foreach": lambda groups: torch.optim.AdamW(groups, foreach=True),
    "adamw_fused": _fused_adamw,
    "adamw_8bit": _bitsandbytes_adamw,
}
"""``optimizer`` choices: AdamW implementations (same update; memory and speed differ, 8-bit stores its moments in 8 bits)."""
MOMENT_BYTES = {"adamw_8bit": 1}
"""Bytes per element of each of an optimizer's two moments where not the parameter's own (memory probe)."""


def nf4_config(device_type: str) -> Any:
    """A transformers ``BitsAndBytesConfig`` for a frozen 4-bit (NF4) LM; ConfigError naming what is missing."""
    if device_type != "cuda":
        raise ConfigError(
            f"quantize: nf4 needs a CUDA GPU (this stage runs on {device_type}) and the bitsandbytes package — set quantize: null here"
        )
    try:
        import bitsandbytes  # noqa: F401 - transformers needs it to load in 4 bits
    except ImportError:
        raise ConfigError(
            "quantize: nf4 needs the bitsandbytes package — pip install bitsandbytes, or set quantize: null"
        ) from None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """Learning-rate multiplier: linear warm-up to 1 over ``warmup`` steps, then cosine down to ``floor``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def splits_loss(module_class: type[MeetModule]) -> bool:
    """Whether ``module_class``'s :meth:`~MeetModule.loss_weight` describes its :meth:`~MeetModule.compute_loss`: it
    is defined by the class that defines the objective, or by a subclass of it. A subclass that overrides only the
    objective keeps one backward per step rather than a weight written for another loss."""

    def definer(name: str) -> type:
        return next(k for k in module_class.__mro__ if name in vars(k))

    return issubclass(definer("loss_weight"), definer("compute_loss"))
