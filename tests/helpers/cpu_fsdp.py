"""Lightning's ``FSDPStrategy`` on CPU processes (gloo), for the FSDP test only.

Lightning 2.6.6 with torch 2.13 refuses or crashes FSDP without a GPU in three places, although torch's FSDP
itself trains on CPU with gloo. This subclass changes exactly those three and nothing else:

1. ``Trainer(strategy=FSDPStrategy(...), accelerator="cpu")`` raises "The strategy `fsdp` requires a GPU
   accelerator": the check is ``type(strategy) is FSDPStrategy``, which a subclass passes.
2. ``FSDPStrategy`` wraps with ``device_id=root_device.index``, ``None`` for the CPU device, and torch then
   raises "FSDP needs a non-CPU accelerator device": the root is wrapped here with ``device_id=cpu``.
3. Lightning gathers full state dicts with ``offload_to_cpu=True``; on a CPU-device FSDP module torch 2.13 then
   frees the gathered storage before cloning it (SIGSEGV on rank zero in ``_full_post_state_dict_hook``):
   Lightning's own state-dict methods run here with ``offload_to_cpu=False`` (the tensors are on CPU anyway).

Everything else (the auto-wrap policy, optimizer set-up, full state dicts gathered on rank zero, optimizer
state, checkpoint save and load, barriers) is Lightning's and torch's own code. What this cannot test: CUDA
placement, NCCL, FSDP mixed precision and CPU offload (``configs/strategies/fsdp.yaml`` has the GPU command).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies import fsdp as lightning_fsdp
from torch import nn
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


def _full_state_dict_on_cpu(module: nn.Module, world_size: int, rank0_only: bool = True):
    """Lightning's full-state-dict context (same signature) without ``offload_to_cpu``."""
    return FSDP.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
    )


@contextlib.contextmanager
def _no_offload() -> Iterator[None]:
    original = lightning_fsdp._get_full_state_dict_context
    lightning_fsdp._get_full_state_dict_context = _full_state_dict_on_cpu
    try:
        yield
    finally:
        lightning_fsdp._get_full_state_dict_context = original


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` that wraps on the CPU device and gathers state dicts without offloading."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        if not any(isinstance(m, FSDP) for m in model.modules()):
            model = FSDP(
                model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # used; the parent would warn that it is ignored
        return super()._setup_model(model)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        with _no_offload():
            return super().lightning_module_state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        with _no_offload():
            return super().optimizer_state(optimizer)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        with _no_offload():
            return super().load_checkpoint(checkpoint_path, weights_only)
