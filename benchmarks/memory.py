"""Memory of each kind of training step: peak RSS per parameter for stage 1, stage 2 and DPO.

Each arm is a shipped recipe run through ``python -m meet_lightning fit`` in its own subprocess for a few steps
(no validation, no sanity check); the numbers are the stage's own per-phase peaks from ``done.json``
(``peak_rss_gb``, GiB: Linux VmHWM reset at each phase boundary, ``MEET_RSS_PER_PHASE=1``), so the training
steps' peak and the whole stage's peak come from one run. RSS is the process's resident memory (CPU training); on
a GPU read the CUDA allocator's numbers instead. ``s / step`` is the stage's ``train_seconds`` over its steps (the
first step's warm-up included): a number only when nothing else runs on the machine.

    python benchmarks/memory.py --out runs/memory                          # SmolLM2-135M, fp32, ±checkpointing
    python benchmarks/memory.py --out runs/memory_1b --model llama-1b      # a ~1B llama with random weights
    python benchmarks/memory.py --out runs/memory_long --long --max_length 1024  # rows that fill max_length
    python benchmarks/memory.py --out runs/memory_opt --arms "stage 2 (full fine-tuning + controls)" \
        --checkpointing off --steps 6 --optimizers adamw adamw_foreach adamw_fused

HH's rows are short (most under 400 tokens) and batches are padded to their longest row, so ``--max_length 1024``
alone measures the same tensors as 384; ``--long`` writes a pairwise file whose rows fill ``max_length`` (HH
responses joined until long enough), where activation memory, and what checkpointing saves, shows.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = Path(os.environ.get("MEET_SHARED_DATA", ROOT.parent / "shared" / "data")) / "hh_rlhf_harmless.train.jsonl.gz"
ARMS = {
    "stage 1 (prompt tuning, frozen LM)": ["--config", "meet_hh_prompt", "--stage2.model", "null"],
    "stage 2 (full fine-tuning + controls)": ["--config", "ablations/stage2_only"],
    "DPO (full fine-tuning, cached reference)": ["--config", "baselines/dpo"],
}


def llama_1b(folder: Path, tokenizer_from: str = "smollm2-135m-instruct") -> Path:
    """A ~1.1B-parameter llama (TinyLlama's shape) with random weights and ``tokenizer_from``'s tokenizer (SmolLM2's
    by default; a model folder without its weights does too: ``benchmarks/gpu_carry.py``), saved once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from meet_lightning.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_from)
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


