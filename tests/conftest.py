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


HH_FILE = "hh_rlhf_harmless.train.jsonl.gz"


@pytest.fixture(scope="session")
def hh_hub_folder(shared_data, tmp_path_factory) -> Path:
    """A local folder laid out like the ``Anthropic/hh-rlhf`` repository, which ``datasets.load_dataset`` reads as
    it reads the hub: ``harmless-base/`` (rows 1-300 of the shared HH file) and ``helpful-base/`` (rows 301-500),
    each with ``train.jsonl.gz`` and a 40-row ``test.jsonl.gz``."""
    import gzip

    root = tmp_path_factory.mktemp("hub") / "hh-rlhf"
    lines = gzip.decompress((shared_data / HH_FILE).read_bytes()).splitlines(keepends=True)
    for name, part in (("harmless-base", lines[:300]), ("helpful-base", lines[300:500])):
        (root / name).mkdir(parents=True)
        (root / name / "train.jsonl.gz").write_bytes(gzip.compress(b"".join(part)))
        (root / name / "test.jsonl.gz").write_bytes(gzip.compress(b"".join(part[:40])))
    return root


HELPSTEER_ROWS = [
    {"prompt": f"Question {i}: how do I {task}?", "response": response, "helpfulness": help_, "correctness": 3,
     "coherence": 4, "complexity": 1, "verbosity": verb}
    for i, (task, response, help_, verb) in enumerate(
        [
            ("boil an egg", "Simmer it for nine minutes.", 4, 0),
            ("boil an egg", "Put the egg in cold water, bring it to a boil, then simmer for nine minutes and cool it.", 3, 3),
            ("sort a list in Python", "Use sorted(xs).", 4, 1),
            ("sort a list in Python", "Call sorted(xs) for a new list or xs.sort() in place; both take key= and reverse=.", 2, 4),
            ("tie a tie", "I cannot help with that.", 0, 0),
            ("tie a tie", "Cross the wide end over, loop it up through the neck and down through the knot.", 4, 2),
        ]
        * 8
    )
]  # fmt: skip
"""HelpSteer2-shaped rows (its columns, 0-4 ratings) written by the tests that need them."""
