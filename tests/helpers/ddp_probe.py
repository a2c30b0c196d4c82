"""A callback for the DDP test: each rank records its world size and saves its control tensors.

Configured from a test overlay (``stageN.trainer.callbacks``) and imported in the DDP subprocesses through
``PYTHONPATH=tests/helpers``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


class RankProbe(Callback):
    """Writes ``{stage}-rank{r}.json`` (world size, rank, strategy) at train start and ``{stage}-rank{r}.pt`` (the
    control tensors) after every step and at train end, in ``folder``.

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
        self._name(trainer, "json").write_text(json.dumps(info))

    def _save_controls(self, trainer, pl_module) -> None:
        state = {k: v.detach().cpu().clone() for k, v in pl_module.control.state_dict().items()}
        torch.save({"global_step": trainer.global_step, "controls": state}, self._name(trainer, "pt"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._save_controls(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._save_controls(trainer, pl_module)
