"""What only a GPU can show, in one short prepared run: a ~1B model's bf16 throughput and CUDA memory per stage,
a frozen 4-bit (NF4) base in stage 1, and the FSDP and DeepSpeed (ZeRO-2, ZeRO-3) overlays on CUDA with a resume.

Every arm is ``python -m meet_lightning fit`` in its own process (its CUDA peak is its own), read back from the
stage's ``done.json``: ``train_tokens_per_s_after_first_step`` (real data tokens; the first step's kernel
selection excluded) and ``peak_cuda_gb`` per phase (the CUDA allocator's own peak of each phase). Arms run in
the order given and stop being started when ``--budget_s`` would be passed, so a short lease still returns
the first ones; a failed arm is a row with its last error line.

    python benchmarks/gpu_check.py --out runs/gpu_check --tokenizer DIR --data HH.jsonl.gz  # on a CUDA machine
    python benchmarks/gpu_check.py --out /tmp/gc --model tiny-debug --accelerator cpu \
        --precision 32-true --steps 3                                                       # rehearsal on a CPU

``--model llama-1b`` (the default) builds a ~1.1B llama with random weights (benchmarks/memory.py) with the
tokenizer of ``--tokenizer`` (SmolLM2's, or its folder without the weights: ``benchmarks/gpu_carry.py``). MFU is estimated as
``k · 2 · N`` FLOPs per data token (N: non-embedding parameters plus the LM head; k = 2 for a frozen LM that
back-propagates to its inputs, 3 for full fine-tuning; attention and pad tokens not counted, so it is low)
against the best of five timed 8192³ bf16 matmuls on this device.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import llama_1b  # noqa: E402 - a sibling script, not a package

HH = Path(os.environ.get("MEET_SHARED_DATA", ROOT.parent / "shared" / "data")) / "hh_rlhf_harmless.train.jsonl.gz"
FSDP = ROOT / "configs" / "strategies" / "fsdp.yaml"
DEEPSPEED = ROOT / "configs" / "strategies" / "deepspeed.yaml"


@dataclass
class Arm:
    """One ``fit`` run: its recipe arguments, the stage folder it reports, and its FLOPs factor ``k``."""

    name: str
    args: list[str]
    stage: str = "stage1"
    k: int = 2
    resume_steps: int | None = None  # run again with this many steps: the stage must resume from last.ckpt
    own_model: bool = False  # the recipe names its model and lengths (the debug overlay): only the data is set
    expect: list[str] = field(default_factory=list)  # lines the (resumed) run must print


def stage_args(slot: str, steps: int, precision: str, accelerator: str) -> list[str]:
    """Budget and hardware of one stage slot: a few steps, no mid-run validation or checkpoint."""
    t = f"--{slot}.trainer."
    return [f"{t}max_steps", str(steps), f"{t}val_check_interval", "null", f"{t}num_sanity_val_steps", "0",
            f"{t}precision", precision, f"{t}accelerator", accelerator, f"{t}devices", "1",
            f"{t}log_every_n_steps", "5", f"--{slot}.checkpoint_every_n_steps", "1000"]  # fmt: skip


def fsdp_in_stage1_slot(out: Path) -> Path:
    """The FSDP overlay's stage-2 trainer moved to the stage-1 slot (single-stage recipes train there)."""
    overlay = yaml.safe_load(FSDP.read_text())
    path = out / "fsdp_stage1_slot.yaml"
    path.write_text(yaml.safe_dump({"stage1": {"trainer": overlay["stage2"]["trainer"]}}))
    return path


def tiny_folder(out: Path) -> Path:
    """The tiny model saved as a folder: a 4-bit load needs one (the built-in alias loads as floats)."""
    from meet_lightning.models import build_tiny_model, build_tiny_tokenizer

    folder = out / "tiny"
    if not (folder / "config.json").is_file():
        build_tiny_model().save_pretrained(folder)
        build_tiny_tokenizer().save_pretrained(folder)
    return folder


