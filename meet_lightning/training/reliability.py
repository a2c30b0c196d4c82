"""What makes a killed run resume bit-identically, and a bad step stop cleanly.

* :class:`AtomicCheckpointIO` writes every checkpoint to a temp file in the checkpoint's own folder, fsyncs it
  and ``os.replace``-s it over the target, so a kill at any moment leaves the previous checkpoint intact (and
  no multi-GB orphan in the system temp folder, where Lightning's own atomic save goes). It refuses to write a
  checkpoint holding NaN or inf.
* :class:`RNGState` keeps the python, numpy and torch RNG states in every checkpoint and puts them back when
  training resumes (dropout then draws the same masks as in an uninterrupted run).
* :class:`GradientCheck` stops training at the first NaN/inf gradient (:class:`~meet_lightning.errors.NumericalError`,
  exit code 3) before the optimizer can write it into the weights.
* :class:`FaultInjection` and :class:`FaultSpec` stop, kill or poison a run at a chosen step; tests hand the
  callback in (``cli.main(argv, callbacks=[...])``).

The shuffle position is the fourth ingredient: :class:`~meet_lightning.data.datamodule.ResumableBatchSampler`, saved by
Lightning through :class:`~meet_lightning.data.datamodule.ResumableDataLoader`.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from meet_lightning.atomic import TEMP_SUFFIX, remove_stale_temp_files, write_atomic, write_text_atomic  # noqa: F401 - re-exported
from meet_lightning.errors import ConfigError, NumericalError
from meet_lightning.training.distributed import unwrapped_name

FAULT_POINTS = ("step_end", "ckpt_write", "nan_grad")
_KILL_AFTER_BYTES = 1024  # a checkpoint killed mid-write has at least this much of its temp file on disk


# ------------------------------------------------------------------------------------------ fault injection
class InjectedFault(RuntimeError):
    """Raised by :class:`FaultInjection` to stop a run at a chosen point (tests of resuming)."""


@dataclass(frozen=True)
class FaultSpec:
    """A deterministic fault (for tests of resuming and of numerical faults), applied by :class:`FaultInjection`.

    Grammar: ``STAGE:step=K[:at=POINT][:kill]``, for example ``stage2:step=2`` or
    ``stage1:step=3:at=ckpt_write:kill``. ``K`` counts optimizer steps (the fault hits the step that brings
    ``global_step`` to ``K``). ``POINT`` is one of

    * ``step_end`` (default): right after step ``K``, before its checkpoint is written;
    * ``ckpt_write``: in the middle of writing the checkpoint of step ``K`` (after some bytes of its temp file);
    * ``nan_grad``: one gradient of step ``K`` becomes NaN before the optimizer step (the gradient check then
      stops the run with exit code 3; ``kill`` does not apply).

    Without ``kill`` the run raises :class:`InjectedFault` (a ``RuntimeError``); with ``kill`` the process sends
    itself ``SIGKILL`` (no cleanup, exit status −9), as a power cut or the OOM killer would.

    Attributes:
        stage: ``stage1`` or ``stage2``.
        step: Optimizer step the fault hits.
        at: Where in that step.
        kill: SIGKILL instead of an exception.
    """

    stage: str
    step: int
    at: str = "step_end"
    kill: bool = False

    @classmethod
    def parse(cls, text: str) -> FaultSpec:
        """A spec from its ``STAGE:step=K[:at=POINT][:kill]`` text; ConfigError when malformed."""
        usage = f"fault {text!r} — use STAGE:step=K[:at={'|'.join(FAULT_POINTS)}][:kill], e.g. stage2:step=2:kill"
        stage, *parts = text.split(":")
        options: dict[str, str] = {}
        for part in parts:
            key, sep, value = part.partition("=")
            if not sep and key != "kill":
                raise ConfigError(f"unknown part {part!r} in {usage}")
            options[key] = value if sep else "1"
        unknown = set(options) - {"step", "at", "kill"}
        at = options.get("at", "step_end")
        if stage not in ("stage1", "stage2") or unknown or at not in FAULT_POINTS or not options.get("step", "").isdigit():
            raise ConfigError(usage)
        return cls(stage, int(options["step"]), at, "kill" in options)

    def fire(self, where: str) -> None:
        """Kills the process (``kill``) or raises :class:`InjectedFault`."""
        if self.kill:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFault(f"injected fault: stopping {self.stage} {where}")


class FaultInjection(Callback):
    """Applies a :class:`FaultSpec` to the stage it names, for tests of resuming and of numerical faults.

    Handed in like any Lightning callback, e.g. ``cli.main(argv, callbacks=[FaultInjection("stage2:step=2")])``
    or ``pipeline.fit(recipe, callbacks=[...])``; nothing in the library reads a fault from the environment. The
    stage it runs in is the one its trainer's :class:`AtomicCheckpointIO` writes for; a ``ckpt_write`` fault is
    handed to that checkpoint IO.

    Args:
        spec: The fault, or its ``STAGE:step=K[:at=POINT][:kill]`` text.
    """

    def __init__(self, spec: FaultSpec | str) -> None:
        self.fault = FaultSpec.parse(spec) if isinstance(spec, str) else spec
        self.spec: FaultSpec | None = None  # the fault while its stage runs

    @override
    def setup(self, trainer, pl_module, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, AtomicCheckpointIO):
            raise ConfigError("FaultInjection: the trainer has no AtomicCheckpointIO — build it with pipeline.build_stage")
        self.spec = self.fault if io.stage == self.fault.stage else None
        if self.spec is not None and self.spec.at == "ckpt_write":
            io.fault = self.spec

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.spec and self.spec.at == "step_end" and trainer.global_step == self.spec.step:
            self.spec.fire(f"after step {self.spec.step}")

    @override
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.spec and self.spec.at == "nan_grad" and trainer.global_step + 1 == self.spec.step:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if grads:
                grads[0].view(-1)[0] = float("nan")


# ------------------------------------------------------------------------------------------- checkpoint IO
def iter_tensors(tree: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in nested dicts/lists, with a dotted name (``state_dict.control.bank``)."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from iter_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from iter_tensors(value, f"{prefix}.{index}" if prefix else str(index))


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor is free of NaN/inf: one fused check and one sync per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_device.setdefault(tensor.device, []).append(tensor)
    return all(bool(torch.stack([t.isfinite().all() for t in group]).all()) for group in by_device.values())


def non_finite_tensors(checkpoint: Mapping[str, Any]) -> list[str]:
    """Names of the weight and optimizer tensors of ``checkpoint`` that hold a NaN or inf."""
    floats = [
        (name, t)
        for key in ("state_dict", "optimizer_states")
        for name, t in iter_tensors(checkpoint.get(key), key)
        if t.is_floating_point() and t.numel()
    ]
    if all_finite([t for _, t in floats]):
        return []
    return [name for name, t in floats if not bool(t.isfinite().all())]


class _KillingWriter:
    """A file wrapper that fires a fault once ``after`` bytes are on disk (``ckpt_write`` faults)."""

    def __init__(self, handle: Any, after: int, fire: Callable[[], None]) -> None:
        self.handle, self.after, self.fire, self.written = handle, after, fire, 0

    def write(self, data: Any) -> int:
        count = self.handle.write(data)
        self.written += count
        if self.written >= self.after:
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.fire()
        return count

    def flush(self) -> None:
        self.handle.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically in their own folder (see :func:`write_atomic`), never with NaN/inf.

    Lightning's ``TorchCheckpointIO`` serialises the whole checkpoint into memory and moves a temp file from
    the system temp folder; this one streams ``torch.save`` into ``.NAME.PID.partial`` next to the target.
    Remote paths (``s3://…``) fall back to Lightning's own save.

    Args:
        stage: Stage name, for messages.
        folder: The stage's checkpoint folder: stale temp files of a killed run are removed from it now.
        fault: A ``ckpt_write`` fault (see :class:`FaultSpec`) to inject; ``None`` in normal runs.
    """

    def __init__(self, stage: str = "", folder: Path | None = None, fault: FaultSpec | None = None) -> None:
        super().__init__()
        self.stage = stage
        self.fault = fault if fault is not None and fault.at == "ckpt_write" else None
        if folder is not None:
            remove_stale_temp_files(Path(folder))

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        step = checkpoint.get("global_step")
        bad = non_finite_tensors(checkpoint)
        if bad:
            raise NumericalError(
                f"{self.stage or 'training'}: NaN/inf in {', '.join(bad[:3])}{' …' if len(bad) > 3 else ''} at step {step} —"
                " checkpoint not written (the previous one is kept); lower the learning rate or use 32-true/bf16-mixed precision"
            )
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        fault = self.fault if self.fault is not None and step == self.fault.step else None

        def write(handle: Any) -> None:
            if fault is not None:
                handle = _KillingWriter(handle, _KILL_AFTER_BYTES, lambda: fault.fire(f"while writing {path}"))
            torch.save(checkpoint, handle)
            if fault is not None:  # a checkpoint smaller than the threshold: fire before the rename
                fault.fire(f"while writing {path}")

        write_atomic(Path(path), write)


