"""Precision chosen from the hardware: bf16 only where the device computes it natively.

On a CPU without AVX512-BF16 or AMX, PyTorch runs bf16 matrix products through a single-threaded reference
GEMM, several times slower than fp32 (measured in docs/guides/memory.md). So ``precision: auto`` (the recipes' default) resolves to ``bf16-mixed`` on CUDA devices with bf16 and on CPUs
with native bf16, ``16-mixed`` on older GPUs, and ``32-true`` elsewhere. Generation and scoring follow the same
rule through :func:`resolve_dtype`. An explicit precision or dtype always wins.
"""

from __future__ import annotations

import functools
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

AUTO = "auto"
PrecisionName = Literal[
    "auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "32", "16", "bf16", "64",
    "transformer-engine", "transformer-engine-float16",
]  # fmt: skip
Precision = PrecisionName | Literal[64, 32, 16]
"""What a recipe's ``trainer.precision`` accepts: ``auto`` or any precision Lightning's Trainer takes."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WeightsDtype = Literal["auto", "float32", "bfloat16", "float16"]
"""What ``--dtype`` of generate/evaluate accepts: ``auto`` (see :func:`resolve_dtype`) or one of :data:`DTYPES`."""
X86 = {"x86_64", "amd64", "i386", "i686"}


@dataclass(frozen=True)
class Resolved:
    """A resolved precision.

    Attributes:
        precision: Lightning's ``Trainer(precision=...)`` value.
        dtype: The matching compute dtype for generation and scoring (``float32`` for ``32-true``).
        reason: One line saying why, e.g. ``auto: CPU AVX2 without AVX512-BF16/AMX (bf16 would be emulated)``.
    """

    precision: str
    dtype: torch.dtype
    reason: str


@functools.cache
def cpu_bf16_native() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and what that was decided from (cached per process).

    On x86 PyTorch reports AVX512-BF16 and AMX directly; elsewhere (ARM, POWER) the report cannot tell, so a
    short matmul probe compares bf16 with fp32.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in X86:
        avx512_bf16, amx = torch.cpu._is_avx512_bf16_supported(), torch.cpu._is_amx_tile_supported()
        found = [name for name, present in (("AVX512-BF16", avx512_bf16), ("AMX", amx)) if present]
        if found:
            return True, f"CPU {capability} with {'/'.join(found)}"
        return False, f"CPU {capability} without AVX512-BF16/AMX (bf16 matmuls would run PyTorch's slow reference path)"
    return probe_bf16_matmul(f"CPU {platform.machine()} {capability}")


def probe_bf16_matmul(label: str, shape: tuple[int, int, int] = (256, 576, 1536), repeats: int = 3) -> tuple[bool, str]:
    """Native when a bf16 product is at least as fast as the same fp32 one (emulated bf16 is ~7× slower).

    Args:
        label: What the caller already knows of the CPU, put in front of the measurement.
        shape: ``(m, k, n)`` of the probed product; the default takes milliseconds in fp32.
        repeats: Timed products per dtype; the best counts.
    """
    m, k, n = shape
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        a @ b  # warm-up: first call allocates and picks kernels
        timings = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            timings.append(time.perf_counter() - start)
        seconds[dtype] = min(timings)
    ratio = seconds[torch.bfloat16] / seconds[torch.float32]
    return ratio <= 1.0, f"{label}, bf16 matmul probe {ratio:.2f}× the fp32 time"


def device_kind(accelerator: str | None) -> str:
    """``cuda``, ``mps`` or ``cpu``: where a trainer with this ``accelerator`` setting runs."""
    accelerator = (accelerator or AUTO).lower()
    if accelerator in ("cuda", "gpu") or (accelerator == AUTO and torch.cuda.is_available()):
        return "cuda"
    if accelerator == "mps" or (accelerator == AUTO and torch.backends.mps.is_available()):
        return "mps"
    return "cpu"


def resolve_precision(
    requested: str | int | None,
    accelerator: str | None = AUTO,
    cpu_native: Callable[[], tuple[bool, str]] | None = None,
) -> Resolved:
    """The trainer precision for ``requested`` on the device ``accelerator`` picks.

    Args:
        requested: ``auto`` (or ``None``) to decide from the hardware; anything else is kept as given.
        accelerator: The trainer's ``accelerator`` (``auto``, ``cpu``, ``gpu``, ``cuda``, ``mps``).
        cpu_native: The CPU capability check (default :func:`cpu_bf16_native`; tests inject one).
    """
    if requested not in (None, AUTO):
        precision = str(requested)
        return Resolved(precision, precision_dtype(precision), f"{precision}: set in the recipe")
    kind = device_kind(accelerator)
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return Resolved("bf16-mixed", torch.bfloat16, f"auto: {torch.cuda.get_device_name()} computes bf16")
        return Resolved("16-mixed", torch.float16, f"auto: {torch.cuda.get_device_name()} has no bf16, fp16 with loss scaling")
    if kind == "mps":
        return Resolved("32-true", torch.float32, "auto: Apple MPS, fp32 (mixed precision there is not tested here)")
    native, why = (cpu_native or cpu_bf16_native)()
    if native:
        return Resolved("bf16-mixed", torch.bfloat16, f"auto: {why}")
    return Resolved("32-true", torch.float32, f"auto: {why}")


def precision_dtype(precision: str) -> torch.dtype:
    """The compute dtype of a Lightning precision (``bf16-mixed`` → bfloat16, ``32-true`` → float32)."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16") or precision == "transformer-engine-float16":
        return torch.float16
    return torch.float64 if precision.startswith("64") else torch.float32


def resolve_dtype(
    requested: str, device: str | torch.device = "cpu", cpu_native: Callable[[], tuple[bool, str]] | None = None
) -> tuple[torch.dtype, str]:
    """Weights dtype for generation and scoring: ``auto`` follows the device like :func:`resolve_precision`.

    Args:
        requested: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        device: Where the model runs.
        cpu_native: The CPU capability check (default :func:`cpu_bf16_native`; tests inject one).

    Returns:
        The dtype and the reason for it.

    Raises:
        ValueError: For a dtype name outside :data:`DTYPES` and ``auto``.
    """
    if requested != AUTO:
        if requested not in DTYPES:
            raise ValueError(f"dtype {requested!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[requested], f"{requested}: asked for"
    kind = torch.device(device).type
    resolved = resolve_precision(AUTO, kind if kind in ("cuda", "mps") else "cpu", cpu_native)
    return resolved.dtype, resolved.reason
