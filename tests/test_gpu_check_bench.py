"""benchmarks/gpu_check.py rehearsed on a CPU with the tiny model: every arm asked for is a row, a finished arm
carries its stage's done.json, and an arm the CPU cannot run is a row with the one-line reason (not a crash)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_rehearsal_on_a_cpu_reports_every_arm(tmp_path, shared_data):
    command = [sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path), "--model", "tiny-debug",
               "--accelerator", "cpu", "--precision", "32-true", "--steps", "2", "--only", "0", "2",
               "--data", str(shared_data / "hh_rlhf_harmless.train.jsonl.gz")]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    trained, refused = report["rows"]
    assert trained["exit"] == 0 and trained["done"]["global_step"] == 2
    assert trained["done"]["train_tokens_per_s_after_first_step"] > 0 and "peak_cuda_gb" not in trained["done"]
    assert refused["exit"] == 2 and refused["failed"].startswith("error: quantize: nf4 needs a CUDA GPU")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # run folders removed
    assert "| stage1 prompt tuning (frozen LM) | 0 |" in (tmp_path / "gpu_check.md").read_text()


def test_gpu_carry_stages_a_tokenizer_folder_and_the_data(tmp_path, shared_data):
    """What a GPU machine without network needs besides the wheels: SmolLM2's tokenizer without its weights, the HH pairs."""
    from meet_lightning.models import load_tokenizer

    data = shared_data / "hh_rlhf_harmless.train.jsonl.gz"
    command = [sys.executable, "benchmarks/gpu_carry.py", "--no-wheels", "--out", str(tmp_path), "--data", str(data)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert (tmp_path / data.name).read_bytes() == data.read_bytes()
    staged, original = load_tokenizer(str(tmp_path / "tokenizer")), load_tokenizer("smollm2-135m-instruct")
    text = [{"role": "user", "content": "Name a colour."}]
    assert staged.apply_chat_template(text) == original.apply_chat_template(text) and len(staged) == len(original)


def test_the_gpu_session_runs_the_overlays_it_names(tmp_path):
    """gpu_session.sh picks gpu_check arms by index: the indices must still be the FSDP and DeepSpeed overlays."""
    import argparse
    import re

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    names = [a.name for a in gpu_check.arms(argparse.Namespace(steps=3, precision="32-true", accelerator="cpu", out=tmp_path))]
    script = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    first, rest = re.search(r'for only in "([\d ]+)" "([\d ]+)"', script).groups()
    assert [names[int(i)].split(",")[0] for i in first.split()] == [
        "FSDP overlay", "DeepSpeed ZeRO-2 overlay", "DeepSpeed ZeRO-3 overlay"
    ]  # fmt: skip
    assert all(int(i) < len(names) for i in rest.split())