# ------------------------------------------------------------------------------------------------ RNG state
def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA) RNG states, as tensors and numbers (loadable with ``weights_only``)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Puts back a :func:`capture_rng_state`."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state(
        (numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGState(Callback):
    """Saves the RNG states in every checkpoint and restores them when training resumes from one.

    The states are captured when the checkpoint is written (right after a step) and put back at
    ``on_train_start``, the last hook before the first resumed step. Nothing between those two points draws
    from the global generators: the data loaders draw their worker seeds from their own generator. Under DDP
    the checkpoint holds rank zero's states (every rank is seeded alike).
    """

    def __init__(self) -> None:
        self._pending: Mapping[str, Any] | None = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return capture_rng_state()

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._pending = state_dict

    @override
    def on_train_start(self, trainer, pl_module) -> None:
        if self._pending is not None:
            restore_rng_state(self._pending)
            self._pending = None


# ------------------------------------------------------------------------------------------ gradient check
class GradientCheck(Callback):
    """Stops training at the first NaN or inf gradient, before the optimizer step writes it into the weights.

    Costs one fused check per step (``torch.stack([g.isfinite().all() …]).all()``, one sync per device). With fp16
    loss scaling (``16-mixed``) infinite gradients are expected and skipped by the scaler, so nothing is checked.

    Args:
        stage: Stage name, for the message.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage

    @override
    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return
        named = {id(p): unwrapped_name(n) for n, p in pl_module.named_parameters()}
        grads = [(p, p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # Under FSDP each rank holds only its shard's gradients: a rank stopping alone would leave the others
        # waiting in their next collective. Every rank stops when any sees a bad value (a no-op on one device).
        if trainer.strategy.reduce_boolean_decision(all_finite([g for _, g in grads]), all=True):
            return
        bad = [named.get(id(p), "?") for p, g in grads if not bool(g.isfinite().all())] or ["another rank's shard"]
        raise NumericalError(
            f"{self.stage}: NaN/inf gradient at step {trainer.global_step + 1} in {', '.join(bad[:3])}"
            f"{' …' if len(bad) > 3 else ''} — training stopped before the update, the last checkpoint is intact;"
            f" lower --{self.stage}.model.lr (or use 32-true precision) and re-run the command to resume"
        )