def long_pairs(folder: Path, max_length: int, model: str, pairs: int = 64) -> Path:
    """A pairwise jsonl whose rows fill ``max_length`` of ``model``'s tokens (joined HH responses; memory only)."""
    from meet_lightning.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    texts = [json.loads(line)["chosen"].split("Assistant:")[-1].strip() for line in gzip.open(HH, "rt")]
    path = folder / f"long_{max_length}.jsonl"
    with path.open("w") as f:
        for i in range(pairs):
            # ~0.9 * max_length response tokens: the row fills max_length once the prompt and template are added,
            # and no response is longer than max_length (those rows are dropped, not cut).
            ids = []
            for j in range(i, len(texts), pairs):
                ids += tokenizer(" " + texts[j], add_special_tokens=False)["input_ids"]
                if len(ids) >= 0.9 * max_length:
                    break
            ids = ids[: int(0.9 * max_length)]
            chosen, rejected = tokenizer.decode(ids), tokenizer.decode(ids[len(ids) // 2 :] + ids[: len(ids) // 2])
            f.write(json.dumps({"prompt": f"Question {i}: tell me more.", "chosen": chosen, "rejected": rejected}) + "\n")
    return path


def parameter_count(model: str) -> int:
    from meet_lightning.models import load_model

    return sum(p.numel() for p in load_model(model).parameters())


@dataclass(frozen=True)
class Arm:
    """One measured run: a recipe and the settings that change its memory."""

    name: str
    precision: str
    checkpointing: bool
    optimizer: str


def run_arm(arm: Arm, out: Path, model: str, data: Path, args: argparse.Namespace) -> dict:
    """One arm in its own ``fit`` process; a failed run is a row that says why (the table shows it)."""
    folder = out / f"run_{list(ARMS).index(arm.name)}_{arm.precision}_{'ckpt' if arm.checkpointing else 'nockpt'}_{arm.optimizer}"
    command = [
        sys.executable, "-m", "meet_lightning", "fit", *ARMS[arm.name], "--data.path", str(data),
        "--output_dir", str(folder), "--model_name_or_path", model, "--data.max_length", str(args.max_length),
        "--data.max_val_examples", "2", "--stage1.trainer.max_steps", str(args.steps),
        "--stage1.trainer.val_check_interval", "null", "--stage1.trainer.num_sanity_val_steps", "0",
        "--stage1.trainer.precision", arm.precision,
        "--stage1.model.init_args.gradient_checkpointing", str(arm.checkpointing).lower(),
        "--stage1.model.init_args.optimizer", arm.optimizer,
        *(["--data.format", "pairwise"] if data != HH else []),
        *(["--data.batch_size", str(args.batch_size)] if args.batch_size else []),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MEET_RSS_PER_PHASE": "1"}
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    row = {**asdict(arm), "arm": arm.name, "max_length": args.max_length, "batch_size": args.batch_size}
    if run.returncode != 0:
        lines = [line for line in run.stderr.splitlines() if line.strip()]
        row["failed"] = lines[-1] if lines else f"exit {run.returncode}"
    else:
        row.update(json.loads((folder / "stage1" / "done.json").read_text()))
    if not args.keep:  # a 1B stage-2 run leaves ~17 GB of checkpoint and export behind
        shutil.rmtree(folder, ignore_errors=True)
    return row


def table(rows: list[dict], params: int, data: Path) -> str:
    batch = rows[0]["batch_size"] or "each recipe's own (8 rows; DPO 4 pairs)"
    lines = [
        f"parameters: {params:,}; data {data.name}; max_length {rows[0]['max_length']}; batch {batch}",
        "",
        "| arm | precision | checkpointing | optimizer | train step peak GB | bytes / parameter | whole stage peak GB"
        " | stage / step | s / step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        head = f"| {r['arm']} | {r['precision']} | {'on' if r['checkpointing'] else 'off'} | {r['optimizer']} |"
        if "failed" in r:
            lines.append(f"{head} failed: {r['failed'][:120]} | | | | |")
            continue
        step = r["peak_rss_gb"]["train_step"]
        whole = max(r["peak_rss_gb"].values())
        lines.append(
            f"{head} {step:.2f} | {step * 2**30 / params:.1f} | {whole:.2f} | {r['peak_rss_over_train_step']:.2f} |"
            f" {r['train_seconds'] / max(r['global_step'], 1):.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m-instruct", help="a model alias/folder, or llama-1b (built in code)")
    p.add_argument("--precisions", nargs="+", default=["32-true"])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--max_length", type=int, default=384)
    p.add_argument("--batch_size", type=int, default=None, help="default: each recipe's own (8, DPO 4 pairs)")
    p.add_argument("--long", action="store_true", help="rows that fill max_length (see above) instead of HH's own")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--keep", action="store_true", help="keep each run's folder (checkpoints, export)")
    p.add_argument("--optimizers", nargs="+", default=["adamw"], help="model.init_args.optimizer values to compare")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = str(llama_1b(args.out / "llama-1b")) if args.model == "llama-1b" else args.model
    params = parameter_count(model)
    data = long_pairs(args.out, args.max_length, model) if args.long else HH
    rows = []
    for name, precision, checkpointing, optimizer in product(args.arms, args.precisions, args.checkpointing, args.optimizers):
        rows.append(run_arm(Arm(name, precision, checkpointing == "on", optimizer), args.out, model, data, args))
        keys = ("arm", "precision", "checkpointing", "optimizer", "peak_rss_gb", "train_seconds", "failed")
        print(json.dumps({k: rows[-1].get(k) for k in keys}), flush=True)
    text = table(rows, params, data)
    (args.out / "memory.md").write_text(text + "\n")
    (args.out / "memory.json").write_text(json.dumps({"model": model, "parameters": params, "rows": rows}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
