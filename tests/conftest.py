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


# ---------------------------------------------------------------------------------- shared test factories
def build_tiny_hh_data(shared: Path, **options):
    """A set-up :class:`~meet_lightning.data.datamodule.PreferenceDataModule` on the shared HH file with the tiny model
    (16 rows, 4 held-out pairs, 96 tokens, batches of 4 unless ``options`` say otherwise)."""
    from meet_lightning.data.datamodule import PreferenceDataModule

    defaults = dict(preference="harmless", model_name_or_path="tiny-debug", max_length=96, batch_size=4, max_examples=16,
                    max_val_examples=4)  # fmt: skip
    data = PreferenceDataModule(path=str(shared / HH_FILE), **{**defaults, **options})
    data.setup("fit")
    return data


def control_variants() -> dict:
    """One factory per kind of control, small and seeded, for tests that compare a forward path across them:
    learned vectors before the prompt and after it, text, none, and LoRA (which routes every row's weights)."""
    from meet_lightning.controls.tokens import ControlTokens, LoRAControl, PromptTuningControl, TextControl

    return {
        "infix": lambda: PromptTuningControl(num_tokens=3, init="random", placement="infix", seed=0),
        "text": lambda: TextControl({"good": "A good answer:", "bad": "A poor one:"}),
        "none": ControlTokens,
        "prefix": lambda: PromptTuningControl(num_tokens=3, init="random", placement="prefix", seed=0),
        "lora": lambda: LoRAControl(rank=4, target_modules=["q_proj", "v_proj"], seed=0),
    }


def controlled_logps_and_grads(name: str, schema, batch, **options):
    """The tiny model in fp32 under control ``name`` of :func:`control_variants` (LoRA's B drawn, so that it steers):
    ``controlled_response_logps(**options)``'s log-probs and mask, every gradient of their sum, and the (rows,
    length) of each decoder pass."""
    from meet_lightning.controls.tokens import controlled_response_logps
    from meet_lightning.models import load_model, load_tokenizer

    torch.manual_seed(0)
    lm = load_model("tiny-debug", torch.float32)
    control = control_variants()[name]()
    control.setup(lm, load_tokenizer("tiny-debug"), schema)
    with torch.no_grad():
        for key, p in control.named_parameters():
            if "lora_b" in key:
                p.normal_(0.0, 0.1)
    shapes = []
    hook = lm.get_decoder().register_forward_pre_hook(
        lambda _, args, kwargs: shapes.append(tuple(kwargs["inputs_embeds"].shape[:2])), with_kwargs=True
    )
    logps, mask = controlled_response_logps(lm, control, batch, **options)
    hook.remove()
    (logps * mask).sum().backward()
    grads = {k: p.grad for k, p in [*lm.named_parameters(), *control.named_parameters()] if p.grad is not None}
    return logps.detach(), mask, grads, shapes


@pytest.fixture(scope="module")
def pair_batch(shared_data):
    """The schema and first training batch of tiny HH pairs (256 tokens, a paired batch)."""
    from meet_lightning.data.rows import ControlSchema

    data = build_tiny_hh_data(shared_data, max_length=256, pair_batches=True, max_val_examples=2)
    return ControlSchema.from_dict(data.control_schema), next(iter(data.train_dataloader()))


@pytest.fixture(scope="session")
def tiny_hh_data(shared_data):
    """:func:`build_tiny_hh_data` as a factory: ``tiny_hh_data(max_length=128, pair_batches=True)``."""
    return lambda **options: build_tiny_hh_data(shared_data, **options)


def build_cpu_trainer(root: Path, steps: int = -1, **options):
    """A quiet CPU ``Trainer`` for tests: no logger, checkpoints, progress bar, summary or validation unless
    ``options`` turn them on."""
    import lightning as L

    defaults = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    return L.Trainer(max_steps=steps, default_root_dir=root, **{**defaults, **options})


@pytest.fixture
def cpu_trainer(tmp_path):
    """:func:`build_cpu_trainer` in this test's folder, as a factory: ``cpu_trainer(3, log_every_n_steps=1)``."""
    return lambda steps=-1, **options: build_cpu_trainer(tmp_path, steps, **options)