def arms(args: argparse.Namespace) -> list[Arm]:
    """The arms in priority order (see the module docstring)."""
    one = stage_args("stage1", args.steps, args.precision, args.accelerator)
    prompt = ["--config", "configs/meet_hh_prompt.yaml", "--stage2.model", "null", *one]
    stage2 = ["--config", "configs/ablations/stage2_only.yaml", *one]

    def tiny_overlay(overlay: Path) -> list[str]:  # a strategy overlay's own command, on one device
        return ["--config", "configs/meet_hh_prompt.yaml", "--config", str(overlay), "--config", "configs/debug.yaml",
                "--data.eval_batch_size", "1", "--stage1.trainer.accelerator", args.accelerator,
                "--stage1.trainer.devices", "1", "--stage2.trainer.accelerator", args.accelerator,
                "--stage2.trainer.devices", "1"]  # fmt: skip

    tiny_fsdp, tiny_zero = tiny_overlay(FSDP), tiny_overlay(DEEPSPEED)
    resumed = ["stage1: finished earlier", "restoring from", "global_step 5"]
    zero = {"stage": "stage2", "k": 3, "resume_steps": 5, "own_model": True, "expect": resumed}  # the overlay's own test
    return [
        Arm("stage1 prompt tuning (frozen LM)", prompt),
        Arm("stage2 full fine-tuning + controls", stage2, k=3),
        Arm("stage1 prompt tuning, NF4 base", [*prompt, "--stage1.model.init_args.quantize", "nf4"]),
        Arm(
            "NF4 stage 1 → stage 2 → export, tiny model",
            [
                "--config",
                "configs/meet_hh_prompt.yaml",
                "--config",
                "configs/debug.yaml",
                "--model_name_or_path",
                str(tiny_folder(args.out)),
                "--stage1.model.init_args.quantize",
                "nf4",
                "--stage1.trainer.accelerator",
                args.accelerator,
                "--stage2.trainer.accelerator",
                args.accelerator,
            ],
            stage="stage2",
            k=3,
            own_model=True,
        ),
        Arm(
            "FSDP overlay, tiny model, resume 3 → 5 (the overlay's own command)",
            tiny_fsdp,
            stage="stage2",
            k=3,
            resume_steps=5,
            own_model=True,
            expect=resumed,
        ),
        Arm("DeepSpeed ZeRO-2 overlay, tiny model, resume 3 → 5", tiny_zero, **zero),
        Arm(
            "DeepSpeed ZeRO-3 overlay, tiny model, resume 3 → 5",
            [*tiny_zero, "--stage2.trainer.strategy.init_args.stage", "3"],
            **zero,
        ),
        Arm(
            "stage2 full fine-tuning + controls, gradient checkpointing",
            [*stage2, "--stage1.model.init_args.gradient_checkpointing", "true"],
            k=3,
        ),
        Arm("stage2 full fine-tuning, FSDP overlay (1 device)", [*stage2, "--config", str(fsdp_in_stage1_slot(args.out))], k=3),
        Arm("DPO (full fine-tuning, cached reference)", ["--config", "configs/baselines/dpo.yaml", *one], k=3),
        Arm("stage1 LoRA controls (frozen LM)", ["--config", "configs/meet_hh_lora.yaml", "--stage2.model", "null", *one]),
    ]


