"""Baselines in MEET's harness: SFT on chosen responses, DPO, and MEET's stage 2 with an added DPO-style term.

Chain of Hindsight and the special-token baseline need no module of their own: they are
:class:`~meet_lightning.modules.stage2.JointFinetuneModule` with a ``TextControl`` or ``SpecialTokenControl``
(see ``configs/baselines/``).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from meet_lightning.controls.tokens import plain_logps
from meet_lightning.errors import CheckpointError, ConfigError, raise_failed
from meet_lightning.losses import dpo_loss, nll, pairwise_accuracy, response_nll, sequence_logps
from meet_lightning.models import load_model, model_fingerprint
from meet_lightning.modules.base import MeetModule
from meet_lightning.modules.stage2 import JointFinetuneModule
from meet_lightning.precision import DTYPES


def require_pairs(batch: Mapping[str, torch.Tensor], who: str) -> int:
    """The number of pairs of a paired batch ``[chosen; rejected]``; ConfigError naming the fix otherwise."""
    if "num_pairs" not in batch:
        raise ConfigError(f"{who} trains on paired batches — set data.pair_batches: true (--data.pair_batches true)")
    return int(batch["num_pairs"])


def pair_keys(batch: Mapping[str, torch.Tensor]) -> list[str]:
    """One key per pair of a paired batch: a hash of both rows' unpadded token ids and response starts.

    Padding is left out, so a pair has the same key in any batch it lands in.
    """
    pairs = int(batch["num_pairs"])
    ids = batch["input_ids"].detach().cpu()
    mask = batch["attention_mask"].detach().cpu().bool()
    starts = batch["response_start"].detach().cpu()
    keys = []
    for i in range(pairs):
        digest = hashlib.blake2b(digest_size=16)
        for row in (i, i + pairs):
            digest.update(ids[row][mask[row]].numpy().tobytes())
            digest.update(int(starts[row]).to_bytes(8, "little"))
        keys.append(digest.hexdigest())
    return keys


def check_paired_data(module: MeetModule, stage: str) -> None:
    """Refuses, before the first step, to fit a pairwise objective on a data module that serves single rows."""
    data = module.trainer.datamodule
    if stage == "fit" and getattr(data, "pair_batches", True) is False:
        raise ConfigError(
            f"{type(module).__name__} trains on paired batches — set data.pair_batches: true (--data.pair_batches true)"
        )


def check_plain(module: MeetModule) -> None:
    """Refuses a control implementation on a baseline that trains the plain LM."""
    if module.control.steers:
        raise ConfigError(
            f"{type(module).__name__} trains the plain LM without control tokens, but the recipe sets "
            f"{type(module.control).__name__} — remove `control` from the recipe (--control null)"
        )


class _PlainPairMetrics:
    """Validation of plain-LM baselines: per-token log-prob accuracy and chosen NLL on paired batches."""

    def log_plain_pair_metrics(self, token_logps: torch.Tensor, mask: torch.Tensor, pairs: int, split: str) -> None:
        per_token = sequence_logps(token_logps, mask, average=True)  # (2B,) [chosen; rejected]
        accuracy = pairwise_accuracy(per_token[:pairs], per_token[pairs:])
        self.log(f"{split}/logp_accuracy", accuracy.mean(), batch_size=pairs, sync_dist=True)
        self.log(f"{split}/chosen_nll", response_nll(token_logps[:pairs], mask[:pairs]).mean(), batch_size=pairs, sync_dist=True)


class SFTModule(_PlainPairMetrics, MeetModule):
    """The SFT baseline: every LM weight fine-tuned on the chosen responses only, no control tokens.

    Training rows come from ``data.chosen_only: true`` (only the chosen side of each pair is tokenized); on a
    paired batch the rejected half is ignored. Plain rows of unknown side are refused, so a recipe can never
    train on rejected responses by mistake. Validation logs ``val/loss`` (NLL of the chosen responses),
    ``val/chosen_nll`` and ``val/logp_accuracy`` (per-token log-prob of chosen > rejected, ties half).

    Args:
        lr: Peak learning rate of the LM.
        *args, **kwargs: The other arguments of :class:`~meet_lightning.modules.base.MeetModule`, passed on;
            ``control`` must be unset (the no-op :class:`~meet_lightning.controls.tokens.ControlTokens`) and
            ``control_lr`` is unused (there are no controls).
    """

    def __init__(self, *args: Any, lr: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(*args, lr=lr, **kwargs)
        check_plain(self)

    @override
    def setup(self, stage: str) -> None:
        data = self.trainer.datamodule
        if stage == "fit" and hasattr(data, "chosen_only") and not (data.chosen_only or data.pair_batches):
            raise ConfigError("SFTModule trains on chosen responses only — set data.chosen_only: true (--data.chosen_only true)")

    def configure_trainable(self) -> None:
        self.lm.requires_grad_(True)

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """NLL of the chosen responses (the whole batch, or the chosen half of a paired batch)."""
        token_logps, mask = plain_logps(self.lm, batch, **self.forward_options())  # (B, T-1)
        if "num_pairs" in batch:
            pairs = int(batch["num_pairs"])
            token_logps, mask = token_logps[:pairs], mask[:pairs]
        return {"loss": self.training_nll(token_logps, mask)}

    @override
    def loss_weight(self, batch: Mapping[str, torch.Tensor]) -> float | None:
        """As the base class's, over the chosen half of a paired batch (the rows the loss counts)."""
        pairs = int(batch["num_pairs"]) if "num_pairs" in batch else batch["labels"].shape[0]
        return super().loss_weight({"labels": batch["labels"][:pairs]})

    def _evaluate(self, batch: Mapping[str, torch.Tensor], split: str) -> None:
        token_logps, mask = plain_logps(
            self.lm,
            batch,
            fp32_head=True,
            **self.forward_options(),
        )
        if "num_pairs" not in batch:
            self.log(f"{split}/loss", nll(token_logps, mask), batch_size=mask.shape[0], sync_dist=True, prog_bar=True)
            return
        pairs = int(batch["num_pairs"])
        self.log(f"{split}/loss", nll(token_logps[:pairs], mask[:pairs]), batch_size=pairs, sync_dist=True, prog_bar=True)
        self.log_plain_pair_metrics(token_logps, mask, pairs, split)


