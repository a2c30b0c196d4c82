"""Test setup shared by every test file: offline Hugging Face, a throwaway datasets cache, the shared data."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Set before anything imports `datasets`/`huggingface_hub`: they read these once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
_DATASETS_CACHE = tempfile.mkdtemp(prefix="meet-test-datasets-")
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE
atexit.register(shutil.rmtree, _DATASETS_CACHE, ignore_errors=True)

import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and a second spinning OpenMP thread on a busy 2-core
# machine makes each step ~50x slower; one thread keeps the suite fast and its timing stable.
torch.set_num_threads(1)

SHARED = Path(os.environ.get("MEET_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
"""The real preference files (``../shared/data``), read by path; ``MEET_SHARED_DATA`` points elsewhere."""


@pytest.fixture(autouse=True)
def cpu_without_native_bf16(monkeypatch):
    """``precision: auto`` and ``dtype: auto`` resolve as on a CPU without native bf16, whatever CPU runs the
    suite: a test's numbers must not depend on the machine's generation (tests of the resolver inject their own)."""
    from meet_lightning import precision

    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: (False, "tests: CPU taken as without native bf16"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder. Missing is a failure, not a skip: the golden tests must run."""
    if not SHARED.is_dir():
        pytest.fail(f"shared data folder {SHARED} is missing — set MEET_SHARED_DATA to the folder of the files")
    return SHARED
