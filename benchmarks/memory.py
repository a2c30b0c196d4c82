"""Memory of each kind of training step: peak RSS per parameter for stage 1, stage 2 and DPO.

Each arm is a shipped recipe run through ``python -m meet_lightning fit`` in its own subprocess for a few steps
(no validation, no sanity check); the numbers are the stage's own per-phase peaks from ``done.json``
(``peak_rss_gb``, GiB: Linux VmHWM reset at each phase boundary, ``MEET_RSS_PER_PHASE=1``), so the training steps' peak and the whole stage's
peak come from one run. RSS is the process's resident memory (CPU training); on a GPU read the CUDA allocator's
numbers instead.

    python benchmarks/memory.py --out runs/memory                          # SmolLM2-135M, fp32, ±checkpointing
    python benchmarks/memory.py --out runs/memory_1b --model llama-1b      # a ~1B llama with random weights
    python benchmarks/memory.py --out runs/memory --precisions 32-true bf16-mixed --max_length 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh_rlhf_harmless.train.jsonl.gz"
ARMS = {
    "stage 1 (prompt tuning, frozen LM)": ["--config", "meet_hh_prompt", "--stage2.model", "null"],
    "stage 2 (full fine-tuning + controls)": ["--config", "ablations/stage2_only"],
    "DPO (full fine-tuning, cached reference)": ["--config", "baselines/dpo"],
}


def llama_1b(folder: Path) -> Path:
    """A ~1.1B-parameter llama (TinyLlama's shape) with random weights and SmolLM2's tokenizer, saved once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from meet_lightning.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # bf16-representable weights: fp32 and bf16 loads fingerprint alike (as the default model)
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def parameter_count(model: str) -> int:
    from meet_lightning.models import load_model

    return sum(p.numel() for p in load_model(model).parameters())


def run_arm(name: str, args: list[str], out: Path, model: str, precision: str, checkpointing: bool, steps: int, max_length: int) -> dict:
    folder = out / f"run_{len(list(out.glob('run_*')))}"
    command = [
        sys.executable, "-m", "meet_lightning", "fit", *args, "--data.path", str(HH), "--output_dir", str(folder),
        "--model_name_or_path", model, "--data.max_length", str(max_length), "--data.max_val_examples", "2",
        "--stage1.trainer.max_steps", str(steps), "--stage1.trainer.val_check_interval", "null",
        "--stage1.trainer.num_sanity_val_steps", "0", "--stage1.trainer.precision", precision,
        "--stage1.model.init_args.gradient_checkpointing", str(checkpointing).lower(),
    ]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "MEET_RSS_PER_PHASE": "1"}, capture_output=True)
    done = json.loads((folder / "stage1" / "done.json").read_text())
    return {"arm": name, "precision": precision, "checkpointing": checkpointing, "max_length": max_length, **done}


def table(rows: list[dict], params: int) -> str:
    lines = [
        f"parameters: {params:,}",
        "",
        "| arm | precision | checkpointing | train step peak GB | bytes / parameter | whole stage peak GB | stage / step |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        step = r["peak_rss_gb"]["train_step"]
        whole = max(r["peak_rss_gb"].values())
        lines.append(
            f"| {r['arm']} | {r['precision']} | {'on' if r['checkpointing'] else 'off'} | {step:.2f} |"
            f" {step * 2**30 / params:.1f} | {whole:.2f} | {r['peak_rss_over_train_step']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m-instruct", help="a model alias/folder, or llama-1b (built in code)")
    p.add_argument("--precisions", nargs="+", default=["32-true"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--max_length", type=int, default=384)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = str(llama_1b(args.out / "llama-1b")) if args.model == "llama-1b" else args.model
    params = parameter_count(model)
    rows = []
    for arm in args.arms:
        for precision in args.precisions:
            for checkpointing in (False, True):
                rows.append(run_arm(arm, ARMS[arm], args.out, model, precision, checkpointing, args.steps, args.max_length))
                print(json.dumps({k: rows[-1][k] for k in ("arm", "precision", "checkpointing", "peak_rss_gb")}), flush=True)
    text = table(rows, params)
    (args.out / "memory.md").write_text(text + "\n")
    (args.out / "memory.json").write_text(json.dumps({"model": model, "parameters": params, "rows": rows}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