class DPOModule(_PlainPairMetrics, MeetModule):
    """Direct Preference Optimization (Rafailov et al., 2023) of the plain LM against a frozen reference.

    The reference is the base LM as loaded, before any update: either a frozen deep copy kept next to the
    policy (``precompute_reference: false``), or log-probs computed once per pair when training starts and
    cached by a hash of the pair's token ids (``precompute_reference: true``; no second model during
    training). The reference is never a registered submodule: it is not in ``state_dict``, in checkpoints or in
    the optimizer, and ``train()`` never switches it out of eval mode. The cache travels in the checkpoint
    (``dpo_reference_logps``: plain floats), so a resumed run does not recompute it; a pair missing from the
    cache is scored by the base model, reloaded from ``model_name_or_path`` when the policy has moved.

    Needs paired batches (``data.pair_batches: true``; ``data.batch_size`` then counts pairs). Logs
    ``train/loss`` (DPO), ``train/reward_accuracy``, ``train/reward_margin``; validation logs ``val/loss``
    (DPO), ``val/dpo_reward_accuracy`` (implicit reward of chosen > rejected, ties half),
    ``val/dpo_reward_margin``, ``val/chosen_nll`` and ``val/logp_accuracy``. The export records
    ``objective: dpo``, ``dpo_beta`` and the reference (``base_model``), so ``evaluate`` can score
    ``dpo_reward_accuracy`` against it.

    Args:
        lr: Peak learning rate of the LM.
        beta: DPO temperature: strength of the implicit KL penalty to the reference.
        precompute_reference: Cache reference log-probs per pair instead of keeping a second model.
        *args, **kwargs: The other arguments of :class:`~meet_lightning.modules.base.MeetModule`, passed on;
            ``model_name_or_path`` is also the reference (loaded in the same ``dtype``), ``control`` must be
            unset and ``control_lr`` is unused.
    """

    def __init__(
        self, *args: Any, lr: float = 1e-6, beta: float = 0.1, precompute_reference: bool = False, **kwargs: Any
    ) -> None:
        if not beta > 0:
            raise ConfigError(f"beta {beta} must be > 0 — set model.init_args.beta (e.g. 0.1)")
        super().__init__(*args, lr=lr, **kwargs)
        check_plain(self)
        self.reference_cache: dict[str, tuple[float, float]] = {}
        """``{pair key: (reference logp of chosen, of rejected)}`` when precomputing."""
        self.reference_cache_hits = 0
        """Pairs whose reference log-probs came from the cache."""
        self.reference_cache_misses = 0
        """Pairs whose reference log-probs had to be computed by a model."""
        object.__setattr__(self, "_reference", None)  # not a submodule: never saved, optimized or put in train mode
        self._cache_filled = False

    @override
    def setup(self, stage: str) -> None:
        check_paired_data(self, stage)

    # ------------------------------------------------------------- reference
    @override
    def configure_model(self) -> None:
        fresh = self.lm is None
        super().configure_model()
        if fresh and not self.hparams.precompute_reference:
            # Copied before any checkpoint weights are loaded into the policy: the copy is the base model.
            object.__setattr__(self, "_reference", self._frozen(copy.deepcopy(self.lm)))

    def configure_trainable(self) -> None:
        self.lm.requires_grad_(True)

    @staticmethod
    def _frozen(lm: nn.Module) -> nn.Module:
        return lm.requires_grad_(False).eval()

    def reference_lm(self) -> nn.Module:
        """The frozen base model (the deep copy, or the base reloaded from ``model_name_or_path``)."""
        if self._reference is None:
            lm = load_model(self.hparams.model_name_or_path, DTYPES[self.hparams.dtype], self.hparams.trust_remote_code)
            if self.base_fingerprint and model_fingerprint(lm) != self.base_fingerprint:
                raise CheckpointError(
                    f"{self.hparams.model_name_or_path} changed since training started (fingerprint ≠ {self.base_fingerprint}) — restore the base model the DPO run started from"
                )
            object.__setattr__(self, "_reference", self._frozen(lm))
        return self._reference.to(self.device)

    @torch.no_grad()
    def _score_reference(self, lm: nn.Module, batch: Mapping[str, torch.Tensor], fp32_head: bool) -> torch.Tensor:
        """(2B,) [chosen; rejected] summed reference log-probs, the head in the precision of the policy's."""
        was_training = lm.training
        lm.eval()
        try:
            return sequence_logps(*plain_logps(lm, batch, fp32_head, **self.forward_options()))
        finally:
            lm.train(was_training)

    def reference_logps(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probs of the chosen and the rejected responses, (B,) each."""
        pairs = int(batch["num_pairs"])
        keys = pair_keys(batch) if self.hparams.precompute_reference else []
        if keys and all(k in self.reference_cache for k in keys):
            self.reference_cache_hits += pairs
            cached = torch.tensor([self.reference_cache[k] for k in keys], device=self.device)  # (B, 2)
            return cached[:, 0], cached[:, 1]
        logps = self._score_reference(self.reference_lm(), batch, fp32_head=not self.training)
        if keys:
            self.reference_cache_misses += pairs
            self.reference_cache.update(zip(keys, zip(logps[:pairs].tolist(), logps[pairs:].tolist(), strict=True), strict=True))
        return logps[:pairs], logps[pairs:]

    @override
    def on_validation_start(self) -> None:
        # Lightning's sanity check is a validation before training starts: it must read the cache, not load a
        # second full model that would then stay in memory for the whole run.
        if self.trainer.state.fn == "fit":
            self.fill_reference_cache()

    @override
    def on_train_start(self) -> None:
        self.fill_reference_cache()  # no sanity check ran (num_sanity_val_steps: 0)

    def fill_reference_cache(self) -> None:
        """With ``precompute_reference``: scores the pairs training and validation will use, once per fit.

        Before the first update the policy *is* the base model: no copy is needed. Later (a resume whose
        checkpoint lacks some pairs) the base is reloaded, and freed again once the cache is full.
        """
        data = self.trainer.datamodule
        if not self.hparams.precompute_reference or data is None or self._cache_filled:
            return
        lm = self.lm if self.trainer.global_step == 0 else None
        train = data.train_dataloader()
        steps = self.trainer.estimated_stepping_batches * self.trainer.accumulate_grad_batches
        needed = len(train) if steps == float("inf") else min(len(train), int(steps))
        plugin = self.trainer.precision_plugin
        for loader, limit, context, fp32_head in (
            (train, needed, plugin.train_step_context, False),
            (data.val_dataloader(), None, plugin.val_step_context, True),
        ):
            for index, batch in enumerate(loader):
                if limit is not None and index >= limit:
                    break
                if "num_pairs" not in batch or all(k in self.reference_cache for k in pair_keys(batch)):
                    continue
                batch = {k: v.to(self.device) for k, v in batch.items()}
                with context():
                    logps = self._score_reference(lm if lm is not None else self.reference_lm(), batch, fp32_head)
                pairs = int(batch["num_pairs"])
                self.reference_cache.update(
                    zip(pair_keys(batch), zip(logps[:pairs].tolist(), logps[pairs:].tolist(), strict=True), strict=True)
                )
        self._cache_filled = True
        object.__setattr__(self, "_reference", None)  # every pair of the run is cached: no reference model is needed

    # -------------------------------------------------------------- objective
    def dpo_terms(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """DPO loss, implicit rewards and the plain per-token log-probs of a paired batch."""
        pairs = require_pairs(batch, type(self).__name__)
        token_logps, mask = plain_logps(
            self.lm,
            batch,
            fp32_head=not self.training,
            **self.forward_options(),
        )  # (2B, T-1)
        policy = sequence_logps(token_logps, mask)  # (2B,) [chosen; rejected]
        reference_chosen, reference_rejected = self.reference_logps(batch)
        loss, chosen_reward, rejected_reward = dpo_loss(
            policy[:pairs], policy[pairs:], reference_chosen, reference_rejected, self.hparams.beta
        )
        return {"loss": loss, "chosen": chosen_reward, "rejected": rejected_reward, "token_logps": token_logps, "mask": mask}

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``−log σ(β[(log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))])`` averaged over pairs."""
        terms = self.dpo_terms(batch)
        return {
            "loss": terms["loss"],
            "reward_accuracy": pairwise_accuracy(terms["chosen"], terms["rejected"]).mean(),
            "reward_margin": (terms["chosen"] - terms["rejected"]).mean(),
        }

    @override
    def loss_weight(self, batch: Mapping[str, torch.Tensor]) -> float | None:
        """Pairs: the DPO loss is a mean over pairs."""
        return float(require_pairs(batch, type(self).__name__))

    def _evaluate(self, batch: Mapping[str, torch.Tensor], split: str) -> None:
        if "num_pairs" not in batch:  # pointwise validation data: NLL only
            token_logps, mask = plain_logps(
                self.lm,
                batch,
                fp32_head=True,
                **self.forward_options(),
            )
            self.log(f"{split}/chosen_nll", response_nll(token_logps, mask).mean(), batch_size=mask.shape[0], sync_dist=True)
            return
        terms = self.dpo_terms(batch)
        pairs = int(batch["num_pairs"])
        accuracy = pairwise_accuracy(terms["chosen"], terms["rejected"])
        self.log(f"{split}/loss", terms["loss"], batch_size=pairs, sync_dist=True, prog_bar=True)
        self.log(f"{split}/dpo_reward_accuracy", accuracy.mean(), batch_size=pairs, sync_dist=True, prog_bar=True)
        self.log(f"{split}/dpo_reward_margin", (terms["chosen"] - terms["rejected"]).mean(), batch_size=pairs, sync_dist=True)
        self.log_plain_pair_metrics(terms["token_logps"], terms["mask"], pairs, split)

    # ---------------------------------------------------- checkpoint, export
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.hparams.precompute_reference:
            checkpoint["dpo_reference_logps"] = {k: list(v) for k, v in self.reference_cache.items()}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("dpo_reference_logps") or {}
        self.reference_cache.update({k: (float(v[0]), float(v[1])) for k, v in saved.items()})

    def export_metadata(self) -> dict[str, Any]:
        """What ``export`` records so ``evaluate`` scores the implicit reward against the right reference."""
        return {"objective": "dpo", "dpo_beta": self.hparams.beta, "reference_model": self.hparams.model_name_or_path}


class HybridDPOModule(JointFinetuneModule):
    """MEET stage 2 plus a DPO-style term whose implicit reward is MEET's control classifier.

    On a paired batch ``[chosen; rejected]`` (``data.pair_batches: true``), with ``g``/``b`` the pair's good
    and bad controls and ``log p`` summed response log-probs::

        s(y)  = log p(y | x, g) − log p(y | x, b)            # the control classifier
        loss  = NLL(y_c | g, y_r | b) + dpo_weight · (−log σ(β · (s(y_c) − s(y_r))))

    This is DPO with the good-control model as the policy and the bad-control model in the reference slot
    (not detached, so both controls learn from it). Why this definition rather than DPO of chosen-under-good
    against rejected-under-good with a frozen base + stage-1 controls as reference:

    * it optimizes exactly what MEET is evaluated on (``val/control_accuracy`` is the sign of
      ``s(y_c) − s(y_r)``), and pushes ``p(y_r | g)`` down — the behaviour wanted when generating under ``g``;
    * it needs no reference model: the extra cost is one forward pass with the controls swapped (the same pass
      validation already makes), no second copy of the LM in memory;
    * the NLL term keeps both conditionals good language models (it plays the role of DPO's KL anchor), and
      the sigmoid saturates once a pair is separated, so the margin term stops pulling — it cannot grow the
      margin without bound at the expense of fluency.

    Logs ``train/nll``, ``train/dpo`` and ``train/control_accuracy`` next to ``train/loss``.

    Args:
        dpo_weight: Weight ``w`` of the DPO term (``0`` is plain stage 2 on paired batches).
        beta: Temperature ``β`` of the DPO term.
        *args, **kwargs: The other arguments of :class:`~meet_lightning.modules.stage2.JointFinetuneModule`,
            passed on.
    """

    def __init__(self, *args: Any, dpo_weight: float = 1.0, beta: float = 0.1, **kwargs: Any) -> None:
        raise_failed(
            (
                (dpo_weight < 0, f"dpo_weight {dpo_weight} must be ≥ 0 — set model.init_args.dpo_weight"),
                (not beta > 0, f"beta {beta} must be > 0 — set model.init_args.beta (e.g. 0.1)"),
            )
        )
        super().__init__(*args, **kwargs)

    @override
    def setup(self, stage: str) -> None:
        check_paired_data(self, stage)

    @override
    def loss_weight(self, batch: Mapping[str, torch.Tensor]) -> float | None:
        """``None``: the NLL is a mean over tokens and the DPO term over pairs, so the loss does not split by one
        weight (``backward_per_chunk`` runs one backward)."""
        return None

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``NLL + dpo_weight · DPO`` with the control classifier as implicit reward (see the class docstring)."""
        pairs = require_pairs(batch, type(self).__name__)
        token_logps, mask = self.response_logps(batch)  # (2B, T-1): chosen under good, rejected under bad
        own = sequence_logps(token_logps, mask)  # (2B,)
        ids = batch["control_ids"]
        other = sequence_logps(*self.response_logps(batch, torch.cat([ids[pairs:], ids[:pairs]])))  # swapped controls
        # policy = good-control log-probs, "reference" = bad-control log-probs (both trained)
        dpo, chosen_score, rejected_score = dpo_loss(own[:pairs], other[pairs:], other[:pairs], own[pairs:], self.hparams.beta)
        nll_loss = self.training_nll(token_logps, mask)
        return {
            "loss": nll_loss + self.hparams.dpo_weight * dpo,
            "nll": nll_loss.detach(),
            "dpo": dpo.detach(),
            "control_accuracy": pairwise_accuracy(chosen_score, rejected_score).mean(),
        }
