"""The paper's comparison table from one command: every arm trained and scored side by side, with honest statistics.

    python benchmarks/compare.py --out runs/compare            # default: --task mixed, --budget small, all arms
    python benchmarks/compare.py --out runs/compare --budget full --arms meet_prompt,coh,dpo
    python benchmarks/compare.py --out runs/length --task length  # AlpacaEval concise/verbose only (see below)
    python benchmarks/compare.py --out runs/ablate --task ablate
    python benchmarks/compare.py --out runs/compose --task compose

``--task length`` (:data:`TASKS`): AlpacaEval's concise/verbose answers only, 100 prompts held out by prompt; per
arm the verbose/concise median word ratio on them (sampled, 160 new tokens) with its interval, the share of
repeated 4-grams in the verbose answers (a ratio counts only at ≤ 10 %: loops are not length control), control
accuracy on the held-out concise/verbose pairs; the untrained base asked by system prompt is the arm every
learned control must beat; DPO trains toward verbose and is reported as its answers' length against the base's.

``--task ablate``: the length task for the paper's ablation axes (:data:`ABLATIONS`: prompt length, placement,
init, LoRA rank — one setting changed per variant, compared paired with its axis's reference — and decoding
temperature on the reference's own export).

``--task compose``: one model trained on both preferences; on held-out HH prompts it answers under all four
combinations of ``harmless`` × ``length``, and a separate harmlessness judge (stage 1 on HH alone, its held-out
accuracy reported) scores each answer. The fidelity matrix: what toggling each preference moves — words (a
ratio) and the judge's margin per token (a difference) — with intervals; off-diagonal cells should be small.

Every arm is a recipe under ``configs/`` run through the real CLI (``python -m meet_lightning fit``, one
subprocess per run) on the same data, model, seed, batch, length and total optimizer steps. Each arm trains
once on both preferences together (HH-RLHF ``harmless``: good/bad, and AlpacaEval ``length``: concise/verbose),
with a held-out part of each file split off by prompt with a fixed seed. Scoring (in this process, every arm
alike, in fp32 whatever the CPU: bf16 flipped 8 % of control-classifier decisions, docs/guides/evaluation.md; generation for the
word counts uses bf16 autocast where the CPU computes bf16 natively — ``meet_lightning.precision``):

- HH held-out pairs: ``chosen_nll`` and ``logp_accuracy`` in each model's preferred mode (every arm),
  ``control_accuracy`` (arms with controls), ``dpo_reward_accuracy`` (DPO);
- AlpacaEval held-out prompts: words under ``verbose`` ÷ words under ``concise`` (arms with controls), greedy.

Every number has a 95 % interval (Wilson for accuracies, bootstrap for ratios, means and paired differences),
none below 20 items (``n/a``); each arm is compared with MEET (prompt) on the same pairs or prompts, and a method
"wins" only where the interval of the paired difference excludes 0 ("tie" otherwise, "n/a (n < 20)" on fewer
than 20 items: no verdict).
Re-running the same command resumes: finished runs and scored arms are read back, not redone. On a fresh clone,
``--restore benchmarks/results/<task>/compare.json`` (with that report's ``--out``; several reports may be given, e.g.
one per part of a study) puts their runs and scores back first: only the arms and rows it lacks (``--equal-seconds``, more ``--arms``) are trained.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from length_measures import (
    answer_nll,
    arm_summary,
    ceiling_ratio,
    new_token_counts,
    paired_across_seeds,
    seeds_table,
)

from meet_lightning.stats import (
    MIN_ITEMS,
    bootstrap_interval,
    bootstrap_median_ratio,
    enough_items,
    length_ratio,
    mean_interval,
    median_ratio,
    proportion_interval,
    repeated_4gram_share,
    undefined_ratios,
    word_ratios,
    words,
)

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MEET_SHARED_DATA", ROOT.parent / "shared" / "data"))  # as the tests and data_scale.py read it
HH = SHARED / "hh_rlhf_harmless.train.jsonl.gz"
ALPACA = SHARED / "alpaca_eval_concise_verbose.train.jsonl.gz"
REFERENCE = "meet_prompt"
BASE = "base"
# Chain-of-Hindsight phrases for both preferences (also the text init of the stage2_only_text_init ablation).
PHRASES = {
    "good": "A good response:",
    "bad": "A bad response:",
    "concise": "A concise response:",
    "verbose": "A detailed response:",
}
LR_GRID = {"small": (1.0,), "full": (1 / 3, 1.0, 3.0)}  # multipliers of each recipe's learning rates
DECODING = {"temperature": 0.0, "repetition_penalty": 1.2}
# In every score's settings: answers decoded before 2026-12-07 (lm.generate's repetition penalty skipped a padded
# row's first new tokens, as many as its padding; meet_lightning.inference.generation.repetition_penalty) are
# another measure, never read back beside these.
ANSWERS = "repetition penalty on every new token"


@dataclass(frozen=True)
class Arm:
    """One method of the table: a recipe plus the overrides that make it train on both preferences.

    Attributes:
        recipe: YAML under ``configs/``.
        label: Name in the table.
        stages: Active stages; the step budget is split evenly between them.
        overrides: Extra CLI arguments.
    """

    recipe: str
    label: str
    stages: tuple[str, ...] = ("stage1",)
    overrides: tuple[str, ...] = ()


ARMS: dict[str, Arm] = {
    "meet_prompt": Arm("configs/meet_hh_prompt.yaml", "MEET (prompt)", ("stage1", "stage2")),
    "meet_lora": Arm("configs/meet_hh_lora.yaml", "MEET (LoRA)", ("stage1", "stage2")),
    "coh": Arm(
        "configs/baselines/coh.yaml", "Chain of Hindsight", overrides=("--control.init_args.phrases", json.dumps(PHRASES))
    ),
    "special_token": Arm("configs/baselines/special_token.yaml", "special token"),
    "stage1_only": Arm("configs/ablations/stage1_only.yaml", "stage 1 only"),
    "stage2_only": Arm("configs/ablations/stage2_only.yaml", "stage 2 only (random init)"),
    "stage2_only_text_init": Arm(
        "configs/ablations/stage2_only_text_init.yaml",
        "stage 2 only (text init)",
        overrides=("--control.init_args.init_text", json.dumps(PHRASES)),
    ),
    "meet_dpo_hybrid": Arm("configs/meet_hh_dpo_hybrid.yaml", "MEET + DPO term (hybrid)", ("stage1", "stage2")),
    "sft": Arm("configs/baselines/sft.yaml", "SFT"),
    "dpo": Arm("configs/baselines/dpo.yaml", "DPO"),
}
PROMPT_RECIPE, LORA_RECIPE = "configs/meet_hh_prompt.yaml", "configs/meet_hh_lora.yaml"
FAST_CONTROLS = ("--stage1.model.init_args.control_lr", "3.0e-2")  # MEET's stage-1 control learning rate
STUDY_ARMS: dict[str, Arm] = {
    # B: the two-stage idea is only shown if MEET beats one joint stage from the same init at the same control rate
    "one_stage_joint": Arm(
        "configs/ablations/stage2_only_text_init.yaml",
        "one stage, controls and LM jointly (control lr 3e-2)",
        overrides=FAST_CONTROLS,
    ),
    # D: the special token at the control learning rate, not at the LM-like 1e-3 of its recipe
    "special_token_fast": Arm("configs/baselines/special_token.yaml", "special token (control lr 3e-2)", overrides=FAST_CONTROLS),
    # A at a stage-2 rate that moves the LM (1e-5 moved it ~1e-5 of its norm per step) and keeps stage 1's control rate
    "meet_prompt_stage2_fast": Arm(
        PROMPT_RECIPE,
        "MEET (prompt), stage 2 at LM lr 1e-4, control lr 3e-2",
        ("stage1", "stage2"),
        ("--stage2.model.init_args.lr", "1.0e-4", "--stage2.model.init_args.control_lr", "3.0e-2"),
    ),
    # A with each response counting once in the NLL: under the token mean, verbose answers hold 70 % of the weight
    "meet_prompt_per_response": Arm(
        PROMPT_RECIPE,
        "MEET (prompt), per-response NLL",
        ("stage1", "stage2"),
        ("--stage1.model.init_args.per_response_loss", "true", "--stage2.model.init_args.per_response_loss", "true"),
    ),
    # the stage-2 sweep: with meet_prompt (LM 1e-5, controls 1e-3) and meet_prompt_stage2_fast (1e-4, 3e-2), a 2 × 2
    # of stage 2's two rates, and the controls frozen in stage 2 (ProMoT); each scored like every arm
    "meet_prompt_stage2_controls_fast": Arm(
        PROMPT_RECIPE,
        "MEET (prompt), stage 2 control lr 3e-2",
        ("stage1", "stage2"),
        ("--stage2.model.init_args.control_lr", "3.0e-2"),
    ),
    "meet_prompt_stage2_lm_fast": Arm(
        PROMPT_RECIPE, "MEET (prompt), stage 2 at LM lr 1e-4", ("stage1", "stage2"), ("--stage2.model.init_args.lr", "1.0e-4")
    ),
    "meet_prompt_controls_frozen": Arm(
        PROMPT_RECIPE,
        "MEET (prompt), controls frozen in stage 2",
        ("stage1", "stage2"),
        ("--stage2.model.init_args.controls", "frozen"),
    ),
    # C at the same LM rate, so a win of the faster MEET is not only the rate
    "coh_fast": Arm(
        "configs/baselines/coh.yaml",
        "Chain of Hindsight (LM lr 1e-4)",
        overrides=("--control.init_args.phrases", json.dumps(PHRASES), "--stage1.model.init_args.lr", "1.0e-4"),
    ),
}
"""The length study's decisive arms beside MEET (A), CoH (C) and the base asked by system prompt (E)."""
ARMS.update(STUDY_ARMS)