def run_fit(arm: Arm, folder: Path, common: list[str], extra: list[str], timeout: float) -> tuple[int, str, float]:
    """One ``fit`` process; its exit code, its output, its wall seconds."""
    command = [sys.executable, "-m", "meet_lightning", "fit", *arm.args, *common, "--output_dir", str(folder), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    try:
        run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        code, output = run.returncode, run.stdout + run.stderr
    except subprocess.TimeoutExpired as stopped:
        code, output = 124, f"{stopped.stdout or ''}{stopped.stderr or ''}\ntimed out after {timeout:.0f} s"
    return code, output if isinstance(output, str) else output.decode(errors="replace"), time.monotonic() - started


def measure_arm(arm: Arm, args: argparse.Namespace, model: str, flops_per_token: float, peak: float) -> dict:
    """Runs one arm (and its resume), returns its row."""
    folder = args.out / "runs" / f"arm_{abs(hash(arm.name)) % 10**6}"
    shutil.rmtree(folder, ignore_errors=True)
    common = ["--data.path", str(args.data), "--data.cache_dir", str(args.out / "data_cache")]
    if not arm.own_model:
        common += ["--model_name_or_path", model, "--data.max_length", str(args.max_length), "--data.max_val_examples", "16"]
    code, output, seconds = run_fit(arm, folder, common, [], args.arm_timeout)
    row: dict = {"arm": arm.name, "exit": code, "wall_s": round(seconds, 1), "command_args": [*arm.args, *common]}
    if code == 0 and arm.resume_steps:
        extra = [f"--{arm.stage}.trainer.max_steps", str(arm.resume_steps)]
        code, output2, seconds2 = run_fit(arm, folder, common, extra, args.arm_timeout)
        row.update(exit=code, resume_wall_s=round(seconds2, 1), output_resume=output2[-3000:])
        row["missing_lines"] = [line for line in arm.expect if line not in output2]
    row["output_tail"] = output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:") or "Error" in line]
    if code != 0:
        row["failed"] = errors[-1] if errors else (output.strip().splitlines() or [f"exit {code}"])[-1]
    done = folder / arm.stage / "done.json"
    if done.is_file():
        record = json.loads(done.read_text())
        row["done"] = record
        rate = record.get("train_tokens_per_s_after_first_step") or record.get("train_tokens_per_s", 0)
        row["mfu"] = round(rate * arm.k * flops_per_token / peak, 4) if peak and arm.k else None
    shutil.rmtree(folder, ignore_errors=True)  # a 1B stage-2 run leaves ~20 GB of checkpoint and export
    return row


def profile_module_steps(model: str, data: Path, out: Path, device: str, steps: int = 6) -> dict:
    """Stage 1's module stepped by hand (no Lightning loop, no callbacks): seconds per step with 4 forward chunks
    and with 1, the data loader's seconds per batch, and a profiler table of three steps (``profile.txt``)."""
    import torch

    from meet_lightning.controls.tokens import PromptTuningControl
    from meet_lightning.data.datamodule import PreferenceDataModule
    from meet_lightning.modules import ControlTokenModule

    loader = PreferenceDataModule(path=str(data), preference="harmless", model_name_or_path=model, max_length=512,
                                  batch_size=8, max_examples=256, max_val_examples=2, cache_dir=str(out / "data_cache"))  # fmt: skip
    loader.setup("fit")
    started = time.perf_counter()
    batches = [b for _, b in zip(range(steps), loader.train_dataloader(), strict=False)]
    load_s = (time.perf_counter() - started) / len(batches)
    batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
    module = ControlTokenModule(model, PromptTuningControl(num_tokens=20, init="vocab"), loader.control_schema, lr=3e-2)
    module.configure_model()
    module.to(device).train()
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step(batch: dict) -> None:
        with autocast:
            loss = module.compute_loss(batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    result = {"data_loader_s_per_batch": round(load_s, 4), "tokens_per_batch": [int(b["attention_mask"].sum()) for b in batches]}
    for chunks in (4, 1):
        module.hparams.forward_chunks = chunks
        step(batches[0])  # warm-up
        sync()
        started = time.perf_counter()
        for batch in batches:
            step(batch)
        sync()
        result[f"s_per_step_chunks_{chunks}"] = round((time.perf_counter() - started) / len(batches), 4)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as profiler:
        for batch in batches[:3]:
            step(batch)
        sync()
    averages = profiler.key_averages()
    tables = [averages.table(sort_by=key, row_limit=25) for key in ("cpu_time_total", "self_cpu_time_total")]
    if device == "cuda":
        tables.append(averages.table(sort_by="cuda_time_total", row_limit=15))
    (out / "profile.txt").write_text("\n\n".join(tables))
    return result


def bf16_peak_flops(device: str, size: int = 8192, trials: int = 5) -> tuple[float, list[float]]:
    """Best of ``trials`` timed ``size``³ bf16 matmuls (FLOP/s) and every trial's rate."""
    import torch

    if device != "cuda":
        return 0.0, []
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    rates = []
    for _ in range(trials + 2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        rates.append(10 * 2 * size**3 / (time.perf_counter() - start))
    rates = rates[2:]  # two warm-ups
    return max(rates), [round(r / 1e12, 1) for r in rates]


def model_flops_per_token(model: str) -> tuple[int, float]:
    """Parameters of ``model`` and ``2 · N`` (non-embedding parameters plus the LM head) FLOPs per token."""
    from meet_lightning.models import load_model

    lm = load_model(model)
    total = sum(p.numel() for p in lm.parameters())
    embedding, head = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    # a lookup computes nothing, the head a full matmul; a tied head is counted once in ``total``
    matmul = total - embedding.numel() + (head.numel() if head is embedding else 0)
    return total, 2.0 * matmul


def environment() -> dict:
    """Versions and the device, for the report."""
    import lightning
    import peft
    import torch
    import transformers

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "lightning": lightning.__version__, "transformers": transformers.__version__, "peft": peft.__version__}  # fmt: skip
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["device_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    return info


def table(report: dict) -> str:
    """The markdown report: one row per arm."""
    env = report["environment"]
    lines = [
        f"device: {env.get('device', 'cpu')}; torch {env['torch']}, lightning {env['lightning']}, transformers "
        f"{env['transformers']}; model {report['model']} ({report['parameters']:,} parameters); {report['steps']} steps "
        f"per arm, batch 8 rows (DPO 4 pairs), max_length {report['max_length']}, precision {report['precision']}; "
        f"bf16 matmul peak {report['peak_tflops']} TFLOP/s (trials {report['peak_trials']})",
        "",
        "| arm | exit | tokens/s after step 1 | train step peak CUDA GB | whole stage peak CUDA GB | ≈MFU | wall s | note |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        done = row.get("done", {})
        cuda = done.get("peak_cuda_gb", {})
        note = row.get("failed") or ("missing: " + "; ".join(row["missing_lines"]) if row.get("missing_lines") else "")
        lines.append(
            f"| {row['arm']} | {row['exit']} | {done.get('train_tokens_per_s_after_first_step', '')} | "
            f"{cuda.get('train_step', '')} | {max(cuda.values()) if cuda else ''} | {row.get('mfu') or ''} | "
            f"{row['wall_s']} | {str(note)[:160]} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="llama-1b", help="llama-1b (built in code) or a model alias/folder")
    p.add_argument("--tokenizer", default="smollm2-135m-instruct", help="tokenizer of the llama-1b model")
    p.add_argument("--data", type=Path, default=HH)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--accelerator", default="gpu")
    p.add_argument("--budget_s", type=float, default=420.0, help="start no arm after this many seconds")
    p.add_argument("--arm_timeout", type=float, default=150.0)
    p.add_argument("--only", nargs="+", type=int, help="indices of the arms to run (default: all, in order)")
    p.add_argument("--profile", action="store_true", help="first profile stage 1's module stepped by hand")
    args = p.parse_args()
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    model = str(llama_1b(args.out / "llama-1b", args.tokenizer)) if args.model == "llama-1b" else args.model
    parameters, per_token = model_flops_per_token(model)
    peak, trials = bf16_peak_flops("cuda" if args.accelerator == "gpu" else "cpu")
    report = {"environment": environment(), "model": args.model, "parameters": parameters, "steps": args.steps,
              "max_length": args.max_length, "precision": args.precision, "peak_tflops": round(peak / 1e12, 1),
              "peak_trials": trials, "rows": []}  # fmt: skip
    print(json.dumps(report["environment"]), flush=True)
    if args.profile:
        report["profile"] = profile_module_steps(model, args.data, args.out, "cuda" if args.accelerator == "gpu" else "cpu")
        print(json.dumps(report["profile"]), flush=True)
    for index, arm in enumerate(arms(args)):
        if args.only and index not in args.only:
            continue
        if time.monotonic() - started > args.budget_s:
            report["rows"].append({"arm": arm.name, "exit": None, "wall_s": 0, "failed": "not started: out of time"})
            continue
        row = measure_arm(arm, args, model, per_token, peak)
        report["rows"].append(row)
        print(json.dumps({k: row.get(k) for k in ("arm", "exit", "wall_s", "mfu", "failed")}), flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_check.md").write_text(table(report) + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
