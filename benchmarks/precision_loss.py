"""Stage 2's training loss under each precision, step by step, for the same seed, data and steps.

``bf16-true`` keeps weights, gradients and AdamW's moments in bfloat16 (half of ``bf16-mixed``'s weight memory
and a quarter of its optimizer state); the cost is that small updates round away against bf16 weights. This
measures that caveat: each precision runs the stage-2 recipe (LM and controls trained jointly) through
``python -m meet_lightning fit`` in its own process, and the table puts the logged ``train/loss`` of every step
side by side with its difference to the first precision given (the reference, fp32 by default).

    python benchmarks/precision_loss.py --out runs/precision_loss                    # SmolLM2-135M, 12 steps
    python benchmarks/precision_loss.py --out runs/precision_loss --precisions bf16-mixed bf16-true --steps 40

On a CPU without native bf16 (no AVX512-BF16/AMX) the bf16 arms are slow but compute the same numbers.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = Path(os.environ.get("MEET_SHARED_DATA", ROOT.parent / "shared" / "data")) / "hh_rlhf_harmless.train.jsonl.gz"


def run(precision: str, args: argparse.Namespace) -> dict:
    """One precision's ``fit``: its per-step training losses (or why it failed) and its seconds."""
    folder = args.out / f"run_{precision}"
    shutil.rmtree(folder, ignore_errors=True)
    command = [
        sys.executable, "-m", "meet_lightning", "fit", "--config", "ablations/stage2_only", "--data.path", str(HH),
        "--output_dir", str(folder), "--model_name_or_path", args.model, "--data.max_length", str(args.max_length),
        "--data.batch_size", str(args.batch_size), "--data.max_val_examples", "2",
        "--stage1.trainer.max_steps", str(args.steps), "--stage1.trainer.val_check_interval", "null",
        "--stage1.trainer.num_sanity_val_steps", "0", "--stage1.trainer.log_every_n_steps", "1",
        "--stage1.trainer.precision", precision,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        return {"precision": precision, "failed": lines[-1] if lines else f"exit {done.returncode}"}
    (metrics,) = (folder / "stage1" / "logs").glob("version_*/metrics.csv")
    with metrics.open() as f:
        losses = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}
    info = json.loads((folder / "stage1" / "done.json").read_text())
    shutil.rmtree(folder, ignore_errors=True)
    return {"precision": precision, "losses": [losses[s] for s in sorted(losses)], "train_seconds": info["train_seconds"]}


def table(rows: list[dict]) -> str:
    """Steps as rows, precisions as columns; every other precision with its difference to the first."""
    ok = [r for r in rows if "losses" in r]
    reference = ok[0]
    head = ["step", *(r["precision"] for r in ok), *(f"{r['precision']} − {reference['precision']}" for r in ok[1:])]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for step, ref in enumerate(reference["losses"]):
        cells = [str(step), *(f"{r['losses'][step]:.4f}" for r in ok)]
        cells += [f"{r['losses'][step] - ref:+.4f}" for r in ok[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    for r in ok[1:]:
        gaps = [abs(a - b) for a, b in zip(r["losses"], reference["losses"], strict=True)]
        lines.append(f"\n{r['precision']}: max |Δ| {max(gaps):.4f}, mean |Δ| {sum(gaps) / len(gaps):.4f} over {len(gaps)} steps")
    lines += [f"\n{r['precision']}: failed — {r['failed']}" for r in rows if "failed" in r]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed", "bf16-true"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--max_length", type=int, default=256)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run(precision, args) for precision in args.precisions]
    text = table(rows)
    (args.out / "precision_loss.md").write_text(text + "\n")
    (args.out / "precision_loss.json").write_text(
        json.dumps({"settings": vars(args) | {"out": str(args.out)}, "rows": rows}, indent=2)
    )
    print(text)


if __name__ == "__main__":
    main()