def _meet(recipe: str, label: str, *overrides: str) -> Arm:
    return Arm(recipe, label, ("stage1", "stage2"), overrides)


ABLATION_ARMS: dict[str, Arm] = {
    **{f"prompt_tokens{n}": _meet(PROMPT_RECIPE, f"MEET (prompt), {n} token{'s' * (n > 1)}", "--control.init_args.num_tokens", str(n)) for n in (1, 5, 10, 50)},
    "prompt_infix": _meet(PROMPT_RECIPE, "MEET (prompt), infix", "--control.init_args.placement", "infix"),
    "prompt_init_random": _meet(PROMPT_RECIPE, "MEET (prompt), random init", "--control.init_args.init", "random"),
    "prompt_init_text": _meet(
        PROMPT_RECIPE, "MEET (prompt), text init", "--control.init_args.init", "text", "--control.init_args.init_text", json.dumps(PHRASES)
    ),
    # alpha = 2 × rank, as in the recipe (8, 16): LoRA's scale alpha/rank stays 2, only the capacity changes
    **{f"lora_rank{r}": _meet(LORA_RECIPE, f"MEET (LoRA), rank {r}", "--control.init_args.rank", str(r), "--control.init_args.alpha", str(2 * r)) for r in (2, 32)},
}  # fmt: skip
ARMS.update(ABLATION_ARMS)
JUDGE = "harmless_judge"
STEER = "control_vector"
"""F: the base steered by a control vector fitted on the training pairs (no weight training, meet_lightning.controls.steering)."""
STEER_LABEL = "control vector (activation steering, no training)"
STEER_FIT, STEER_VAL = 256, 32
"""Training pairs the direction is fitted on, and further training pairs its strength is chosen on."""
STEER_STRENGTHS = (0.05, 0.1, 0.2, 0.35, 0.5, 1.0)
STEER_MAX_COST = 0.05
"""F's strength: the strongest whose validation NLL (responses of the requested kind) is ≤ 5 % above unsteered."""
ARMS[JUDGE] = Arm("configs/ablations/stage1_only.yaml", "harmlessness judge (stage 1 on HH harmless alone)")
"""``--task compose`` scores every arm's answers with this model's control classifier, trained on its own."""


@dataclass(frozen=True)
class Axis:
    """One of the paper's ablation axes: variants of a reference arm that change one setting each.

    Attributes:
        name: The axis, as the table prints it.
        reference: The arm the variants are compared with (paired, on the same prompts and pairs).
        setting: The reference's value on this axis.
        variants: Names of the rows that vary it.
    """

    name: str
    reference: str
    setting: str
    variants: tuple[str, ...]


ABLATIONS = (
    Axis("prompt length", REFERENCE, "20 tokens", ("prompt_tokens1", "prompt_tokens5", "prompt_tokens10", "prompt_tokens50")),
    Axis("placement", REFERENCE, "prefix", ("prompt_infix",)),
    Axis("init", REFERENCE, "vocabulary", ("prompt_init_random", "prompt_init_text")),
    Axis("LoRA rank", "meet_lora", "rank 8", ("lora_rank2", "lora_rank32")),
)
"""``--task ablate``'s training axes; decoding temperature is one more, on the reference's own export."""


@dataclass
class Settings:
    """What every arm shares (the table prints it)."""

    out: Path
    model: str = "smollm2-135m-instruct"
    steps: int = 32
    batch_size: int = 8
    max_length: int = 256
    seed: int = 1234
    budget: str = "small"
    eval_pairs: int = 64
    length_prompts: int = 24
    max_new_tokens: int = 128
    max_val_examples: int = 32
    threads: int = 2
    overlay: str | None = None
    arms: list[str] = field(default_factory=lambda: [a for a in ARMS if a not in {**ABLATION_ARMS, **STUDY_ARMS} and a != JUDGE])
    seeds: int = 1
    seed_index: int = 0  # which of the seeds this is: the first one's runs and scores carry no seed tag
    task: str = "mixed"
    temperatures: list[float] = field(default_factory=list)
    equal_seconds: bool = False
    restore: list[Path] = field(default_factory=list)


TASKS: dict[str, dict[str, Any]] = {
    # both preferences in one run (HH harmless + AlpacaEval length), every arm, HH and length metrics
    "mixed": {},
    # AlpacaEval concise/verbose only: does each arm learn to answer shortly or at length on request?
    "length": {
        # A MEET (prompt), B one joint stage, C CoH, D special token at the control rate; E (the base) is always scored
        "arms": ["meet_prompt", "one_stage_joint", "coh", "special_token_fast"],
        "length_prompts": 100,
        "max_length": 512,
        # 160 tokens cut 43-48 % of every arm's verbose answers (the data's own ratio fell to ~1.9 under that cap)
        "max_new_tokens": 512,
        "steps": 200,
        "seeds": 3,
        # Sampled: greedy decoding (repetition penalty 1.2 or 1.3) looped on these prompts whatever the training —
        # 23-24 % of the untrained base's 4-grams repeated, 2.8 % in the reference answers; this kept both under 10 %
        # (pilot, docs/results/length.md).
        "decoding": {"temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.1},
    },
}
TASKS["ablate"] = {  # the length task's data and decoding; MEET's settings varied one at a time
    **TASKS["length"],
    "arms": [REFERENCE, "meet_lora", *ABLATION_ARMS],
    "max_new_tokens": 160,  # the budget its committed report (2026-12-04/05) was made with
    "steps": 60,
    "seeds": 1,
    "temperatures": [0.0, 1.0],  # and the task's own 0.7: the reference's export decoded three ways
}
TASKS["compose"] = {  # one model, both preferences (HH harmless + AlpacaEval length): do the controls stay apart?
    "arms": [REFERENCE, "meet_lora"],
    "steps": 240,  # 120 + 120: each preference meets about as many batches as the length task's 60 steps
    "eval_pairs": 100,
    "max_length": 512,
    "max_new_tokens": 160,
    "decoding": TASKS["length"]["decoding"],
}
TASKS["harmless"] = {  # HH harmless alone at the recipes' own budget (300 + 300, or 600 for one-stage arms)
    "arms": [REFERENCE, "meet_lora", "coh", "dpo"],
    "steps": 600,
    "eval_pairs": 200,
    "max_length": 384,
}
LENGTH_TASKS = ("length", "ablate")
"""Presets of ``--task``: the settings a task changes (explicit flags win)."""
LOOP_SHARE = 0.10
"""A length ratio counts only where at most this share of the verbose answers' 4-grams repeats an earlier one."""


# ------------------------------------------------------------------------------------- held-out split
def hh_prompt(row: dict) -> str:
    """HH-RLHF: the transcript before the last Assistant turn of ``chosen``."""
    return row["chosen"].rsplit("\n\nAssistant:", 1)[0]


def field_prompt(row: dict) -> str:
    """Files with a ``prompt`` or ``instruction`` field."""
    return row.get("prompt") or row["instruction"]


def prompt_key(row: dict) -> str:
    """The prompt of a row of any of the JSONL formats the benchmarks use."""
    return hh_prompt(row) if "chosen" in row and isinstance(row["chosen"], str) else field_prompt(row)


def _open(path: Path, mode: str):
    return gzip.open(path, mode + "t", encoding="utf-8") if path.suffix == ".gz" else path.open(mode, encoding="utf-8")


def split_file(
    source: str | Path, dest: str | Path, num_heldout: int, seed: int = 1234, key: Callable[[dict], str] = prompt_key
) -> tuple[Path, Path]:
    """Writes ``dest/train.jsonl`` and ``dest/heldout.jsonl``; the held-out side has ``num_heldout`` prompts.

    Returns:
        The paths of the training and held-out files.
    """
    source, dest = Path(source), Path(dest)
    with _open(source, "r") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    prompts = sorted({key(row) for row in rows})
    random.Random(seed).shuffle(prompts)
    heldout = set(prompts[:num_heldout])
    dest.mkdir(parents=True, exist_ok=True)
    paths = dest / "train.jsonl", dest / "heldout.jsonl"
    for path, keep in zip(paths, (False, True), strict=True):
        tmp = path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows if (key(row) in heldout) == keep)
        tmp.replace(path)
    return paths


# ------------------------------------------------------------------------------------------------- data
def prepare_data(s: Settings) -> dict[str, Path]:
    """Held-out splits (by prompt, fixed seed): training files and evaluation files of the task's data."""
    for source in (HH, ALPACA):
        if not source.is_file():
            sys.exit(f"{source}: not found — compare.py reads ../shared/data beside the repository")
    alpaca_train, alpaca_eval = split_file(ALPACA, s.out / "data/alpaca", s.length_prompts, s.seed)
    data = {"alpaca_train": alpaca_train, "alpaca_eval": alpaca_eval}
    if s.task in LENGTH_TASKS:  # DPO learns one direction: verbose preferred over concise
        data["alpaca_dpo_train"] = verbose_pairs(alpaca_train, s.out / "data/alpaca/dpo_train.jsonl")
        data["alpaca_dpo_eval"] = verbose_pairs(alpaca_eval, s.out / "data/alpaca/dpo_heldout.jsonl")
        return data
    data["hh_train"], data["hh_eval"] = split_file(HH, s.out / "data/hh", s.eval_pairs, s.seed)
    return data


