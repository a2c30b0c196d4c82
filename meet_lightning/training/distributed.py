"""Several processes: the FSDP wrap policy taken from the model, parameter names as FSDP leaves them, and which
process writes a run's files (global rank zero: :func:`is_global_zero`).

``configs/strategies/fsdp.yaml`` sets ``auto_wrap_policy: {class_path: meet_lightning.NoSplitModulesPolicy}``:
one FSDP unit per block the model's own class declares unsplittable (``_no_split_modules``, e.g.
``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ``GPTNeoXLayer``), so one overlay serves every architecture
instead of naming one model's layer class.
"""

from __future__ import annotations

import re

import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

_WRAPPER_SEGMENT = re.compile(r"(^|\.)_(fsdp_wrapped_module|checkpoint_wrapped_module)\.")


class NoSplitModulesPolicy:
    """FSDP ``auto_wrap_policy``: wraps every module whose class a Hugging Face model lists in ``_no_split_modules``.

    FSDP calls the policy on each module, an ancestor (``recurse=True``) before its children, so the names a
    model declares are known before its layers are reached. Several models in one module (an LM and a
    reference LM) contribute all their names. A model that declares none is wrapped as one unit (the root).

    Args:
        extra: More class names to wrap as units (for a model whose ``_no_split_modules`` is missing).
    """

    def __init__(self, extra: list[str] | None = None) -> None:
        self.extra = list(extra or [])
        self.names: set[str] = set(self.extra)

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        """FSDP's policy signature: ``recurse`` asks whether to look inside ``module``, else whether to wrap it."""
        if recurse:
            # a PreTrainedModel class attribute (list or set of class names); None on models that never set it
            self.names.update(getattr(module, "_no_split_modules", None) or ())
            return True
        return type(module).__name__ in self.names


def unwrapped_name(name: str) -> str:
    """A parameter name without the segments FSDP and activation checkpointing insert.

    ``lm.model.layers.0._fsdp_wrapped_module.mlp.up_proj.weight`` → ``lm.model.layers.0.mlp.up_proj.weight``: the
    name the module has unwrapped, and the key its full state dict (and so every checkpoint) uses.
    """
    previous = None
    while previous != name:  # nested wrappers (checkpointing inside FSDP) leave one segment each
        previous, name = name, _WRAPPER_SEGMENT.sub(r"\1", name)
    return name


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP wrapped blocks of ``module`` in place (a finished FSDP fit leaves them wrapped)."""
    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def is_global_zero() -> bool:
    """Whether this process is global rank zero (the only one that writes stage files).

    Lightning's DDP launcher starts the other ranks with ``LOCAL_RANK``/``RANK`` set, so this holds before any
    process group exists.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return rank_zero_only.rank == 0


def rank_zero_log(message: str) -> None:
    """``print`` on global rank zero only (every rank runs the pipeline)."""
    if is_global_zero():
        print(message, flush=True)
