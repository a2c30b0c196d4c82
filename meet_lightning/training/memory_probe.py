"""Forward chunks chosen from an accelerator's memory: the fewest that fit the worst batch, found by trying it.

On a GPU one forward pass over the whole batch keeps the device busy (four passes of few rows waited on kernel
launches: an H200 ran at ≈ 1 % MFU), but it must fit. Before the first step, :func:`fewest_chunks` runs a
training step's forward and backward on a batch no real batch exceeds
(:func:`~meet_lightning.data.tokenization.longest_batch`) at 1, 2, 4, … chunks and keeps the first that fits with
room left for the optimizer's state, which does not exist before the first step. Memory is read through :class:`DeviceMemory`, so the choice is tested on a
CPU with a stand-in device.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from meet_lightning.errors import ConfigError

HEADROOM = 0.9
"""The share of a device's memory a step may plan to use: the rest absorbs the caching allocator's fragmentation
and what the probe's batch cannot show (the logger's tensors, a checkpoint's copies)."""


class DeviceMemory:
    """What the probe reads of a device. The base class reads nothing: no probe (a CPU, or a device torch cannot
    measure), so forward chunks stay at their default there."""

    name = "this device"

    def capacity(self) -> int | None:
        """Bytes a step may use in all, or ``None`` where unknown (then no probe)."""
        return None

    def reset_peak(self) -> None:
        """Starts measuring the peak anew."""

    def peak(self) -> int:
        """The most bytes allocated since :meth:`reset_peak`."""
        return 0

    def release(self) -> None:
        """Returns cached blocks to the device after a probe (a failed one above all)."""
        gc.collect()


class CudaMemory(DeviceMemory):
    """A CUDA device through ``torch.cuda``'s caching allocator."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.name = str(device)

    def capacity(self) -> int:
        return torch.cuda.get_device_properties(self.device).total_memory

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)

    def release(self) -> None:
        super().release()
        torch.cuda.empty_cache()


def memory_of(device: torch.device) -> DeviceMemory:
    """The reader for ``device``: CUDA's where it is a CUDA device, the base class (no probe) elsewhere."""
    return CudaMemory(device) if device.type == "cuda" else DeviceMemory()


def fewest_chunks(step: Callable[[int], None], memory: DeviceMemory, extra_bytes: int, units: int, what: str) -> int | None:
    """The fewest forward chunks (1, 2, 4, …, ``units``) at which ``step(chunks)`` fits in ``memory``.

    Args:
        step: Runs one training step's forwards and backwards at that many chunks and drops its gradients.
        memory: The device's reader; ``None`` is returned where its capacity is unknown.
        extra_bytes: Memory the real step holds that ``step`` does not (the optimizer's state before its first
            step), added to each measured peak.
        units: Pairs (or rows) in the batch: the most chunks there can be.
        what: The batch in words, for the error (``8 pairs of 512 tokens``).

    Raises:
        ConfigError: not even one unit per forward pass fits.
    """
    capacity = memory.capacity()
    if capacity is None:
        return None
    chunks, budget = 1, HEADROOM * capacity
    while True:
        memory.reset_peak()
        try:
            step(chunks)
            fits = memory.peak() + extra_bytes <= budget
        except torch.OutOfMemoryError:
            fits = False
        memory.release()  # outside the handler: the exception's frames no longer hold the step's tensors
        if fits:
            return chunks
        if chunks >= units:
            raise ConfigError(
                f"{what} do not fit in {memory.name}'s {capacity / 2**30:.1f} GiB even one per forward pass (with "
                f"{extra_bytes / 2**30:.1f} GiB of optimizer state) — lower data.max_length or data.batch_size, or set "
                "model.init_args.gradient_checkpointing: true or model.init_args.dtype: bfloat16"
            )
        chunks = min(2 * chunks, units)