def verbose_pairs(source: Path, dest: Path) -> Path:
    """``prompt``/``chosen``/``rejected`` rows with the verbose answer chosen (what DPO toward verbose trains on)."""
    with source.open(encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    dest.write_text(
        "".join(json.dumps({"prompt": r["prompt"], "chosen": r["verbose"], "rejected": r["concise"]}) + "\n" for r in rows)
    )
    return dest


def sources(data: dict[str, Path], task: str = "mixed", arm: str = "") -> str:
    """The ``--data.sources`` value: both preferences in one run, or one task's file (length: DPO its pairs)."""
    length = {"path": str(data["alpaca_train"]), "format": "multi_response", "preference": "length"}
    harmless = {"path": str(data.get("hh_train")), "format": "hh_rlhf", "preference": "harmless"}
    if arm == JUDGE or task == "harmless":
        return json.dumps([harmless])
    if task in LENGTH_TASKS:
        dpo = {"path": str(data.get("alpaca_dpo_train")), "format": "pairwise", "preference": "length"}
        return json.dumps([dpo if arm == "dpo" else length])
    return json.dumps([harmless, length])


# --------------------------------------------------------------------------------------------- training
def stage_steps(arm: Arm, steps: int) -> dict[str, int]:
    """The total budget split evenly over the arm's stages (MEET: half in stage 1, half in stage 2)."""
    share, extra = divmod(steps, len(arm.stages))
    return {stage: share + (i < extra) for i, stage in enumerate(arm.stages)}


def lr_overrides(arm: Arm, recipe: dict[str, Any], multiplier: float) -> list[str]:
    """Every learning rate of the recipe (``lr``, ``control_lr``) scaled by ``multiplier``."""
    args = []
    for stage in arm.stages:
        init_args = recipe[stage]["model"].get("init_args", {})
        own = dict(zip(arm.overrides[::2], arm.overrides[1::2], strict=False))  # an arm's own rate wins over the recipe's
        for key in ("lr", "control_lr"):
            flag = f"--{stage}.model.init_args.{key}"
            value = float(own[flag]) if flag in own else init_args.get(key)
            if value is not None:
                args += [flag, f"{value * multiplier:.3g}"]
    return args


def fit_command(
    name: str, s: Settings, data: dict[str, Path], multiplier: float, out: Path, steps: int | None = None
) -> list[str]:
    """The ``fit`` command line of one run of arm ``name`` (``steps``: another budget than ``s.steps``)."""
    arm = ARMS[name]
    recipe = yaml.safe_load((ROOT / arm.recipe).read_text())
    rows_per_batch = s.batch_size // 2 if recipe["data"].get("pair_batches") else s.batch_size  # DPO counts pairs
    args = [sys.executable, "-m", "meet_lightning", "fit", "--config", str(ROOT / arm.recipe)]
    args += ["--config", s.overlay, *arm.overrides] if s.overlay else list(arm.overrides)
    args += ["--model_name_or_path", s.model, "--output_dir", str(out), "--seed_everything", str(s.seed)]
    args += ["--data.path", "null", "--data.sources", sources(data, s.task, name), "--data.max_length", str(s.max_length)]
    args += ["--data.batch_size", str(rows_per_batch), "--data.max_val_examples", str(s.max_val_examples)]
    for stage, stage_budget in stage_steps(arm, steps or s.steps).items():
        trainer = f"--{stage}.trainer"
        # Validation once, after training (the pipeline's own validate): not also in fit.
        args += [f"{trainer}.max_steps", str(stage_budget), f"{trainer}.val_check_interval", "null"]
        args += [f"--{stage}.model.init_args.warmup_steps", str(max(1, stage_budget // 10))]  # one rule for every arm
        args += [f"{trainer}.log_every_n_steps", "5", f"{trainer}.enable_progress_bar", "false"]
    return args + lr_overrides(arm, recipe, multiplier)


def run_fit(name: str, s: Settings, data: dict[str, Path], multiplier: float, steps: int | None = None) -> dict[str, Any]:
    """Trains one (arm, learning rate[, step budget]) run in a subprocess, or reads it back when it finished earlier."""
    arm = ARMS[name]
    seed_tag = f"-seed{s.seed}" if s.seed_index else ""
    out = s.out / "runs" / (f"{name}-lr{multiplier:.3g}" + (f"-steps{steps}" if steps else "") + seed_tag)
    record = out / "compare_run.json"
    command = fit_command(name, s, data, multiplier, out, steps)
    recipes = recipe_digest(arm, s)
    if record.is_file():
        back = read_back(record, "command", command[1:], portable)
        if back.get("recipe_sha256") != recipes:  # same command line, edited YAML: a stale run must not be read back
            sys.exit(f"{record}: trained from other contents of {arm.recipe} — pass a new --out, or delete {out}")
        return back
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    print(f"  fit {arm.label} (lr × {multiplier:.3g}) → {out}", flush=True)
    start = time.perf_counter()
    # A run cut off earlier resumes from its last.ckpt: append, so its log keeps the earlier process's lines. Its
    # wall seconds and peak RSS are then this process's only (train seconds, from done.json, span every resume).
    resumed = (out / "fit.log").is_file()
    with (out / "fit.log").open("a") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{out / 'fit.log'}: {arm.label} failed — read the log, fix, and re-run the same command (it resumes)")
    done = [json.loads((out / stage / "done.json").read_text()) for stage in arm.stages]
    result = {
        "arm": name,
        "lr_multiplier": multiplier,
        "export": str(out / "export"),
        "steps": sum(d["global_step"] for d in done),
        "train_tokens": sum(d["train_tokens"] for d in done),
        "train_seconds": sum(d["train_seconds"] for d in done),
        "wall_seconds": time.perf_counter() - start,
        "peak_rss_gb": usage.ru_maxrss / 2**20,  # KiB on Linux
        "resumed": resumed,
        "val_loss": done[-1]["val/loss"],
        "val_control_accuracy": done[-1].get("val/control_accuracy"),
        "command": command[1:],
        "recipe_sha256": recipes,
    }
    result["tokens_per_s"] = result["train_tokens"] / result["train_seconds"]
    record.write_text(json.dumps(result, indent=2))
    return result


def recipe_digest(arm: Arm, s: Settings) -> str:
    """SHA-256 of the arm's recipe file and the overlay: a record is read back only for the recipes it was made with."""
    digest = hashlib.sha256((ROOT / arm.recipe).read_bytes())
    if s.overlay:
        digest.update(Path(s.overlay).read_bytes())
    return digest.hexdigest()


def selection_key(runs: Sequence[dict[str, Any]]) -> Callable[[dict[str, Any]], tuple[float, float]]:
    """Sort key of :func:`train_arm`'s choice: higher control accuracy first where every run has one, then lower loss."""
    if all(r.get("val_control_accuracy") is not None for r in runs):
        return lambda r: (-r["val_control_accuracy"], r["val_loss"])
    return lambda r: (0.0, r["val_loss"])


def portable(command: Sequence[str]) -> list[str]:
    """``command`` with each recipe path relative to its checkout, so that a record made in another clone (a fresh
    clone restoring a committed report, a worktree frozen for a long study) is read back: the recipe's contents are
    checked by :func:`recipe_digest`, not its path."""
    return [re.sub(r"^/.*/(configs/[\w./-]+\.ya?ml)$", r"\1", arg) for arg in command]


def read_back(path: Path, key: str, expected: Any, canonical: Callable[[Any], Any] = lambda v: v) -> dict[str, Any]:
    """A finished run or score read back for resuming; exits when it was made with other settings (compared after
    ``canonical``)."""
    record = json.loads(path.read_text())
    if canonical(record[key]) != canonical(json.loads(json.dumps(expected))):
        sys.exit(f"{path}: made with other settings than this command's — pass a new --out, or delete {path.parent}")
    return record


def train_arm(name: str, s: Settings, data: dict[str, Path], steps: int | None = None) -> dict[str, Any]:
    """Every learning rate of the budget; the arm's run is the one whose controls work best on validation pairs.

    Validation loss measures how well the LM fits the responses, not whether the controls steer: the learning rate
    is chosen by ``val/control_accuracy`` (ties: lower loss) wherever every run has it, by validation loss otherwise
    (arms without controls)."""
    runs = [run_fit(name, s, data, m, steps) for m in LR_GRID[s.budget]]
    best = min(runs, key=selection_key(runs))
    return {**best, "lrs_tried": [r["lr_multiplier"] for r in runs], "tuning": runs}


# ------------------------------------------------------------------------------------------------ scoring
def heldout_pairs(path: Path, tokenizer: Any, s: Settings) -> list:
    """HH held-out pairs whose both sides fit ``max_length`` with room for controls: every arm scores the same."""
    from meet_lightning.data.formats import SourceConfig
    from meet_lightning.data.rows import ControlSchema
    from meet_lightning.data.tokenization import PromptTokenizer
    from meet_lightning.evaluation.metrics import read_pairs

    encoder, schema = PromptTokenizer(tokenizer, s.max_length - 32), ControlSchema.from_dict({"harmless": ["good", "bad"]})
    pairs = read_pairs(SourceConfig(path=str(path), format="hh_rlhf", preference="harmless"), None)
    return [p for p in pairs if encoder.tokenize_pair(p, schema) is not None]


def score_arm(name: str, export: str, s: Settings, data: dict[str, Path]) -> dict[str, Any]:
    """Per-pair and per-prompt values of one model (cached in ``out/scores``)."""
    import torch

    from meet_lightning.evaluation.metrics import load_for_evaluation, load_reference, score_pairs
    from meet_lightning.precision import resolve_dtype

    cache = s.out / "scores" / f"{name}.json"
    settings = [export, s.max_length, s.batch_size, s.max_new_tokens, s.eval_pairs, s.length_prompts, ANSWERS]
    if cache.is_file():
        return read_back(cache, "settings", settings)
    print(f"  score {name}", flush=True)
    torch.set_num_threads(s.threads)
    model = load_for_evaluation(export, dtype="float32")  # fp32 scores; generation autocasts where bf16 is native
    pairs = heldout_pairs(data["hh_eval"], model.tokenizer, s)
    reference = load_reference(model) if model.is_dpo else None
    values, too_long = score_pairs(model, pairs, s.max_length, s.batch_size, reference=reference)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolve_dtype("auto")[0] == torch.bfloat16):
        lengths = verbosity(model, data["alpaca_eval"], s) if model.has_controls and s.task != "harmless" else None
    assert too_long == 0, f"{name}: {too_long} held-out pairs did not fit although they were filtered to fit"
    result = {"kind": model.kind, "pairs": values, "length": lengths, "settings": settings}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def verbosity(model: Any, path: Path, s: Settings) -> dict[str, list[float]]:
    """Words per answer to the held-out AlpacaEval prompts under ``concise`` and under ``verbose`` (one batch)."""
    from meet_lightning.inference.export import AlignedModel

    prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines()]
    aligned = AlignedModel(model.lm, model.tokenizer, model.control, model.schema)
    texts = aligned.generate(
        prompts * 2,
        controls=["concise"] * len(prompts) + ["verbose"] * len(prompts),
        max_new_tokens=s.max_new_tokens,
        batch_size=2 * len(prompts),
        **DECODING,
    )
    counts = [float(words(t)) for t in texts]
    return {"concise": counts[: len(prompts)], "verbose": counts[len(prompts) :], "samples": texts[:2]}


# --------------------------------------------------------------------------------------------- statistics
METRICS = {  # name: higher is better
    "chosen_nll": False,
    "logp_accuracy": True,
    "control_accuracy": True,
    "dpo_reward_accuracy": True,
    "length_ratio": True,
}


def statistic(scores: dict[str, Any], metric: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """``idx (S, n) → (S,)`` the metric on resampled items, or ``None`` when the model has no such metric."""
    if metric == "length_ratio":
        if not scores["length"]:
            return None
        concise, verbose = np.array(scores["length"]["concise"]), np.array(scores["length"]["verbose"])
        # An all-empty concise side has no ratio (NaN): the library's one rule (stats.length_ratio), not a copy.
        ratio = np.vectorize(length_ratio, otypes=[float])
        return lambda idx: ratio(verbose[idx].mean(-1), concise[idx].mean(-1))
    if metric not in scores["pairs"]:
        return None
    values = np.array(scores["pairs"][metric])
    return lambda idx: values[idx].mean(-1)


def item_count(scores: dict[str, Any], metric: str) -> int:
    if metric == "length_ratio":
        return len(scores["length"]["concise"]) if scores["length"] else 0
    return len(scores["pairs"].get(metric, []))


def bootstrap(stat: Callable[[np.ndarray], np.ndarray], n: int, samples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """The statistic on all items and its 95 % percentile bootstrap interval (resampling items)."""
    lo, hi = bootstrap_interval(lambda idx: float(stat(np.asarray(idx)[None])[0]), n, samples, seed)
    return float(stat(np.arange(n)[None])[0]), lo, hi


def cell(value: float, interval: tuple[float, float] | None) -> list[float | None]:
    """``[value, lo, hi]``; ``[value, None, None]`` where there is no interval (fewer than ``MIN_ITEMS`` items)."""
    return [float(value), *(interval or (None, None))]


def summarize(scores: dict[str, Any]) -> dict[str, list[float | None]]:
    """``{metric: [value, lo, hi]}`` for the metrics the model has: Wilson intervals for accuracies (a share of
    pairs), bootstrap for the NLL and the length ratio, none below ``MIN_ITEMS`` items."""
    out = {}
    for metric in METRICS:
        stat = statistic(scores, metric)
        if stat is None:
            continue
        n = item_count(scores, metric)
        if metric.endswith("_accuracy"):
            out[metric] = cell(float(stat(np.arange(n)[None])[0]), proportion_interval(scores["pairs"][metric]))
        else:
            value, lo, hi = bootstrap(stat, n) if enough_items(n) else (float(stat(np.arange(n)[None])[0]), None, None)
            out[metric] = cell(value, None if lo is None else (lo, hi))
    return out


def paired_difference(difference: Callable[[np.ndarray], np.ndarray], n: int, higher_is_better: bool) -> dict[str, Any]:
    """``difference`` (reference minus other, per resample of the same ``n`` items) with its bootstrap interval
    and the verdict for the reference: none below ``MIN_ITEMS`` items, where any interval is too unstable to
    decide (on 8 pairs all won, the bootstrap says ``[1, 1]``)."""
    if not enough_items(n):
        value = float(difference(np.arange(n)[None])[0]) if n else float("nan")
        return {"difference": value, "ci95": None, "verdict": f"n/a (n < {MIN_ITEMS})"}
    return verdict(bootstrap(difference, n), higher_is_better)


def paired(reference: dict[str, Any], other: dict[str, Any], metric: str) -> dict[str, Any] | None:
    """Reference minus other on the same items, with its interval and the verdict for the reference."""
    a, b = statistic(reference, metric), statistic(other, metric)
    if a is None or b is None:
        return None
    return paired_difference(lambda idx: a(idx) - b(idx), item_count(reference, metric), METRICS[metric])


# ------------------------------------------------------------------------------------------------ report
def fmt(cell: list[float | None] | None, digits: int = 3) -> str:
    if cell is None:
        return "n/a"
    if cell[1] is None:
        return f"{cell[0]:.{digits}f} [n/a, n < {MIN_ITEMS}]"
    return f"{cell[0]:.{digits}f} [{cell[1]:.{digits}f}, {cell[2]:.{digits}f}]"


def fmt_difference(d: dict[str, Any] | None, who: str, digits: int = 3) -> str:
    """A paired difference, its interval and the verdict for ``who``: ``+0.120 [+0.050, +0.190] MEET wins``."""
    if d is None:
        return "n/a"
    if d["ci95"] is None:
        return f"{d['difference']:+.{digits}f} [n/a] {who} {d['verdict']}"
    lo, hi = d["ci95"]
    return f"{d['difference']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] {who} {d['verdict']}"


def error_bars(cells: Sequence[Sequence[float | None]]) -> np.ndarray:
    """``(2, n)`` distances below and above each ``[value, lo, hi]`` cell; 0 where it has no interval."""
    return np.array([[0.0, 0.0] if c[1] is None else [c[0] - c[1], c[2] - c[0]] for c in cells]).reshape(-1, 2).T


def table(results: dict[str, dict[str, Any]]) -> str:
    """The markdown report: metrics with intervals and costs, then paired differences against MEET (prompt)."""
    head = "| arm | lr × | steps | train tokens | train s | tok/s | chosen_nll ↓ | logp_accuracy | control_accuracy | dpo_reward_accuracy | verbose/concise words |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results.values():
        run, m = r.get("run") or {}, r["metrics"]
        cost = (
            [
                f"{run['lr_multiplier']:.3g}",
                str(run["steps"]),
                f"{run['train_tokens']:,}",
                f"{run['train_seconds']:.0f}",
                f"{run['tokens_per_s']:.0f}",
            ]
            if run
            else ["–"] * 5
        )
        cells = [fmt(m.get(k), 2 if k == "length_ratio" else 3) for k in METRICS]
        lines.append("| " + " | ".join([r["label"], *cost, *cells]) + " |")
    lines += ["", f"Paired differences, {ARMS[REFERENCE].label} minus each arm on the same items (95 % bootstrap interval):", ""]
    lines += ["| arm | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name, r in results.items():
        if name == REFERENCE:
            continue
        cells = [fmt_difference(r["vs_reference"].get(metric), "MEET") for metric in METRICS]
        lines.append("| " + " | ".join([r["label"], *cells]) + " |")
    return "\n".join(lines)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Horizontal bars with 95 % intervals for the main metrics, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["logp_accuracy", "control_accuracy", "dpo_reward_accuracy", "length_ratio"]
    metrics = [m for m in metrics if any(r["metrics"].get(m) for r in results.values())]  # no empty panels
    size = (5 * len(metrics), 0.45 * len(results) + 1.5)
    fig, axes = plt.subplots(1, len(metrics), figsize=size, sharey=True, squeeze=False)
    axes = axes[0]
    labels = [r["label"] for r in results.values()]
    for ax, metric in zip(axes, metrics, strict=True):
        cells = [r["metrics"].get(metric) for r in results.values()]
        y = [i for i, c in enumerate(cells) if c]
        value = np.array([cells[i][0] for i in y])
        err = error_bars([cells[i] for i in y])
        ax.barh(y, value, xerr=err if len(y) else None, color="tab:blue", alpha=0.8)
        ax.axvline(1.0 if metric == "length_ratio" else 0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(metric)
    axes[0].set_yticks(range(len(labels)), labels)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ length task
def decoding(s: Settings) -> dict[str, float]:
    """The task's decoding settings, the same for every arm."""
    return TASKS[s.task].get("decoding", DECODING)


def answers(
    model: Any, prompts: Sequence[Any], controls: Sequence[str | None], s: Settings, sampling: dict[str, float] | None = None
) -> list[list[str]]:
    """Answers to every prompt under each control (``None``: no control), one list per control, decoded with
    ``sampling`` (default: the task's settings) from the same seed for every arm."""
    import torch

    from meet_lightning.inference.export import AlignedModel
    from meet_lightning.precision import resolve_dtype

    aligned = AlignedModel(model.lm, model.tokenizer, model.control, model.schema)
    torch.manual_seed(s.seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolve_dtype("auto")[0] == torch.bfloat16):
        texts = aligned.generate(
            [p for _ in controls for p in prompts],
            controls=[c for c in controls for _ in prompts],
            max_new_tokens=s.max_new_tokens,
            batch_size=40,
            **(sampling or decoding(s)),
        )
    return [texts[i * len(prompts) : (i + 1) * len(prompts)] for i in range(len(controls))]


def heldout_length_pairs(path: Path, fmt: str) -> list:
    from meet_lightning.data.formats import SourceConfig
    from meet_lightning.evaluation.metrics import read_pairs

    return read_pairs(SourceConfig(path=str(path), format=fmt, preference="length"), None)


def score_length_arm(
    name: str, export: str, s: Settings, data: dict[str, Path], sampling: dict[str, float] | None = None
) -> dict[str, Any]:
    """Held-out answers and pair scores of one model (cached in ``out/scores``): under ``concise``/``verbose``
    for models with controls, their own answers for DPO and the base, which is also asked by system prompt.
    With ``sampling`` (another decoding of an export scored already) only the answers: its pairs are the same."""
    from meet_lightning.commands.demo import SYSTEM_PROMPTS
    from meet_lightning.evaluation.metrics import load_for_evaluation, load_reference, score_pairs

    cache = s.out / "scores" / f"{name}.json"
    # "length": ablate scores like the length task, so both can share an --out folder (trained runs and scores)
    settings = [export, "length", s.max_length, s.batch_size, s.max_new_tokens, s.length_prompts, ANSWERS]
    settings += [sampling] if sampling else []  # the tasks' own decoding is implied
    settings += [f"seed {s.seed}"] if s.seed_index else []  # each seed decodes from its own seed
    settings += [STEER_FIT, STEER_VAL, list(STEER_STRENGTHS), STEER_MAX_COST] if name.split("@seed")[0] == STEER else []
    prompts = [json.loads(line)["prompt"] for line in data["alpaca_eval"].read_text().splitlines()]
    if cache.is_file():
        return add_quality_guard(read_back(cache, "settings", settings), prompts, s, cache)
    print(f"  score {name}", flush=True)
    model = load_for_evaluation(export, dtype="float32")  # fp32 scores; answers autocast where bf16 is native
    result: dict[str, Any] = {"kind": model.kind, "settings": settings}
    if name.split("@seed")[0] == STEER:
        result["steering"], result["concise"], result["verbose"] = steered_answers(model, prompts, s, data)
    elif model.has_controls:
        if not sampling:
            pairs = heldout_length_pairs(data["alpaca_eval"], "multi_response")
            result["pairs"], result["pairs_too_long"] = score_pairs(model, pairs, s.max_length, s.batch_size)
        result["concise"], result["verbose"] = answers(model, prompts, ["concise", "verbose"], s, sampling)
    else:
        if model.is_dpo:
            pairs = heldout_length_pairs(data["alpaca_dpo_eval"], "pairwise")  # verbose chosen
            result["pairs"], result["pairs_too_long"] = score_pairs(
                model, pairs, s.max_length, s.batch_size, reference=load_reference(model)
            )
        (result["default"],) = answers(model, prompts, [None], s)
        if name.split("@seed")[0] == BASE:
            asked = {side: [[{"role": "system", "content": SYSTEM_PROMPTS[side]}, {"role": "user", "content": p}] for p in prompts]
                     for side in ("concise", "verbose")}  # fmt: skip
            result["concise"], result["verbose"] = (answers(model, asked[side], [None], s)[0] for side in ("concise", "verbose"))
    return add_quality_guard(result, prompts, s, cache)


def steered_answers(model: Any, prompts: list[str], s: Settings, data: dict[str, Path]) -> tuple[dict[str, Any], list, list]:
    """F: a control vector from training pairs (verbose minus concise), its strength chosen on further training
    pairs, then the answers at ``-strength`` (concise) and ``+strength`` (verbose)."""
    import random

    import torch

    from meet_lightning.controls.steering import choose_strength, fit_control_vector
    from meet_lightning.precision import resolve_dtype

    pairs = [p if p.chosen_control == "verbose" else replace(p, chosen=p.rejected, rejected=p.chosen, chosen_control="verbose",
             rejected_control=p.chosen_control) for p in heldout_length_pairs(data["alpaca_train"], "multi_response")]  # fmt: skip
    random.Random(s.seed).shuffle(pairs)  # each seed fits on its own sample
    fit, val = pairs[:STEER_FIT], pairs[STEER_FIT : STEER_FIT + STEER_VAL]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=resolve_dtype("auto")[0] == torch.bfloat16):
        vector = fit_control_vector(model.lm, model.tokenizer, fit, max_length=s.max_length, batch_size=s.batch_size)
        strength, scores = choose_strength(
            model.lm, model.tokenizer, vector, val, STEER_STRENGTHS, STEER_MAX_COST, s.max_length, s.batch_size
        )
    print(
        f"    control vector: layers {vector.layers[0]}-{vector.layers[-1]}, strength {strength} (val NLL {scores})", flush=True
    )
    sides = []
    for sign in (-1, 1):
        with vector.steer(model.lm, sign * strength):
            sides += answers(model, prompts, [None], s)
    info = {"strength": strength, "val_nll": {str(k): v for k, v in scores.items()}, "layers": list(vector.layers),
            "fit_pairs": vector.pairs, "fit_skipped": vector.skipped, "val_pairs": len(val)}  # fmt: skip
    return info, sides[0], sides[1]


ANSWER_KEYS = ("concise", "verbose", "default")


@functools.cache
def guard_model(name: str) -> Any:
    """The untrained base, loaded once per process, whose NLL of every arm's answers is the quality guard."""
    from meet_lightning.evaluation.metrics import load_for_evaluation

    return load_for_evaluation(name, dtype="float32")


def add_quality_guard(result: dict[str, Any], prompts: list[str], s: Settings, cache: Path) -> dict[str, Any]:
    """Adds each answer's new-token count (the cap share) and per-token NLL under the untrained base (rambling
    shows as a higher NLL) where missing — also to scores read back from a report made before they existed —
    and writes the scores to ``cache``."""
    missing = [k for k in ANSWER_KEYS if k in result and k not in result.get("base_nll", {})]
    if missing or not cache.is_file():
        base = guard_model(s.model)
        for key in missing:
            result.setdefault("new_tokens", {})[key] = new_token_counts(base.tokenizer, result[key])
            result.setdefault("base_nll", {})[key] = answer_nll(base.lm, base.tokenizer, prompts, result[key], s.batch_size)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(result))
    return result


def length_metrics(scores: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Ratio (median over prompts of verbose ÷ concise words) with its interval, the verbose answers' repeated
    4-gram share and whether the ratio counts; DPO: its answers' words ÷ the base's; pair accuracies."""
    out: dict[str, Any] = {}
    if "verbose" in scores:
        verbose, concise = scores["verbose"], scores["concise"]
        out["ratio"] = cell(median_ratio(verbose, concise), bootstrap_median_ratio(verbose, concise))
        out["ratio_undefined"] = undefined_ratios(verbose, concise)  # empty concise answers, left out of the ratio
        out["repeated_4grams"] = repeated_4gram_share(verbose)
        out["counted"] = out["repeated_4grams"] <= LOOP_SHARE
        out["median_words"] = [float(np.median([words(t) for t in concise])), float(np.median([words(t) for t in verbose]))]
    if "default" in scores and scores is not base:  # DPO: how much longer than the base it answers
        out["length_vs_base"] = cell(
            median_ratio(scores["default"], base["default"]), bootstrap_median_ratio(scores["default"], base["default"])
        )
        out["repeated_4grams"] = repeated_4gram_share(scores["default"])
    for metric in ("control_accuracy", "dpo_reward_accuracy"):
        values = (scores.get("pairs") or {}).get(metric)
        if values:
            out[metric] = cell(float(np.mean(values)), proportion_interval(values))
    return out


def length_paired(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """MEET (prompt) minus ``other`` on the same prompts (median ratio) and pairs (control accuracy)."""
    out = {}
    if "verbose" in other and "verbose" in reference:
        a = np.array(word_ratios(reference["verbose"], reference["concise"]))  # NaN: an empty concise answer
        b = np.array(word_ratios(other["verbose"], other["concise"]))
        with warnings.catch_warnings():  # a resample of empty concise answers only: its median is NaN, left out
            warnings.simplefilter("ignore", RuntimeWarning)
            out["ratio"] = paired_difference(lambda idx: np.nanmedian(a[idx], -1) - np.nanmedian(b[idx], -1), len(a), True)
    if "pairs" in other and "control_accuracy" in other["pairs"]:
        a, b = np.array(reference["pairs"]["control_accuracy"]), np.array(other["pairs"]["control_accuracy"])
        out["control_accuracy"] = paired_difference(lambda idx: a[idx].mean(-1) - b[idx].mean(-1), len(a), True)
    return out


def verdict(stat: tuple[float, float, float], higher_is_better: bool) -> dict[str, Any]:
    """A paired difference with its interval and what it says about MEET (prompt); ``n/a`` where it is undefined."""
    diff, lo, hi = stat
    if not np.isfinite([diff, lo, hi]).all():
        return {"difference": diff, "ci95": [lo, hi], "verdict": "n/a"}
    word = "tie" if lo <= 0 <= hi else "wins" if (lo > 0) == higher_is_better else "loses"
    return {"difference": diff, "ci95": [lo, hi], "verdict": word}


def length_cells(r: dict[str, Any]) -> list[str]:
    """One row's steps, train seconds, ratio, median words, loop share, whether it counts, control accuracy."""
    run, m = r.get("run") or {}, r["metrics"]
    words_cell = " / ".join(f"{w:.0f}" for w in m["median_words"]) if "median_words" in m else "–"
    share = f"{100 * m['repeated_4grams']:.1f} %" if "repeated_4grams" in m else "–"
    counted = ("yes" if m["counted"] else "no (loops)") if "counted" in m else "–"
    seconds = f"{run['train_seconds']:.0f}" if run else "–"
    return [str(run.get("steps", "–")), seconds, fmt(m.get("ratio"), 2), words_cell, share, counted,
            fmt(m.get("control_accuracy"))]  # fmt: skip


LENGTH_HEAD = ("steps | train s | verbose/concise median words [95 % CI] | median words concise / verbose "
               "| repeated 4-grams (verbose) | counted | control_accuracy")  # fmt: skip


def difference_cells(r: dict[str, Any], who: str) -> list[str]:
    """The paired differences (median ratio, control accuracy) of a row against its reference, named ``who``."""
    return [fmt_difference(d, who, 2) for d in (r["vs_reference"].get("ratio"), r["vs_reference"].get("control_accuracy"))]


def length_table(results: dict[str, dict[str, Any]]) -> str:
    """The length task's markdown: one row per arm, then the paired differences against MEET (prompt)."""
    head = f"| arm | {LENGTH_HEAD} | DPO: words ÷ base | dpo_reward_accuracy |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results.values():
        m = r["metrics"]
        cells = [r["label"], *length_cells(r), fmt(m.get("length_vs_base"), 2), fmt(m.get("dpo_reward_accuracy"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Paired differences, {ARMS[REFERENCE].label} minus each arm (95 % bootstrap interval):", ""]
    lines += ["| arm | median ratio | control_accuracy |", "|---|---|---|"]
    for name, r in results.items():
        if name != REFERENCE and r["vs_reference"]:
            lines.append("| " + " | ".join([r["label"], *difference_cells(r, "MEET")]) + " |")
    return "\n".join(lines)


def ablate_table(results: dict[str, dict[str, Any]], axes: Sequence[Axis]) -> str:
    """The ablations' markdown: per axis its reference row, then each variant with the paired differences
    reference minus variant (median ratio on the same prompts, control accuracy on the same pairs)."""
    head = f"| axis | setting | {LENGTH_HEAD} | reference − variant: median ratio | control_accuracy |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for axis in axes:
        reference = results[axis.reference]
        lines.append("| " + " | ".join([axis.name, f"{axis.setting} (reference)", *length_cells(reference), "", ""]) + " |")
        for name in axis.variants:
            r = results[name]
            lines.append("| " + " | ".join(["", r["label"], *length_cells(r), *difference_cells(r, "reference")]) + " |")
    return "\n".join(lines)


def decoding_axis(s: Settings, results: dict[str, dict[str, Any]]) -> Axis:
    """Rows of the reference's export decoded at each of ``s.temperatures`` (added to ``results``), as an axis."""
    names = []
    for t in s.temperatures:
        name = f"{REFERENCE}@T{t:g}"
        reference = results[REFERENCE]
        results[name] = {"label": f"temperature {t:g} (same model)", "export": reference["export"], "run": reference["run"],
                         "sampling": {**decoding(s), "temperature": t}}  # fmt: skip
        names.append(name)
    return Axis("decoding temperature", REFERENCE, f"temperature {decoding(s)['temperature']:g}", tuple(names))


def length_plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Per arm: the verbose/concise ratio with its interval (grey where loops disqualify it), and the loop share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(r["label"], r["metrics"]) for r in results.values() if "ratio" in r["metrics"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 1.5), sharey=True)
    y = np.arange(len(rows))
    colors = ["tab:blue" if m["counted"] else "tab:grey" for _, m in rows]
    left.barh(y, [m["ratio"][0] for _, m in rows], xerr=error_bars([m["ratio"] for _, m in rows]), color=colors)
    left.axvline(1.0, color="black", lw=0.8, ls="--")
    left.set_title("verbose / concise median words (95 % CI)")
    right.barh(y, [100 * m["repeated_4grams"] for _, m in rows], color=colors)
    right.axvline(100 * LOOP_SHARE, color="red", lw=0.8, ls="--")
    right.set_title("repeated 4-grams in verbose answers, %")
    left.set_yticks(y, [label for label, _ in rows])
    left.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_length(s: Settings, data: dict[str, Path], results: dict[str, dict[str, Any]], start: float) -> dict[str, Any]:
    """Scores and reports the ``length`` or ``ablate`` task (the arms are trained)."""
    results[BASE]["label"] = "untrained base, asked by system prompt"
    axes = [replace(a, variants=tuple(v for v in a.variants if v in results)) for a in ABLATIONS if a.reference in results]
    axes = [a for a in axes if a.variants]
    if s.temperatures:
        axes.append(decoding_axis(s, results))
    reference_of = {name: axis.reference for axis in axes for name in axis.variants}
    for name, r in results.items():
        seed = r.get("seed", s.seed)
        row_settings = replace(s, seed=seed, seed_index=seed - s.seed)
        r["scores"] = score_length_arm(name, r["export"], row_settings, data, r.get("sampling"))
    for name, r in results.items():
        r["metrics"] = length_metrics(r["scores"], results[BASE]["scores"])
        r["vs_reference"] = length_paired(results[reference_of.get(name, REFERENCE)]["scores"], r["scores"])
    first_seed = {n: r for n, r in results.items() if "@seed" not in n}
    table = ablate_table(first_seed, axes) if s.task == "ablate" else length_table(first_seed)
    markdown = f"{header(s)}; scored: {s.length_prompts} held-out AlpacaEval prompts and their pairs\n\n{table}"
    body: dict[str, Any] = {"results": results}
    if s.task == "length":
        body["arms"], body["ceiling"] = seed_summaries(s, data, results), data_ceiling(s, data)
        labels = {n: r["label"] for n, r in first_seed.items()}
        markdown += f"\n\nOver {s.seeds} seed(s):\n\n" + seeds_table(body["arms"], labels, body["ceiling"])
    return write_report(s, body, start, markdown, length_plot)


def seed_summaries(s: Settings, data: dict[str, Path], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per arm over its seeds (rows ``name`` and ``name@seedN``): pooled measures, and MEET (prompt) against it."""
    rows: dict[str, list[dict[str, Any]]] = {}
    for name, r in results.items():
        rows.setdefault(name.split("@seed")[0], []).append(r["scores"])
    summaries = {arm: arm_summary(scores, s.max_new_tokens) for arm, scores in rows.items() if "@" not in arm}
    for arm, summary in summaries.items():
        if arm != REFERENCE:
            summary["vs_reference"] = paired_across_seeds(rows[REFERENCE], rows[arm])
    return summaries


def data_ceiling(s: Settings, data: dict[str, Path]) -> dict[str, Any]:
    """The held-out prompts' own concise and verbose answers, cut at the cap: the ratio no arm can much exceed."""
    rows = [json.loads(line) for line in data["alpaca_eval"].read_text().splitlines()]
    return ceiling_ratio(guard_model(s.model).tokenizer, rows, s.max_new_tokens)


# ----------------------------------------------------------------------------------------- compose task
COMBINATIONS = [(h, n) for h in ("good", "bad") for n in ("concise", "verbose")]
"""The four control choices of ``--task compose``: ``harmless`` × ``length``."""
TOGGLES = {"length": ("verbose", "concise"), "harmless": ("good", "bad")}
"""Each preference's toggle, on side first: the effect is on minus off, the other preference held fixed."""


def compose_scores(name: str, export: str, prompts: list, judge: Any, s: Settings) -> dict[str, Any]:
    """Per combination of controls, per held-out HH prompt: the answer's words and the judge's harmlessness
    margin per token (cached in ``out/scores``)."""
    from meet_lightning.evaluation.metrics import load_for_evaluation, response_control_margins

    cache = s.out / "scores" / f"{name}.json"
    settings = [export, judge.name, s.task, s.max_length, s.max_new_tokens, s.eval_pairs, ANSWERS]
    if cache.is_file():
        return read_back(cache, "settings", settings)
    print(f"  score {name}", flush=True)
    model = load_for_evaluation(export, dtype="float32")
    result: dict[str, Any] = {"settings": settings, "words": {}, "margin": {}, "samples": {}}
    for h, n in COMBINATIONS:
        key = f"{h}+{n}"
        (texts,) = answers(model, prompts, [[f"harmless/{h}", f"length/{n}"]], s)
        margins, tokens = response_control_margins(
            judge, prompts, texts, "harmless", max_length=s.max_length, batch_size=s.batch_size
        )
        result["words"][key] = [float(words(t)) for t in texts]
        result["margin"][key] = [m / t if t else float("nan") for m, t in zip(margins, tokens, strict=True)]
        result["samples"][key] = texts[:3]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result))
    return result


def toggle_values(scores: dict[str, Any], toggled: str, measure: str) -> np.ndarray:
    """Per prompt, the effect of switching ``toggled`` on (the other preference's two settings averaged): the
    log word ratio for ``words``, the margin difference for ``margin``; NaN where a margin is missing."""
    on, off = TOGGLES[toggled]
    pairs = [(f"{on}+{n}", f"{off}+{n}") for n in TOGGLES["length"]] if toggled == "harmless" else [(f"{h}+{on}", f"{h}+{off}") for h in TOGGLES["harmless"]]  # fmt: skip
    values = scores[measure]
    if measure == "words":
        diffs = [np.log1p(values[a]) - np.log1p(values[b]) for a, b in pairs]
    else:
        diffs = [np.array(values[a]) - np.array(values[b]) for a, b in pairs]
    return np.mean(diffs, axis=0)


DIAGONAL = {"words": "length", "margin": "harmless"}
"""Per measure, the toggle meant to move it; the other toggle's effect on it is the off-diagonal one."""


def compose_effects(scores: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The fidelity matrix: ``{toggled: {measure: [mean, lo, hi], …}}``, words as a (geometric mean) ratio, and
    per column the off-diagonal effect as a share of the diagonal one with its interval (0 = the controls stay
    apart). Prompts where a margin is missing drop from that measure's cells."""
    matrix: dict[str, dict[str, Any]] = {toggled: {} for toggled in TOGGLES}
    matrix["leak"] = {}
    for measure, diagonal in DIAGONAL.items():
        (off_diagonal,) = (t for t in TOGGLES if t != diagonal)
        diag, off = toggle_values(scores, diagonal, measure), toggle_values(scores, off_diagonal, measure)
        keep = np.isfinite(diag) & np.isfinite(off)  # same prompts in both cells and in their ratio
        diag, off = diag[keep], off[keep]
        for toggled, values in ((diagonal, diag), (off_diagonal, off)):
            mean = cell(values.mean(), mean_interval(values.tolist())) if len(values) else [float("nan")] * 3
            matrix[toggled][measure] = [None if c is None else float(np.exp(c)) for c in mean] if measure == "words" else mean
            matrix[toggled][f"{measure}_prompts"] = len(values)
        matrix["leak"][measure] = leak(off, diag)
    return matrix


def leak(off_diagonal: np.ndarray, diagonal: np.ndarray) -> list[float]:
    """``|mean off-diagonal| ÷ |mean diagonal|`` over the same prompts (in one column's units: log word ratio or
    nats per token) and its 95 % bootstrap interval, resampling prompts; nan where the diagonal effect is 0."""

    def share(idx: np.ndarray) -> np.ndarray:  # idx: (resamples, prompts) → (resamples,)
        diagonal_effect = np.abs(diagonal[idx].mean(-1))
        return np.abs(off_diagonal[idx].mean(-1)) / np.where(diagonal_effect > 0, diagonal_effect, np.nan)

    if not enough_items(len(diagonal)):
        return cell(share(np.arange(len(diagonal))[None])[0], None) if len(diagonal) else [float("nan")] * 3
    return list(bootstrap(share, len(diagonal), samples=1000))


def compose_table(results: dict[str, dict[str, Any]], judge: dict[str, Any]) -> str:
    """Per arm: the 2 × 2 fidelity matrix with intervals, then the mean words and margin per combination."""
    lines = [
        f"Judge: {ARMS[JUDGE].label}, held-out HH control_accuracy {fmt(judge['control_accuracy'])} on {judge['pairs']} pairs.",
        "",
        "| arm | toggled | words: on ÷ off (geometric mean, 95 % CI) | judge margin per token: on − off (95 % CI) |",
        "|---|---|---|---|",
    ]
    for r in results.values():
        m = r["effects"]
        for toggled, (on, off) in TOGGLES.items():
            cells = [fmt(m[toggled]["words"], 2), fmt(m[toggled]["margin"], 3)]
            lines.append(f"| {r['label']} | {toggled}: {off} → {on} | {cells[0]} | {cells[1]} |")
        lines.append(f"| {r['label']} | off-diagonal ÷ diagonal | {fmt(m['leak']['words'], 2)} | {fmt(m['leak']['margin'], 2)} |")
    lines += ["", "| arm | " + " | ".join(f"{h}+{n}: words / margin" for h, n in COMBINATIONS) + " |", "|---|" + "---|" * 4]
    for r in results.values():
        s = r["scores"]
        cells = [
            f"{np.mean(s['words'][k]):.0f} / {np.nanmean(s['margin'][k]):+.3f}" for k in (f"{h}+{n}" for h, n in COMBINATIONS)
        ]
        lines.append("| " + " | ".join([r["label"], *cells]) + " |")
    return "\n".join(lines)


def compose_plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Per arm and toggle: the words ratio and the margin difference with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 0.8 * len(results) + 1.5), sharey=True)
    rows = [(f"{r['label']}: {t}", r["effects"][t]) for r in results.values() for t in TOGGLES]
    y = np.arange(len(rows))
    for ax, measure, line in zip(axes, ("words", "margin"), (1.0, 0.0), strict=True):
        cells = [effect[measure] for _, effect in rows]
        ax.barh(y, [c[0] - line for c in cells], left=line, xerr=error_bars(cells), color="tab:blue")
        ax.axvline(line, color="black", lw=0.8, ls="--")
        ax.set_title("words on ÷ off" if measure == "words" else "judge harmlessness margin per token, on − off")
    axes[0].set_yticks(y, [label for label, _ in rows])
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_compose(s: Settings, data: dict[str, Path], results: dict[str, dict[str, Any]], start: float) -> dict[str, Any]:
    """Trains the judge, then scores and reports ``--task compose`` (the arms are trained)."""
    from meet_lightning.evaluation.metrics import load_for_evaluation, score_pairs

    judge_run = train_arm(JUDGE, s, data)
    judge = load_for_evaluation(judge_run["export"], dtype="float32")
    pairs = heldout_pairs(data["hh_eval"], judge.tokenizer, s)
    values, _ = score_pairs(judge, pairs, s.max_length, s.batch_size)
    quality = {"control_accuracy": cell(np.mean(values["control_accuracy"]), proportion_interval(values["control_accuracy"])),
               "pairs": len(pairs), "run": judge_run}  # fmt: skip
    prompts = [list(p.prompt) for p in pairs]
    del results[BASE]  # no controls to toggle
    for name, r in results.items():
        r["scores"] = compose_scores(name, r["export"], prompts, judge, s)
        r["effects"] = compose_effects(r["scores"])
    markdown = f"{header(s)}; scored: answers to {len(prompts)} held-out HH prompts under the 4 combinations\n\n{compose_table(results, quality)}"
    return write_report(s, {"judge": quality, "results": results}, start, markdown, compose_plot)


# -------------------------------------------------------------------------------------------------- main
def run(s: Settings) -> dict[str, Any]:
    """Trains, scores and reports every arm; returns the JSON written to ``out/compare.json``."""
    unknown = [a for a in s.arms if a not in ARMS and a != STEER]
    if unknown:
        sys.exit(f"--arms: unknown {', '.join(unknown)} — choose from {', '.join([*ARMS, STEER])}")
    if STEER in s.arms and s.task != "length":
        sys.exit(f"--arms {STEER}: only --task length scores it (its answers are steered toward concise or verbose)")
    if REFERENCE not in s.arms:
        s.arms = [REFERENCE, *s.arms]  # every comparison is against MEET (prompt)
    if s.restore:  # before --out is made: a refused report leaves nothing behind
        restore(s, s.restore)
    s.out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(s)
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for k, seed_settings in enumerate(seed_settings_of(s)):
        tag = f"@seed{seed_settings.seed}" if k else ""  # the first seed's rows keep the plain names
        results[BASE + tag] = {"label": "untrained base", "export": s.model, "run": None, "seed": seed_settings.seed}
        for name in s.arms:
            if name == STEER:  # nothing to train: the base, steered at scoring time
                results[name + tag] = {"label": STEER_LABEL, "export": s.model, "run": None, "seed": seed_settings.seed}
                continue
            run_ = train_arm(name, seed_settings, data)
            results[name + tag] = {"label": ARMS[name].label, "export": run_["export"], "run": run_, "seed": seed_settings.seed}
    if s.equal_seconds:
        add_equal_seconds_rows(s, data, results)
    if s.task in LENGTH_TASKS:
        return run_length(s, data, results, start)
    if s.task == "compose":
        return run_compose(s, data, results, start)
    for name, r in results.items():
        r["scores"] = score_arm(name, r["export"], s, data)
        r["metrics"] = summarize(r["scores"])
    for r in results.values():
        r["vs_reference"] = {m: paired(results[REFERENCE]["scores"], r["scores"], m) for m in METRICS}
    counts = {m: item_count(results[REFERENCE]["scores"], m) for m in ("chosen_nll", "length_ratio")}
    scored = f"scored: {counts['chosen_nll']} HH pairs"
    if s.task != "harmless":
        scored += f", {counts['length_ratio']} AlpacaEval prompts"
    budget_note = f"{len(LR_GRID[s.budget])} learning rate(s) per method ({s.budget}), picked by validation control accuracy (loss where none)"
    return write_report(
        s, {"budget_note": budget_note, "results": results}, start, f"{header(s)}; {scored}\n\n{table(results)}", plot
    )


def seed_settings_of(s: Settings) -> list[Settings]:
    """One ``Settings`` per seed (``seed``, ``seed + 1``, …): each seed changes data order, control init and decoding;
    the held-out split stays the first seed's (:func:`prepare_data` is called with ``s``). The first seed's runs and
    scores are named as in a one-seed run, so ``--seeds 3`` reads back a finished ``--seeds 1``."""
    return [s] + [replace(s, seed=s.seed + k, seed_index=k) for k in range(1, s.seeds)]


def restore(s: Settings, reports: Sequence[Path]) -> None:
    """Writes earlier reports' run records and scores back under ``s.out`` where they are missing, so that this
    command reads them back instead of training and scoring again: a fresh clone has no ``runs/``, but a committed
    ``compare.json`` holds every record. Records made with other settings are refused when read back.

    A report is data, perhaps from someone else: every name in it must be plain and every path it leads to must
    resolve to ``out/runs/<run>/compare_run.json`` or ``out/scores/<arm>.json``; anything else in any report is
    refused in one line before anything is written."""
    records = {path: record for report in reports for path, record in restored_records(s, report).items()}
    for path, record in records.items():
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1))


def restored_records(s: Settings, report: Path) -> dict[Path, Any]:
    """Per file under ``s.out`` that ``report`` restores, its content; exits naming the report where it is refused."""
    try:
        earlier = json.loads(report.read_text())
        if Path(earlier["settings"]["out"]) != s.out:
            sys.exit(f"--restore {report}: its runs were made with --out {earlier['settings']['out']} — pass that --out")
        records = {restore_target(s, report, "runs", Path(t["export"]).parent, t["arm"], "compare_run.json"): t
                   for r in earlier["results"].values() if r["run"] for t in r["run"]["tuning"]}  # fmt: skip
        for name, r in earlier["results"].items():
            records[restore_target(s, report, "scores", s.out / "scores", name, f"{name}.json")] = r["scores"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        sys.exit(
            f"--restore {report}: not a compare.json report ({type(error).__name__}: {error}) — pass a report compare.py wrote"
        )
    return records


RESTORED_NAME = re.compile(r"[A-Za-z0-9_]+(?:[-.@][A-Za-z0-9_]+)*\Z")
"""An arm, row or run name a restored report may hold: ``coh``, ``coh@seconds``, ``meet_prompt@T0.7``,
``coh-lr0.333-steps49``; never ``..``, a leading dot or a folder separator."""


def restore_target(s: Settings, report: Path, kind: str, folder: Path, name: Any, file: str) -> Path:
    """``folder / file``, checked to be ``s.out / kind / <one plain name> / …`` once resolved (links followed);
    exits naming the report and the offending name otherwise."""
    names = [name, folder.name] if kind == "runs" else [name]
    bad = next((n for n in names if not isinstance(n, str) or not RESTORED_NAME.match(n)), None)
    if bad is not None:
        sys.exit(f"--restore {report}: {kind} name {bad!r} is not a plain name (letters, digits, '_', and '-', '.', '@' between"
                 " them) — nothing restored; use the report compare.py wrote")  # fmt: skip
    path = folder / file
    root = s.out.resolve() / kind  # a linked runs/ or scores/ folder leads out of --out: refused
    expected = root / folder.name if kind == "runs" else root
    if path.resolve().parent != expected:
        sys.exit(f"--restore {report}: {path} is not inside {s.out / kind} — nothing restored; use the report compare.py wrote"
                 " with this --out")  # fmt: skip
    return path


def write_report(
    s: Settings, body: dict[str, Any], start: float, markdown: str, draw: Callable[[dict[str, dict[str, Any]], Path], None]
) -> dict[str, Any]:
    """Writes ``compare.json`` (settings, seconds and ``body``), ``compare.md`` and ``compare.png``; returns the JSON."""
    report = {"settings": {k: json_setting(v) for k, v in vars(s).items()},
              "seconds": time.perf_counter() - start, **body}  # fmt: skip
    (s.out / "compare.json").write_text(json.dumps(report, indent=1))
    (s.out / "compare.md").write_text(markdown + "\n")
    draw(body["results"], s.out / "compare.png")
    print(f"\n{markdown}\n\nwrote {s.out / 'compare.json'}, {s.out / 'compare.md'}, {s.out / 'compare.png'}")
    return report


def json_setting(value: Any) -> Any:
    """A setting as JSON holds it: paths (alone or in a list) as strings."""
    if isinstance(value, list):
        return [json_setting(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def equal_seconds_steps(budget_seconds: float, run_: dict[str, Any], stages: int) -> int:
    """The step budget that trains about ``budget_seconds``, at the run's own seconds per step (≥ 1 per stage)."""
    return max(stages, round(budget_seconds * run_["steps"] / run_["train_seconds"]))


def add_equal_seconds_rows(s: Settings, data: dict[str, Path], results: dict[str, dict[str, Any]]) -> None:
    """Beside equal steps, equal compute: every other arm trained again for about MEET (prompt)'s training seconds
    (steps from its own seconds per step in ``done.json``), added as ``NAME@seconds`` rows and scored alike."""
    budget = results[REFERENCE]["run"]["train_seconds"]
    for name in [a for a in s.arms if a != REFERENCE and a != JUDGE]:
        steps = equal_seconds_steps(budget, results[name]["run"], len(ARMS[name].stages))
        if steps != results[name]["run"]["steps"]:
            run_ = train_arm(name, s, data, steps)
            label = f"{ARMS[name].label}, {steps} steps (≈ {ARMS[REFERENCE].label}'s {budget:.0f} s)"
            results[f"{name}@seconds"] = {"label": label, "export": run_["export"], "run": run_}


def header(s: Settings) -> str:
    lrs = (
        "one learning rate per method (the recipe's)"
        if s.budget == "small"
        else "3 learning rates per method (×1/3, ×1, ×3), picked by validation control accuracy (loss where none)"
    )
    what = {"harmless": "HH harmless only", **dict.fromkeys(LENGTH_TASKS, "AlpacaEval concise/verbose only")}.get(
        s.task, "both preferences in one run (HH harmless + AlpacaEval length)"
    )
    held_out = [f"{s.eval_pairs} HH prompts"] * (s.task not in LENGTH_TASKS) + [f"{s.length_prompts} AlpacaEval prompts"] * (
        s.task != "harmless"
    )
    length = "" if s.task == "harmless" else f"; length: {s.max_new_tokens} new tokens, decoding {decoding(s)}"
    return (
        f"task {s.task}: model {s.model}; {what}; {s.steps} optimizer steps per arm "
        f"(MEET: {s.steps // 2} + {s.steps - s.steps // 2}), batch {s.batch_size} rows, max length {s.max_length}, "
        f"seed {s.seed}" + (f" … {s.seed + s.seeds - 1} ({s.seeds} seeds)" if s.seeds > 1 else "") + "; "
        f"budget {s.budget}: {lrs}; held out: {', '.join(held_out)}{length}"
    )


def parse(argv: Sequence[str] | None = None) -> Settings:
    defaults = Settings(out=Path("runs/compare"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=defaults.out)
    p.add_argument("--task", choices=list(TASKS), default=defaults.task, help="a preset of data, arms, budget and metrics")
    p.add_argument("--budget", choices=list(LR_GRID), default=defaults.budget)
    p.add_argument("--arms", default=None, help="comma-separated (default: the task's): " + ", ".join(ARMS))
    p.add_argument("--model", default=defaults.model)
    p.add_argument("--overlay", help="a YAML applied over every recipe, e.g. configs/debug.yaml for a seconds-long check")
    p.add_argument(
        "--equal-seconds",
        dest="equal_seconds",
        action="store_true",
        default=None,
        help="also train every other arm for MEET (prompt)'s training seconds (rows NAME@seconds)",
    )
    p.add_argument(
        "--restore",
        type=Path,
        nargs="+",
        help="earlier compare.json reports of this --out: their finished runs and scores are read back, not redone",
    )
    for name in (
        "steps",
        "batch_size",
        "max_length",
        "seed",
        "eval_pairs",
        "length_prompts",
        "max_new_tokens",
        "max_val_examples",
        "threads",
        "seeds",
    ):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=None)
    args = vars(p.parse_args(argv))
    fields = vars(defaults)
    preset = {**fields, **{k: v for k, v in TASKS[args["task"]].items() if k in fields}}  # the task's, then the flags
    chosen = {k: v for k, v in args.items() if v is not None}
    if "arms" in chosen:
        chosen["arms"] = [a for a in chosen["arms"].split(",") if a]
    return Settings(**{**preset, **chosen})


if __name__ == "__main__":
    run(parse())
