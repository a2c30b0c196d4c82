"""Stages in ``.gpu/`` (git-ignored) what a GPU machine without network needs for the GPU benchmarks, so a short
device lease goes to measuring: the wheels its image lacks, SmolLM2's folder without its weights (its tokenizer, for
the llama-1b model built in code; the GGUF that holds it is too large to carry) and the HH pairs.

    python benchmarks/gpu_carry.py                 # here, once per session (downloads the wheels)
    # then, on the device, with .gpu carried:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl \\
        && PYTHONPATH=/tmp/site:$PWD bash benchmarks/gpu_session.sh

The wheels are the versions of this environment (``importlib.metadata``) for CPython 3.12 on manylinux, the
device image's Python (``../.library/device/KINDS.md`` lists what the image already holds: torch, lightning,
transformers, peft, accelerate among others).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = Path(os.environ.get("MEET_SHARED_DATA", ROOT.parent / "shared" / "data")) / "hh_rlhf_harmless.train.jsonl.gz"
WHEELS = ("datasets", "dill", "multiprocess", "jsonargparse", "docstring-parser", "typeshed-client", "gguf", "trl")
"""Distributions the device image lacks: this library's own needs and TRL (for the TRL arms)."""
DEEPSPEED = "deepspeed==0.19.8"
"""For gpu_check's ZeRO arms. PyPI has DeepSpeed as source only: its wheel is built here without compiled ops
(``DS_BUILD_OPS=0``; ZeRO with torch's AdamW needs none)."""
DEEPSPEED_NEEDS = ("hjson==3.1.0", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0",
                   "typing-inspection==0.4.5", "typing-extensions==4.16.0")  # fmt: skip
"""What DeepSpeed needs that the device image lacks (pydantic 2.14 needs typing-extensions ≥ 4.16)."""
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def pinned() -> list[str]:
    """``name==version`` of each of :data:`WHEELS` as installed here; a missing one is a one-line error."""
    missing = []
    pins = []
    for name in WHEELS:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        sys.exit(f"error: {', '.join(missing)} not installed here — pip install -e .[bench] first")
    return pins


def download(pins: list[str], folder: Path) -> None:
    """Binary wheels of ``pins`` for CPython 3.12 on x86-64 Linux, without their dependencies, and DeepSpeed's,
    built here (see :data:`DEEPSPEED`)."""
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *platforms, "-d", str(folder), *pins, *DEEPSPEED_NEEDS]  # fmt: skip
    subprocess.run(command, check=True)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(folder), DEEPSPEED]
    subprocess.run(build, check=True, env={**os.environ, "DS_BUILD_OPS": "0"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--data", type=Path, default=HH, help="the HH pairs the GPU arms train on")
    parser.add_argument("--no-wheels", action="store_true", help="only the tokenizer and the data (tests)")
    args = parser.parse_args()
    from meet_lightning.models import resolve_model_path

    # SmolLM2's folder without its weights: config.json and the tokenizer files load as its tokenizer
    shutil.copytree(resolve_model_path("smollm2-135m-instruct"), args.out / "tokenizer", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.safetensors"))  # fmt: skip
    shutil.copy(args.data, args.out / args.data.name)
    if not args.no_wheels:
        download(pinned(), args.out / "wheels")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"staged {args.out} ({size / 2**20:.1f} MiB; a device call carries at most 64 MiB)")


if __name__ == "__main__":
    main()
