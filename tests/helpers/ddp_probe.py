"""A callback for the DDP and FSDP tests: each rank records its world size and saves its control tensors.

Configured from a test overlay (``stageN.trainer.callbacks``) and imported in the subprocesses through
``PYTHONPATH=tests/helpers``. Under FSDP the parameters outside a forward pass are this rank's flat shards: the
probe gathers the full tensors first (a collective every rank runs, as every rank runs callbacks).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from meet_lightning.training.distributed import unwrapped_name


def _full_params(trainer):
    """Context in which every parameter is the full tensor (FSDP), else nothing to do."""
    model = trainer.strategy.model
    return FSDP.summon_full_params(model, writeback=False) if isinstance(model, FSDP) else contextlib.nullcontext()


class RankProbe(Callback):
    """Writes ``{stage}-rank{r}.json`` (world size, rank, strategy, FSDP units) at train start, ``{stage}-rank{r}.pt``
    (the control tensors) after every step and at train end, and ``{stage}-rank{r}-model.pt`` (every parameter,
    full) at train end, in ``folder``.

    Args:
        folder: Where the files go.
        stage: Stage name for the file names.
    """

    def __init__(self, folder: str, stage: str) -> None:
        self.folder, self.stage = Path(folder), stage

    def _name(self, trainer, suffix: str) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder / f"{self.stage}-rank{trainer.global_rank}.{suffix}"

    def on_train_start(self, trainer, pl_module) -> None:
        dist = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        info = {"world_size": trainer.world_size, "rank": trainer.global_rank, "process_group": dist}
        info["strategy"] = type(trainer.strategy).__name__
        info["strategy_bases"] = [c.__name__ for c in type(trainer.strategy).__mro__]
        units = [m for m in trainer.strategy.model.modules() if isinstance(m, FSDP)]
        info["fsdp_units"] = [type(m.module).__name__ for m in units]
        # the parameters this rank holds between steps: about 1/world of the model under full sharding
        info["local_numel"] = sum(p.numel() for p in pl_module.parameters())
        with _full_params(trainer):
            info["full_numel"] = sum(p.numel() for p in pl_module.parameters())
        self._name(trainer, "json").write_text(json.dumps(info))

    def _save_controls(self, trainer, pl_module) -> None:
        with _full_params(trainer):
            state = {k: v.detach().cpu().clone() for k, v in pl_module.control.state_dict().items()}
        torch.save({"global_step": trainer.global_step, "controls": state}, self._name(trainer, "pt"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._save_controls(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_controls(trainer, pl_module)
        with _full_params(trainer):
            params = {unwrapped_name(n): p.detach().cpu().clone() for n, p in pl_module.named_parameters()}
        torch.save(params, self._name(trainer, "pt").with_name(f"{self.stage}-rank{trainer.global_rank}-model.pt"))
