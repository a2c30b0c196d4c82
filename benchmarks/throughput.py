"""Training and generation throughput of MEET's stages against TRL (issue 7): tokens/s, pairs/s, peak memory, MFU.

Every arm trains the same model on the same pairs (a seeded sample of ``hh_rlhf_harmless``, multi-turn prompts
with their oldest turns dropped to fit ``--max-length``), in the same batches in the same order (the first
batches the library's length-grouping sampler draws from a pool of 50 batches), at one precision (``--precision
auto``: bf16 autocast where the CPU computes bf16 natively, else fp32 — see ``meet_lightning.precision``), no gradient
checkpointing, no checkpoints, no logger and the same thread count. Each arm runs in its own subprocess (so its
peak RSS is its own), once per round; the arm order rotates from round to round, so each arm gets ``--windows``
interleaved measurement windows of ``--steps`` optimizer steps after ``--warmup-steps`` unmeasured ones. Medians
over the windows are reported; the raw per-step timings go into the JSON. The loss of each arm's first batch is
scored again after the first optimizer step (untimed): it must fall, else the run exits 1.

    python benchmarks/throughput.py --json runs/throughput.json           # every arm, 3 windows (~20 min)
    python benchmarks/throughput.py --steps 2 --windows 1 --arms stage2_prefix,trl_dpo --threads 1

Arms (``--arms``, comma-separated; default all):

* ``trl_dpo`` — TRL ``DPOTrainer``, full fine-tuning, reference model in memory (``--dpo-precompute``: cached).
* ``trl_sft`` — TRL ``SFTTrainer``, full fine-tuning on the chosen and rejected rows (completion-only loss).
* ``trl_sft_prompt`` — the same with a peft prompt-tuning config (20 virtual tokens, LM frozen).
* ``stage1_prompt`` / ``stage1_lora`` — MEET stage 1 (``ControlTokenModule``) with prompt-tuning or LoRA controls.
* ``stage2_prefix`` / ``stage2_infix`` — MEET stage 2 (``JointFinetuneModule``), prompt-tuning controls.
* ``meet_dpo`` — this library's ``DPOModule``.
* ``stage1_prompt_compiled`` / ``stage2_prefix_compiled`` / ``meet_dpo_compiled`` — the same with ``compile: true``,
  in the first window only: speed-up over the eager arm, compile seconds and the steps that pay them back.
* ``generation`` — ``AlignedModel.generate`` against plain ``transformers`` ``generate`` (greedy, batch 8 and 1),
  and with ``cache="static"``.
* ``scoring`` — ``evaluate``'s pair scoring against its fp32 unsorted path and plain ``transformers`` forwards.

``--device cuda`` runs every training arm, TRL's included, on the GPU (``--model llama-1b`` builds a ~1.1B llama in
code: a GPU machine without network has no weights to download); peak CUDA memory is reported per arm and MFU is
against the GPU's own bf16 matmul peak. Not run on a GPU yet.

Definitions: tokens/s counts real (non-pad) data tokens, control tokens excluded; every arm sees both rows of a
pair in the same batch, so pairs/s = rows/s ÷ 2. MFU = model FLOPs ÷ the matmul peak of the run's precision
measured here (the best of 7 timings of a 4096² matmul at the run's thread count, in bf16 or fp32 as the arms
run; the spread is reported).
Model FLOPs per processed token (data + control tokens) are ``k · (2·N + 4·L·d·T)`` with N the non-embedding parameters, T the row's length and ``k`` = 3 for
full fine-tuning, 2 for a frozen LM that back-propagates to its inputs, 1 for a reference forward; plus
``k · 2·d·V`` per position whose logits are computed. Library levers (``--all-logits``, ``--no-group-by-length``, ``--forward-chunks``,
``--one-backward``, ``--shared-prompt``, ``--pack-rows``, ``--compile``) switch this library's optimizations off or on in its own arms; TRL arms keep their best
setting. The FLOPs count every row's prompt, so where a pair shares one pass over its prompt (infix controls,
``meet_dpo``) the MFU counts work avoided as done: compare those arms by pairs/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import llama_1b  # noqa: E402 - a sibling script, not a package

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh_rlhf_harmless.train.jsonl.gz"
PREFERENCE = "harmless"
SEED = 1234
LENGTH_MARGIN = 4
"""Tokens kept free under ``--max-length`` when fitting prompts, so TRL's rendering of a row (which keeps the
newline after the end-of-turn token) is never cut either: no arm truncates anything."""
PROMPT_TOKENS = 20
"""Control tokens per control (prompt-tuning arms), as in ``configs/meet_hh_prompt.yaml``."""

TRL_ARMS = ("trl_dpo", "trl_sft", "trl_sft_prompt")
LIBRARY_ARMS = ("stage1_prompt", "stage1_lora", "stage2_prefix", "stage2_infix", "meet_dpo")
COMPILED = "_compiled"
COMPILED_ARMS = tuple(f"{arm}{COMPILED}" for arm in ("stage1_prompt", "stage2_prefix", "meet_dpo"))
"""The same arms with ``compile: true`` (whatever ``--compile`` says): speed-up, compile seconds, pay-back steps."""
ALL_ARMS = (*TRL_ARMS, *LIBRARY_ARMS, *COMPILED_ARMS, "generation", "scoring")
ACCELERATORS = {"cpu": "cpu", "cuda": "gpu"}
"""``--device`` → Lightning's ``accelerator``: every training arm, TRL's included, runs there."""
MEASURED_ELSEWISE = ("generation", "scoring")
"""Arms that do not train: summarized by their own functions, not as training arms."""

FLOP_PROFILES = {  # arm: (k of the trained pass, reference forward per step)
    "trl_dpo": (3, True),
    "trl_sft": (3, False),
    "trl_sft_prompt": (2, False),
    "stage1_prompt": (2, False),
    "stage1_lora": (2, False),
    "stage2_prefix": (3, False),
    "stage2_infix": (3, False),
    "meet_dpo": (3, True),
}
LEARNING_RATES = {  # the recipes' rates (configs/*.yaml); TRL arms take the rate of their library counterpart
    "trl_dpo": 1e-6,
    "trl_sft": 1e-5,
    "trl_sft_prompt": 3e-2,
    "stage1_prompt": 3e-2,
    "stage1_lora": 1e-3,
    "stage2_prefix": 1e-5,
    "stage2_infix": 1e-5,
    "meet_dpo": 1e-6,
}
CONTROL_LR = 1e-3
TARGETS = (  # (label, JSON key, goal, higher is better)
    ("stage 2 prefix pairs/s ÷ TRL DPO", "stage2_vs_trl_dpo_pairs_per_s", 1.8, True),
    ("stage 2 infix pairs/s ÷ TRL DPO", "stage2_infix_vs_trl_dpo_pairs_per_s", 2.5, True),
    ("stage 2 tokens/s ÷ TRL SFT", "stage2_vs_trl_sft_tokens_per_s", 1.3, True),
    ("stage 1 tokens/s ÷ stage 2", "stage1_vs_stage2_tokens_per_s", 1.4, True),
    ("stage 1 tokens/s ÷ TRL SFT + prompt tuning", "stage1_vs_trl_prompt_tuning_tokens_per_s", 1.3, True),
    ("stage 2 peak RSS ÷ TRL DPO", "stage2_peak_rss_vs_trl_dpo", 0.6, False),
    ("padding fraction (stage 2)", "padding_fraction", 0.05, False),
    ("stage 2 MFU (peak of the run's precision)", "stage2_mfu", 0.35, True),
)


class BenchError(Exception):
    """A problem the user can fix; printed as one ``error:`` line."""


# ---------------------------------------------------------------------------------------------------- data


def fit_prompt(encoder: Any, prompt: Sequence[Mapping[str, str]], response_tokens: int, budget: int) -> tuple | None:
    """The prompt with its oldest turns dropped until it and ``response_tokens`` fit in ``budget`` tokens.

    Whole turns only (a conversation restarts on a user turn; a system turn is kept), so no arm ever has to cut
    a row: every arm then trains on exactly the same text. ``None`` when even the last user turn is too long.
    """
    system = [dict(m) for m in prompt[:1] if m["role"] == "system"]
    turns = [dict(m) for m in prompt[len(system) :]]
    while turns and len(encoder.render_prompt([*system, *turns])) + response_tokens > budget:
        turns = turns[1:]
        while turns and turns[0]["role"] != "user":
            turns = turns[1:]
    return (*system, *turns) if turns else None


def fit_pair(encoder: Any, pair: Any, budget: int) -> Any | None:
    """``pair`` with a prompt that leaves room for its longer response within ``budget``, or ``None``."""
    from dataclasses import replace

    prompt_ids = encoder.render_prompt(pair.prompt)
    longest = max(len(encoder.response_ids(pair.prompt, text, prompt_ids)) for text in (pair.chosen, pair.rejected))
    prompt = fit_prompt(encoder, pair.prompt, longest, budget)
    return None if prompt is None else replace(pair, prompt=prompt)


def pair_record(pair: Any) -> dict[str, Any]:
    """A pair in TRL's conversational preference format, which this library also reads (``pairwise``)."""
    return {
        "prompt": [dict(m) for m in pair.prompt],
        "chosen": [{"role": "assistant", "content": pair.chosen}],
        "rejected": [{"role": "assistant", "content": pair.rejected}],
    }


def prepare_data(source: Path, model: str, max_length: int, num_train: int, num_heldout: int, folder: Path) -> dict[str, Any]:
    """Samples and fits pairs from ``source`` and writes ``train.jsonl`` and ``heldout.jsonl`` (distinct prompts).

    Returns:
        ``train_file``, ``heldout_file`` and counts for the report.
    """
    from meet_lightning.data.formats import SourceConfig, read_source
    from meet_lightning.data.heldout import split_key
    from meet_lightning.data.tokenization import PromptTokenizer
    from meet_lightning.models import load_tokenizer

    if not source.is_file():
        raise BenchError(f"{source}: data file not found — pass --data FILE (a preference JSONL, e.g. hh_rlhf_harmless)")
    pairs = list(read_source(SourceConfig(path=str(source), preference=PREFERENCE)).pairs)
    random.Random(SEED).shuffle(pairs)
    tokenizer = load_tokenizer(model)
    tokenizer.model_max_length = 1 << 30  # long conversations are measured here, then cut by whole turns
    encoder = PromptTokenizer(tokenizer, max_length)
    train, heldout, skipped = [], [], 0
    train_prompts: set[str] = set()
    for pair in pairs:
        if len(heldout) >= num_heldout:
            break
        fitted = fit_pair(encoder, pair, max_length - LENGTH_MARGIN)
        if fitted is None:
            skipped += 1
        elif len(train) < num_train:
            train.append(fitted)
            train_prompts.add(split_key(fitted.prompt))
        elif split_key(fitted.prompt) not in train_prompts:  # conversations never trained on (the library refuses others)
            heldout.append(fitted)
    if len(train) < num_train or len(heldout) < num_heldout:
        raise BenchError(
            f"{source}: only {len(train) + len(heldout)} pairs fit --max-length {max_length} — raise --max-length or lower --steps"
        )
    files = {"train_file": folder / "train.jsonl", "heldout_file": folder / "heldout.jsonl"}
    for key, chosen in (("train_file", train), ("heldout_file", heldout)):
        files[key].write_text("".join(json.dumps(pair_record(p)) + "\n" for p in chosen), encoding="utf-8")
    return {
        **{k: str(v) for k, v in files.items()},
        "train_pairs": len(train),
        "heldout_pairs": len(heldout),
        "skipped_too_long": skipped,
    }


def make_datamodule(
    settings: Mapping[str, Any], train_file: str, heldout_file: str | None, group_by_length: bool, val_pairs: int
):
    """The library's own ``PreferenceDataModule`` on the benchmark's pairs, as a paired-batch recipe sets it up."""
    from meet_lightning.data.datamodule import PreferenceDataModule

    return PreferenceDataModule(
        path=train_file,
        format="pairwise",
        preference=PREFERENCE,
        model_name_or_path=settings["model"],
        max_length=settings["max_length"],
        batch_size=settings["batch_pairs"],
        val_fraction=0.0,
        val_path=heldout_file,
        max_val_examples=val_pairs if heldout_file else None,
        pair_batches=True,  # both rows of a pair in one batch: pairs/s = rows/s ÷ 2 for every arm
        group_by_length=group_by_length,
        seed=SEED,
    )


def batch_plan(settings: Mapping[str, Any], train_file: str, group_by_length: bool) -> list[list[int]]:
    """The batches (pair indices into ``train_file``) the library's sampler serves, in order.

    TRL arms are fed these batches in this order (sequential sampling), so every arm times the same pairs.
    """
    from meet_lightning.data.rows import ControlSchema
    from meet_lightning.data.tokenization import PromptTokenizer

    data = make_datamodule(settings, train_file, None, group_by_length, 0)
    data.setup("fit")
    encoder = PromptTokenizer(data.tokenizer, settings["max_length"])
    schema = ControlSchema.from_dict(data.control_schema)
    index = {encoder.tokenize_pair(pair, schema): i for i, pair in enumerate(data.parsed[0].pairs)}
    batches = list(iter(data.train_dataloader().batch_sampler))
    return [[index[data.train_items[i]] for i in batch] for batch in batches]


# ---------------------------------------------------------------------------------------------- accounting


def model_dims(lm: Any) -> dict[str, int]:
    """Non-embedding parameters ``N``, layers ``L``, hidden size ``d`` and vocabulary ``V`` of a causal LM."""
    config = lm.config
    embedding = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings().weight
    total = sum(p.numel() for p in lm.parameters())  # a tied head is the same tensor: counted once
    non_embedding = total - embedding.numel() - (0 if head is embedding else head.numel())
    return {"N": non_embedding, "L": config.num_hidden_layers, "d": config.hidden_size, "V": config.vocab_size}


def step_flops(dims: Mapping[str, int], k: int, reference: bool, lengths: Sequence[int], logit_positions: int) -> float:
    """Model FLOPs of one step (see the module docstring); ``lengths`` are processed row lengths."""
    forward = sum(2 * dims["N"] * t + 4 * dims["L"] * dims["d"] * t * t for t in lengths)
    head = 2 * dims["d"] * dims["V"] * logit_positions
    return (k + (1 if reference else 0)) * (forward + head)


def batch_stats(mask: Any, inserted: Sequence[int], logit_positions: int, chunks: int = 1) -> dict[str, Any]:
    """Real tokens, rows, padded slots and processed row lengths of a right-padded batch (mask (B, L)).

    ``slots`` are the data positions the forward passes compute: with ``chunks`` > 1 the library runs the rows
    in length chunks (``forward_chunks``), each padded to its own longest row; control positions are not slots.
    """
    from meet_lightning.controls.tokens import length_chunks

    real = mask.sum(1).tolist()
    lengths = [int(r) + int(c) for r, c in zip(real, inserted, strict=True)]
    padded = sum(len(g) * max(lengths[i] for i in g) for g in length_chunks(lengths, chunks))
    return {
        "tokens": int(sum(real)),
        "rows": int(mask.shape[0]),
        "slots": int(padded - sum(inserted)),
        "lengths": lengths,
        "logit_positions": int(logit_positions),
    }


def peak_rss_mb() -> float:
    """This process' peak resident memory in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_peak(threads: int, dtype: str, size: int = 4096, trials: int = 7, device: str = "cpu") -> list[float]:
    """Matmul FLOP/s in ``dtype`` (``bfloat16``/``float32``) of ``trials`` timings of a ``size``² matmul, best first.

    The peak MFU is measured against is the best trial: a machine's peak is what it reaches when nothing
    interferes, and one slow trial (another process, a frequency step) must not lower it. The others are the
    spread, reported beside it.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size, device=device).to(getattr(torch, dtype))
        b = torch.randn(size, size, device=device).to(getattr(torch, dtype))
        torch.mm(a, b)
        synchronize(device)
        timings = []
        for _ in range(trials):
            start = time.perf_counter()
            torch.mm(a, b)
            synchronize(device)
            timings.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return sorted((2 * size**3 / t for t in timings), reverse=True)


def synchronize(device: str) -> None:
    """Waits for the device's queued kernels (CUDA runs them asynchronously), so a timestamp closes what it times."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def peak_cuda_mb() -> float | None:
    """This process' peak CUDA memory allocated in MiB (PyTorch's allocator), or ``None`` without CUDA."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None


def cpu_model() -> str:
    """The CPU's model name as ``lscpu`` shows it (``/proc/cpuinfo``), or the platform's processor string."""
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def checkpointing_on(model: Any) -> bool:
    """Whether activation (gradient) checkpointing is on in a transformers model (either attribute name)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name) or hasattr(model, name):
            return bool(getattr(model, name))
    return False


def effective(rows_per_step: int, max_length: int, precision: str, gradient_checkpointing: bool, **extra: Any) -> dict:
    """The settings an arm really ran with, read back from its trainer (compared across arms by the parent)."""
    import torch

    return {
        "rows_per_step": rows_per_step,
        "max_length": max_length,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": bool(gradient_checkpointing),
        **extra,
    }


# ------------------------------------------------------------------------------------------- library arms


def all_positions_logps(hidden, labels, head, chunk: int = 1024):
    """Lever off: like ``losses.response_token_logps`` but with logits on every position (as a plain LM call)."""
    import torch.nn.functional as F

    targets = labels[:, 1:]  # (B, T-1)
    mask = targets != -100
    logits = head(hidden[:, :-1]).float()  # (B, T-1, V): the head on prompt and padding positions too
    logps = -F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")  # (B, T-1)
    return logps * mask, mask


@contextlib.contextmanager
def library_levers(all_logits: bool) -> Iterator[None]:
    """Switches the library's response-only LM head off for the duration (restored afterwards)."""
    import meet_lightning.controls.shared_prompt as shared_module
    import meet_lightning.controls.tokens as control_module

    original = control_module.response_token_logps
    if all_logits:
        control_module.response_token_logps = shared_module.response_token_logps = all_positions_logps
    try:
        yield
    finally:
        control_module.response_token_logps = shared_module.response_token_logps = original


def eager_arm(arm: str) -> str:
    """The arm a ``*_compiled`` arm compiles (itself for every other arm)."""
    return arm.removesuffix(COMPILED)


def build_library_module(arm: str, model: str, schema: dict, levers: Mapping[str, Any]):
    """The LightningModule and control of a library arm, with the recipes' settings (warm-up off)."""
    from meet_lightning import ControlTokenModule, DPOModule, JointFinetuneModule, LoRAControl, PromptTuningControl

    prompt = partial(PromptTuningControl, num_tokens=PROMPT_TOKENS, init="vocab")
    common = {
        "lr": LEARNING_RATES[arm],
        "forward_chunks": levers["forward_chunks"],
        "compile": levers["compile"],
        "share_prompt": levers["shared_prompt"],
        "backward_per_chunk": levers["backward_per_chunk"],
        "pack_rows": levers["pack_rows"],
    }
    builders: dict[str, Callable[[], Any]] = {
        "stage1_prompt": lambda: ControlTokenModule(model, prompt(placement="prefix"), schema, **common),
        "stage1_lora": lambda: ControlTokenModule(
            model, LoRAControl(rank=8, alpha=16, target_modules=["q_proj", "v_proj"]), schema, **common
        ),
        "stage2_prefix": lambda: JointFinetuneModule(model, prompt(placement="prefix"), schema, control_lr=CONTROL_LR, **common),
        "stage2_infix": lambda: JointFinetuneModule(model, prompt(placement="infix"), schema, control_lr=CONTROL_LR, **common),
        "meet_dpo": lambda: DPOModule(model, None, schema, beta=0.1, precompute_reference=levers["dpo_precompute"], **common),
    }
    return builders[arm]()


def lightning_recorder(all_logits: bool):
    """A Lightning callback that timestamps the end of every training step and keeps its batch statistics.

    After the first optimizer step (a warm-up step, never timed) it scores the first batch again: the loss
    must have fallen, or the arm does not train what it claims to.
    """
    import torch
    from lightning.pytorch.callbacks import Callback
    from torch._dynamo.utils import counters

    class StepRecorder(Callback):
        def __init__(self) -> None:
            self.steps: list[dict[str, Any]] = []
            self.first_loss: float | None = None
            self.loss_after: float | None = None
            self.start: float | None = None
            self.graphs_before = 0

        def on_train_start(self, trainer, pl_module) -> None:
            self.start = time.perf_counter()  # the warm-up steps' seconds count from here (compile happens in them)
            self.graphs_before = counters["stats"]["unique_graphs"]  # the counter is per process: arms may share one

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = float(outputs["loss"] if isinstance(outputs, Mapping) else outputs)
            if self.first_loss is None:
                self.first_loss = loss
                with torch.no_grad(), trainer.precision_plugin.forward_context():
                    self.loss_after = float(pl_module.compute_loss(batch)["loss"])
            end = time.perf_counter()  # the bookkeeping below belongs to no step
            inserted = [pl_module.control.num_inserted(row) for row in batch["control_ids"].tolist()]
            mask = batch["attention_mask"]
            labelled = int((batch["labels"] != -100).sum())
            positions = int(mask.sum()) + sum(inserted) - mask.shape[0] if all_logits else labelled
            chunks = pl_module.forward_passes()  # as set, or as the module chose (by device, by memory)
            graphs = counters["stats"]["unique_graphs"] - self.graphs_before  # traced by this fit so far (0 when eager)
            self.steps.append({"end": end, "loss": loss, "graphs": graphs, **batch_stats(mask, inserted, positions, chunks)})

    return StepRecorder()


def heldout_control_accuracy(module, data, precision: str, device: str) -> float:
    """``val/control_accuracy`` of the trained module on the held-out pairs, through Lightning's ``validate``."""
    import lightning as L

    trainer = L.Trainer(
        accelerator=ACCELERATORS[device],
        devices=1,
        precision=precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    return float(trainer.validate(module, datamodule=data, verbose=False)[0]["val/control_accuracy"])


def library_trainer(settings: Mapping[str, Any], recorder: Any):
    """A Lightning trainer as the recipes set it (the run's precision, clipping 1.0), without checkpoints, logger or
    validation."""
    import lightning as L

    from meet_lightning.training.reliability import GradientCheck

    return L.Trainer(
        accelerator=ACCELERATORS[settings["device"]],
        devices=1,
        precision=settings["precision"],
        max_steps=settings["warmup_steps"] + settings["steps"],
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        callbacks=[recorder, GradientCheck("benchmark")],  # the pipeline's per-step NaN check stays: it is its cost
    )


def library_settings(module: Any, data: Any, trainer: Any, levers: Mapping[str, Any]) -> dict[str, Any]:
    """Effective settings of a library arm, read back from its module, data module and trainer."""
    return effective(
        2 * data.batch_size,
        data.max_length,
        trainer.precision,
        checkpointing_on(module.lm),
        module=type(module).__name__,
        control=module.control.config(),
        lr=module.hparams.lr,
        control_lr=module.hparams.control_lr,
        group_by_length=data.group_by_length,
        all_logits=levers["all_logits"],
        compiled=levers["compile"],
        forward_chunks=module.forward_passes(),
        shared_prompt=levers["shared_prompt"],
        pack_rows=levers["pack_rows"],
        backward_per_chunk=module.hparams.backward_per_chunk,
        precompute_reference=getattr(module.hparams, "precompute_reference", None),
        reference_cache_hits=getattr(module, "reference_cache_hits", None),  # pairs scored from the cache
    )


def run_library_arm(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One window of a library arm: a real ``lightning.Trainer`` fit on the library's data module and module."""
    import lightning as L

    arm, settings = spec["arm"], spec["settings"]
    base = eager_arm(arm)  # what it trains; a *_compiled arm differs only in the compile lever
    levers = {**spec["levers"], "compile": spec["levers"]["compile"] or arm != base}
    accuracy = spec["accuracy"] and arm in ("stage2_prefix", "stage2_infix")
    heldout = spec["heldout_file"] if accuracy else None
    data = make_datamodule(settings, spec["train_file"], heldout, levers["group_by_length"], spec["accuracy_pairs"])
    L.seed_everything(SEED, verbose=False)  # right before the module is built, like the pipeline
    module = build_library_module(base, settings["model"], data.control_schema, levers)
    module.configure_model()  # Lightning's own call is then a no-op
    recorder = lightning_recorder(levers["all_logits"])
    trainer = library_trainer(settings, recorder)
    k, reference = FLOP_PROFILES[base]
    with library_levers(levers["all_logits"]):
        trainer.fit(module, datamodule=data)
        result = {
            "settings": library_settings(module, data, trainer, levers),
            "dims": model_dims(module.lm),
            "flop_profile": {"k": k, "reference_forward": reference and not levers["dpo_precompute"]},
            "steps": recorder.steps,
            "fit_start": recorder.start,
            "loss_first": recorder.first_loss,
            "loss_after": recorder.loss_after,
        }
        if accuracy:
            result["control_accuracy"] = heldout_control_accuracy(module, data, trainer.precision, settings["device"])
    return result


# ----------------------------------------------------------------------------------------------- TRL arms


def require_trl() -> None:
    """One-line error when TRL is missing, or transformers too old to feed it batches in a fixed order."""
    try:
        import trl  # noqa: F401
    except ImportError:
        raise BenchError("TRL arms need trl — pip install -e .[bench] (or drop trl_* from --arms)") from None
    from transformers import TrainingArguments

    if "train_sampling_strategy" not in TrainingArguments.__dataclass_fields__:
        raise BenchError("TRL arms need transformers ≥ 5 (train_sampling_strategy) — pip install -e .[bench] -U")


def read_pairs(path: str) -> list:
    """The pairs of a benchmark file, as this library parses them (TRL gets exactly the same text)."""
    from meet_lightning.data.formats import SourceConfig, read_source

    return list(read_source(SourceConfig(path=path, format="pairwise", preference=PREFERENCE)).pairs)


def trl_dpo_rows(pairs: Sequence, plan: Sequence[Sequence[int]]) -> list[dict]:
    """Conversational preference rows in plan order."""
    return [pair_record(pairs[i]) for batch in plan for i in batch]


def trl_sft_rows(pairs: Sequence, plan: Sequence[Sequence[int]]) -> list[dict]:
    """Prompt–completion rows in plan order: a batch's chosen rows, then its rejected rows (as a paired batch)."""
    rows = []
    for batch in plan:
        records = [pair_record(pairs[i]) for i in batch]
        for side in ("chosen", "rejected"):
            rows += [{"prompt": r["prompt"], "completion": r[side]} for r in records]
    return rows


def trl_common_args(spec: Mapping[str, Any], rows_per_batch: int) -> dict[str, Any]:
    """TrainingArguments shared by the TRL arms: the run's precision, no gradient checkpointing, no saving or logging."""
    settings = spec["settings"]
    return {
        "output_dir": str(Path(spec["workdir"]) / f"{spec['arm']}-{spec['round']}"),
        "max_steps": settings["warmup_steps"] + settings["steps"],
        "per_device_train_batch_size": rows_per_batch,
        "learning_rate": LEARNING_RATES[spec["arm"]],
        "lr_scheduler_type": "cosine_with_min_lr",  # the library's schedule: cosine down to 10 %
        "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "bf16": settings["precision"] == "bf16-mixed",  # set explicitly: TRL's defaults differ between its configs
        "gradient_checkpointing": False,  # DPOConfig turns it on by default
        "use_cpu": settings["device"] == "cpu",
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": SEED,
        "dataloader_num_workers": 0,
        "train_sampling_strategy": "sequential",  # the rows are already in the library's length-grouped order
        "max_length": settings["max_length"],
    }


def recording_trainer(base: type) -> type:
    """A subclass of a TRL trainer that keeps every training loss (``losses``) while ``recording`` is on."""

    class Recording(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.losses: list[float] = []
            self.recording = True
            super().__init__(*args, **kwargs)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if self.recording:
                self.losses.append(float((out[0] if return_outputs else out).detach()))
            return out

        def first_batch_loss(self, batch: dict) -> float:
            """The loss of ``batch`` now, not recorded, under training's autocast (if any)."""
            import torch

            self.recording = False
            try:
                with torch.no_grad(), torch.autocast(self.args.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
                    return float(self.compute_loss(self.model, self._prepare_inputs(batch)).detach())
            finally:
                self.recording = True

    return Recording


class RecordingCollator:
    """Wraps a TRL collator and keeps, per batch, what a step processed (batches are collated in step order)."""

    def __init__(self, collate: Callable, label_key: str, virtual_tokens: int) -> None:
        self.collate, self.label_key, self.virtual_tokens = collate, label_key, virtual_tokens
        self.batches: list[dict[str, Any]] = []
        self.first: dict | None = None

    def __call__(self, examples: list) -> dict:
        batch = self.collate(examples)
        mask = batch["attention_mask"]
        labels = batch[self.label_key][:, 1:]
        # fused LM head: logits only where the next token carries a label
        positions = int((labels != -100).sum()) if self.label_key == "labels" else int(labels.sum())
        self.batches.append(batch_stats(mask, [self.virtual_tokens] * mask.shape[0], positions))
        if self.first is None:
            self.first = dict(batch)
        return batch


def step_clock(trainer: Any, collator: RecordingCollator):
    """A transformers callback that timestamps the end of every optimizer step.

    After the first (warm-up, untimed) step it scores the first batch again, before taking the timestamp.
    """
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.loss_after: float | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if not self.ends:
                self.loss_after = trainer.first_batch_loss(collator.first)
            synchronize(args.device.type)
            self.ends.append(time.perf_counter())

    clock = StepClock()
    trainer.add_callback(clock)
    return clock


def trl_result(spec, trainer, collator, clock, lm_dims, config_keys: Sequence[str]) -> dict[str, Any]:
    """Steps, losses and effective settings of a finished TRL run."""
    k, reference = FLOP_PROFILES[spec["arm"]]
    args = trainer.args
    steps = [
        {"end": end, "loss": loss, **stats}
        for end, loss, stats in zip(clock.ends, trainer.losses, collator.batches[: len(clock.ends)], strict=True)
    ]
    model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    return {
        "settings": effective(
            args.per_device_train_batch_size * (2 if spec["arm"] == "trl_dpo" else 1),
            args.max_length,
            "bf16-mixed" if trainer.accelerator.mixed_precision == "bf16" else "32-true",
            bool(args.gradient_checkpointing or getattr(args, "activation_checkpointing", None)) or checkpointing_on(model),
            **{key: _plain(getattr(args, key)) for key in config_keys if hasattr(args, key)},
        ),
        "dims": lm_dims,
        "flop_profile": {"k": k, "reference_forward": reference and not getattr(args, "precompute_ref_log_probs", False)},
        "steps": steps,
        "loss_first": trainer.losses[0],
        "loss_after": clock.loss_after,
    }


def _plain(value: Any) -> Any:
    """A config value as JSON (enums by their value)."""
    value = getattr(value, "value", value)
    return value if isinstance(value, (str, int, float, bool, list, dict, type(None))) else str(value)


TRL_CONFIG_KEYS = (
    "per_device_train_batch_size",
    "learning_rate",
    "lr_scheduler_type",
    "optim",
    "bf16",
    "train_sampling_strategy",
    "max_grad_norm",
    "weight_decay",
)


def run_trl_dpo(spec: Mapping[str, Any]) -> dict[str, Any]:
    """One window of TRL's ``DPOTrainer``: full fine-tuning against a frozen copy of the base model."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from meet_lightning.models import load_model, load_tokenizer

    settings, precompute = spec["settings"], spec["levers"]["dpo_precompute"]
    tokenizer, lm = load_tokenizer(settings["model"]), load_model(settings["model"])
    # TRL would rebuild the reference from the config's hub id; the same frozen copy, loaded the same way
    reference = None if precompute else load_model(settings["model"])
    args = DPOConfig(
        **trl_common_args(spec, settings["batch_pairs"]), beta=0.1, loss_type=["sigmoid"], precompute_ref_log_probs=precompute
    )
    dataset = Dataset.from_list(trl_dpo_rows(read_pairs(spec["train_file"]), spec["plan"]))
    trainer = recording_trainer(DPOTrainer)(
        model=lm, ref_model=reference, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    dims = model_dims(lm)
    collator = trainer.data_collator = RecordingCollator(trainer.data_collator, "completion_mask", 0)
    clock = step_clock(trainer, collator)
    trainer.train()
    keys = (*TRL_CONFIG_KEYS, "beta", "loss_type", "precompute_ref_log_probs", "padding_free", "disable_dropout")
    return trl_result(spec, trainer, collator, clock, dims, keys)


def run_trl_sft(spec: Mapping[str, Any], prompt_tuning: bool) -> dict[str, Any]:
    """One window of TRL's ``SFTTrainer`` on both rows of each pair; ``prompt_tuning`` adds peft prompt tuning."""
    from datasets import Dataset
    from peft import PromptTuningConfig, PromptTuningInit
    from trl import SFTConfig, SFTTrainer

    from meet_lightning.models import load_model, load_tokenizer

    settings = spec["settings"]
    tokenizer, lm = load_tokenizer(settings["model"]), load_model(settings["model"])
    dims = model_dims(lm)
    peft_config = (
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PROMPT_TOKENS, prompt_tuning_init=PromptTuningInit.RANDOM)
        if prompt_tuning
        else None
    )
    # no packing: BFD packing needs padding-free attention (FlashAttention), which the CPU does not have
    args = SFTConfig(**trl_common_args(spec, 2 * settings["batch_pairs"]), packing=False, padding_free=False)
    dataset = Dataset.from_list(trl_sft_rows(read_pairs(spec["train_file"]), spec["plan"]))
    trainer = recording_trainer(SFTTrainer)(
        model=lm, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    virtual = PROMPT_TOKENS if prompt_tuning else 0
    collator = trainer.data_collator = RecordingCollator(trainer.data_collator, "labels", virtual)
    clock = step_clock(trainer, collator)
    trainer.train()
    keys = (*TRL_CONFIG_KEYS, "packing", "padding_free", "completion_only_loss")
    result = trl_result(spec, trainer, collator, clock, dims, keys)
    result["settings"]["completion_only_loss"] = getattr(trainer, "completion_only_loss", None)  # as TRL resolved it
    result["settings"]["peft"] = f"prompt tuning, {PROMPT_TOKENS} virtual tokens" if prompt_tuning else None
    return result


# --------------------------------------------------------------------------------------------- generation


def count_new_tokens(rows: Sequence[Sequence[int]], stops: Sequence[int]) -> list[list[int]]:
    """Each row's generated ids up to and including its first stop token."""
    out = []
    for row in rows:
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:cut])
    return out


def plain_generate(lm: Any, tokenizer: Any, prompts: Sequence, max_new_tokens: int, stops: Sequence[int]) -> list[list[int]]:
    """Greedy ``transformers`` generation from chat-template ids, left-padded, the library's stop tokens."""
    import torch

    rendered = [
        tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=True, return_dict=False) for p in prompts
    ]
    rows = [list(r["input_ids"] if isinstance(r, Mapping) else r) for r in rendered]
    width, pad = max(len(r) for r in rows), tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = lm.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(stops),
            pad_token_id=pad,
            top_p=None,
            top_k=None,
        )
    return count_new_tokens(out[:, width:].tolist(), stops)


def run_generation(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``AlignedModel.generate`` (the path of ``generate``/``predict``) against plain ``model.generate``.

    Same model (weights in the run's dtype), same prompts, greedy, at batch 8 (every prompt in one call) and batch 1
    (every prompt, one call each: two prompts made a window of ~2 s, whose noise was the size of the gap measured); no
    control (``control=None``), so both produce the same tokens. ``meet`` decodes in the library's own loop, where
    a row leaves the batch once it stops (less work than ``model.generate`` where rows stop apart); ``meet_static``
    is the library's path with ``cache="static"`` (``model.generate`` with a KV cache allocated once at the full
    length). Warm-up: one short call each. The order alternates from round to round.
    """
    import torch

    from meet_lightning.controls.tokens import ControlTokens
    from meet_lightning.data.rows import ControlSchema
    from meet_lightning.inference import generation
    from meet_lightning.inference.export import AlignedModel
    from meet_lightning.models import end_of_turn_id, load_model, load_tokenizer

    settings, gen = spec["settings"], spec["generation"]
    tokenizer = load_tokenizer(settings["model"])
    lm = load_model(settings["model"], getattr(torch, gen["dtype"])).eval()
    prompts = [list(p.prompt) for p in read_pairs(spec["heldout_file"])[: gen["batch_size"]]]
    stops = sorted({end_of_turn_id(tokenizer), tokenizer.eos_token_id} - {None})
    aligned = AlignedModel(lm, tokenizer, ControlTokens(), ControlSchema.from_dict({}))
    captured: list = []
    original, own_loop = lm.generate, generation.decode_dropping_finished

    def capture(*args, **kwargs):  # the library decodes to text: keep the ids to count tokens
        out = original(*args, **kwargs)
        captured.append(out.tolist())
        return out

    def capture_own(*args, **kwargs):  # the dynamic cache's path: rows leave the batch as they stop
        out = own_loop(*args, **kwargs)
        captured.append(out)
        return out

    lm.generate, generation.decode_dropping_finished = capture, capture_own

    def meet(chosen: list, batch: int, n: int, cache: str = "dynamic") -> list[list[int]]:
        captured.clear()  # the plain path's calls land here too
        aligned.generate(chosen, control=None, max_new_tokens=n, batch_size=batch, cache=cache)
        return [row for out in captured for row in count_new_tokens(out, stops)]

    def plain(chosen: list, batch: int, n: int) -> list[list[int]]:
        return [
            row for s in range(0, len(chosen), batch) for row in plain_generate(lm, tokenizer, chosen[s : s + batch], n, stops)
        ]

    paths = {"meet": meet, "transformers": plain, "meet_static": partial(meet, cache="static")}
    # batch 8: every prompt in one call; batch 1: every prompt, one call each
    batches = {f"batch{gen['batch_size']}": (prompts, gen["batch_size"]), "batch1": (prompts, 1)}
    for run in paths.values():
        run(prompts[:1], 1, 2)
    timings: dict[str, dict] = {key: {} for key in batches}
    same = {}
    for key, (chosen, batch) in batches.items():
        outputs = {}
        for name in sorted(paths, reverse=spec["round"] % 2 == 1):
            start = time.perf_counter()
            outputs[name] = paths[name](chosen, batch, gen["max_new_tokens"])
            timings[key][name] = {"seconds": time.perf_counter() - start, "tokens": sum(len(r) for r in outputs[name])}
        same[key] = min(
            sum(a == b for a, b in zip(outputs[name], outputs["transformers"], strict=True)) / len(chosen)
            for name in ("meet", "meet_static")
        )
    return {
        "settings": {
            "batch_sizes": [batch for _, batch in batches.values()],
            "max_new_tokens": gen["max_new_tokens"],
            "dtype": gen["dtype"],
            "threads": torch.get_num_threads(),
            "greedy": True,
        },
        "generation": timings,
        "identical_outputs": min(same.values()),
    }


def plain_transformers_scores(model: Any, pairs: Sequence, max_length: int, batch_size: int) -> list[float]:
    """Control margins written the way a ``transformers`` user would: full logits of every position, log-softmax,
    gather; each batch of pairs padded to its longest row, in file order, two passes (own and swapped controls).

    The controls' input vectors are spliced in by the library's own ``insert``/``embed`` (the input is not what is
    being timed); everything after the embeddings is plain ``model(inputs_embeds=…).logits``.
    """
    import torch

    from meet_lightning.data.rows import ControlSchema
    from meet_lightning.data.tokenization import PromptTokenizer, collate_pairs

    encoder, schema = PromptTokenizer(model.tokenizer, max_length), ControlSchema.from_dict(model.schema.to_dict())
    rows = [r for r in (encoder.tokenize_pair(p, schema) for p in pairs) if r is not None]
    margins: list[float] = []
    for start in range(0, len(rows), batch_size):
        batch = collate_pairs(rows[start : start + batch_size], model.tokenizer.pad_token_id)
        n, ids = int(batch["num_pairs"]), batch["control_ids"]
        sums = []
        for controls in (ids, torch.cat([ids[n:], ids[:n]])):
            input_ids, mask, labels = model.control.insert({**batch, "control_ids": controls})
            embeds = model.control.embed(model.lm.get_input_embeddings(), input_ids)
            with model.control.route(controls), torch.no_grad():
                logits = model.lm(inputs_embeds=embeds, attention_mask=mask).logits.float()  # (2B, T, V)
            logps = torch.log_softmax(logits[:, :-1], -1)
            targets = labels[:, 1:]
            picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets != -100)
            sums.append(picked.sum(-1))  # (2B,)
        own, other = sums
        margins += ((own[:n] - other[:n]) - (other[n:] - own[n:])).tolist()
    return margins


def run_scoring(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``evaluate``'s pair scoring (control classifier) three ways on the same held-out pairs, same model:

    * ``meet`` — ``evaluate`` as shipped: fp32 weights (its ``--dtype`` default), length-sorted batches, forward
      chunks, the head only on response positions;
    * ``meet_bf16`` — the same with ``--dtype auto`` where that resolves to bf16 (body bf16, head fp32; opt-in:
      it moves margins — the largest gap is reported);
    * ``fp32_unsorted`` — ``meet`` with sorting, chunks and the shared prompt pass off (the path before them;
      ``scoring_speedup_vs_fp32`` is ``meet`` over it, ``scoring_bf16_speedup_vs_fp32`` is ``meet_bf16`` over it);
    * ``meet_infix`` and ``fp32_unsorted_infix`` — the same two with infix controls, whose four rows per pair
      share one pass over the prompt (``scoring_infix_speedup_vs_fp32``);
    * ``transformers`` — :func:`plain_transformers_scores`.

    The model is the run's LM with untrained prompt-tuning controls (speed does not depend on training); the
    fp32 paths' margins must agree (1e-3).
    """
    import torch

    from meet_lightning.controls.tokens import PromptTuningControl
    from meet_lightning.data.rows import ControlSchema
    from meet_lightning.evaluation.metrics import EvalModel, score_pairs
    from meet_lightning.models import load_model, load_tokenizer

    settings, gen = spec["settings"], spec["generation"]
    schema = ControlSchema.from_dict({PREFERENCE: ["good", "bad"]})
    pairs = read_pairs(spec["heldout_file"])[: spec["scoring_pairs"]]
    tokenizer = load_tokenizer(settings["model"])

    def model_in(dtype: str, placement: str = "prefix") -> EvalModel:
        lm = load_model(settings["model"], getattr(torch, dtype)).eval()
        torch.manual_seed(SEED)
        control = PromptTuningControl(num_tokens=PROMPT_TOKENS, init="random", placement=placement)
        control.setup(lm, tokenizer, schema)
        return EvalModel(settings["model"], lm, tokenizer, control.to(lm.dtype), schema)

    fp32, infix = model_in("float32"), model_in("float32", "infix")
    unsorted = {"sort_by_length": False, "chunks": 1, "share_prompt": False}
    native = fp32 if gen["dtype"] == "float32" else model_in(gen["dtype"])
    max_length, batch = settings["max_length"], 8
    paths = {
        "meet": lambda: score_pairs(fp32, pairs, max_length, batch)[0]["control_margin"],
        "fp32_unsorted": lambda: score_pairs(fp32, pairs, max_length, batch, **unsorted)[0]["control_margin"],
        "meet_infix": lambda: score_pairs(infix, pairs, max_length, batch)[0]["control_margin"],
        "fp32_unsorted_infix": lambda: score_pairs(infix, pairs, max_length, batch, **unsorted)[0]["control_margin"],
        "transformers": lambda: plain_transformers_scores(fp32, pairs, max_length, batch),
    }
    if native is not fp32:  # the opt-in bf16 body, only where the CPU computes bf16 natively
        paths["meet_bf16"] = lambda: score_pairs(native, pairs, max_length, batch)[0]["control_margin"]
    timings, margins = {}, {}
    for name in sorted(paths, reverse=spec["round"] % 2 == 1):
        start = time.perf_counter()
        margins[name] = paths[name]()
        timings[name] = {"seconds": time.perf_counter() - start, "pairs": len(margins[name])}
    gaps = {
        name: max(abs(a - b) for a, b in zip(margins[name], margins[baseline_of(name)], strict=True))
        for name in margins
        if not name.startswith("fp32_unsorted")
    }
    return {
        "settings": {"pairs": len(pairs), "batch_size": batch, "dtype": gen["dtype"], "threads": torch.get_num_threads()},
        "scoring": timings,
        "max_margin_gap_vs_fp32": gaps,
    }


# -------------------------------------------------------------------------------------------------- runner

ARM_RUNNERS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "trl_dpo": run_trl_dpo,
    "trl_sft": partial(run_trl_sft, prompt_tuning=False),
    "trl_sft_prompt": partial(run_trl_sft, prompt_tuning=True),
    **dict.fromkeys((*LIBRARY_ARMS, *COMPILED_ARMS), run_library_arm),
    "generation": run_generation,
    "scoring": run_scoring,
}


def run_arm(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Runs one arm for one window (in this process) and adds its window totals and peak memory."""
    start = time.perf_counter()
    result = ARM_RUNNERS[spec["arm"]](spec)
    result.update(arm=spec["arm"], round=spec["round"], wall_seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb())
    if spec["settings"]["device"] == "cuda":
        result["peak_cuda_mb"] = peak_cuda_mb()
    if "steps" in result:
        result["window"] = window_totals(result, spec["settings"]["warmup_steps"])
    return result


def window_totals(result: Mapping[str, Any], warmup: int) -> dict[str, float]:
    """Totals of the measured steps: from the end of the last warm-up step to the end of the last step."""
    steps = result["steps"]
    if len(steps) <= warmup:
        raise BenchError(f"{result.get('arm')}: ran {len(steps)} steps, fewer than --warmup-steps + 1 — raise --steps")
    measured = steps[warmup:]
    profile = result["flop_profile"]
    start = result.get("fit_start")  # library arms only
    return {
        "seconds": steps[-1]["end"] - steps[warmup - 1]["end"],
        "warmup_seconds": None if start is None else steps[warmup - 1]["end"] - start,
        "steps": len(measured),
        "tokens": sum(s["tokens"] for s in measured),
        "rows": sum(s["rows"] for s in measured),
        "slots": sum(s["slots"] for s in measured),
        "flops": sum(
            step_flops(result["dims"], profile["k"], profile["reference_forward"], s["lengths"], s["logit_positions"])
            for s in measured
        ),
    }


def worker_env(threads: int) -> dict[str, str]:
    """The environment of an arm's subprocess: fixed thread count, offline hub, quiet tokenizers."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"),
        HF_DATASETS_OFFLINE=env.get("HF_DATASETS_OFFLINE", "1"),
    )
    return env


def run_arm_subprocess(spec: Mapping[str, Any], workdir: Path) -> dict[str, Any]:
    """Runs one arm window in a fresh Python process (its peak RSS is its own); its log goes to ``workdir``."""
    name = f"{spec['arm']}-{spec['round']}"
    spec_file, out_file, log_file = (workdir / f"{name}{suffix}" for suffix in (".spec.json", ".out.json", ".log"))
    spec_file.write_text(json.dumps({**spec, "out": str(out_file)}))
    with log_file.open("w") as log:
        code = subprocess.call(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=worker_env(spec["settings"]["threads"]),
        )
    if code != 0 or not out_file.is_file():
        lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
        raise BenchError(f"arm {name} failed (exit {code}): {lines[-1] if lines else 'no output'} — full log: {log_file}")
    return json.loads(out_file.read_text())


def worker_main(spec_file: str) -> int:
    """Entry point of an arm's subprocess: run the spec, write the result JSON."""
    import torch
    import transformers

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(spec["settings"]["threads"])
    transformers.logging.set_verbosity_error()
    result = run_arm(spec)
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """This process' torch thread count set for the duration (in-process arms), then restored."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def round_order(arms: Sequence[str], index: int) -> list[str]:
    """Arms of round ``index``: rotated by one each round, so no arm always runs first or after the same arm."""
    shift = index % len(arms)
    return list(arms[shift:]) + list(arms[:shift])


def run_rounds(arms: Sequence[str], base_spec: Mapping[str, Any], windows: int, in_process: bool, workdir: Path) -> list[dict]:
    """``windows`` rounds over ``arms``; held-out accuracy only in the first round (the rounds are replicas), and
    compiled arms only there too (their window is minutes of compiling before a few timed steps)."""
    results = []
    for index in range(windows):
        for arm in round_order([a for a in arms if index == 0 or a not in COMPILED_ARMS], index):
            spec = {**base_spec, "arm": arm, "round": index, "accuracy": index == 0}
            if in_process:
                with torch_threads(spec["settings"]["threads"]):
                    result = run_arm(spec)
            else:
                result = run_arm_subprocess(spec, workdir)
            results.append(result)
            print(f"[window {index + 1}/{windows}] {progress_line(result)}", file=sys.stderr, flush=True)
    return results


def progress_line(result: Mapping[str, Any]) -> str:
    """One line per finished arm window."""
    if "window" in result:
        w = result["window"]
        return f"{result['arm']}: {w['steps']} steps in {w['seconds']:.1f} s, {w['tokens'] / w['seconds']:.0f} tok/s, peak {result['peak_rss_mb'] / 1024:.1f} GiB"
    if "scoring" in result:
        return "scoring: " + ", ".join(f"{k} {v['pairs'] / v['seconds']:.2f} pairs/s" for k, v in result["scoring"].items())
    return "generation: " + ", ".join(
        f"{batch} {k} {v['tokens'] / v['seconds']:.0f} tok/s" for batch, g in result["generation"].items() for k, v in g.items()
    )


# ------------------------------------------------------------------------------------------------- summary


def median_of(values: Sequence[float]) -> float | None:
    """Median, or ``None`` when there is nothing to take it of."""
    return statistics.median(values) if values else None


def arm_summary(runs: Sequence[Mapping[str, Any]], peak_flops: float) -> dict[str, Any]:
    """Medians over an arm's windows, with every window's raw numbers."""
    windows = [r["window"] for r in runs]
    rates = lambda key: [w[key] / w["seconds"] for w in windows]  # noqa: E731
    accuracy = [r["control_accuracy"] for r in runs if "control_accuracy" in r]
    return {
        "settings": runs[0]["settings"],
        "tokens_per_s": median_of(rates("tokens")),
        "pairs_per_s": median_of([r / 2 for r in rates("rows")]),
        "seconds_per_step": median_of([w["seconds"] / w["steps"] for w in windows]),
        "warmup_seconds": median_of([w["warmup_seconds"] for w in windows if w.get("warmup_seconds") is not None]),
        "mfu": median_of([f / peak_flops for f in rates("flops")]),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        "peak_cuda_mb": max((r["peak_cuda_mb"] for r in runs if r.get("peak_cuda_mb")), default=None),
        "padding_fraction": 1 - sum(w["tokens"] for w in windows) / sum(w["slots"] for w in windows),
        "tokens_per_pair": sum(w["tokens"] for w in windows) / sum(w["rows"] / 2 for w in windows),
        "loss_fell": all(r["loss_after"] < r["loss_first"] for r in runs),
        "losses": [[r["loss_first"], r["loss_after"]] for r in runs],
        "control_accuracy": accuracy[0] if accuracy else None,
        "windows": [
            {"round": r["round"], "wall_seconds": r["wall_seconds"], **r["window"], "steps_raw": r["steps"]} for r in runs
        ],
    }


def generation_summary(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median tokens/s of both generation paths at each batch size, and their ratios."""
    out: dict[str, Any] = {"settings": runs[0]["settings"], "identical_outputs": min(r["identical_outputs"] for r in runs)}
    for batch in runs[0]["generation"]:
        rate = {
            name: median_of([r["generation"][batch][name]["tokens"] / r["generation"][batch][name]["seconds"] for r in runs])
            for name in runs[0]["generation"][batch]
        }
        out[batch] = {f"{name}_tokens_per_s": value for name, value in rate.items()}
        out[batch]["ratio"] = rate["meet"] / rate["transformers"] if rate["transformers"] else None
        out[batch]["static_cache_ratio"] = rate["meet_static"] / rate["meet"]
    out["windows"] = [{"round": r["round"], **r["generation"]} for r in runs]
    return out


def baseline_of(path: str) -> str:
    """The unsorted fp32 path a scoring path is compared with: the infix model's own for infix paths."""
    return "fp32_unsorted_infix" if path.endswith("_infix") else "fp32_unsorted"


def scoring_summary(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Median pairs/s of the scoring paths and the largest margin gap of each to its fp32 unsorted path."""
    rate = {
        name: median_of([r["scoring"][name]["pairs"] / r["scoring"][name]["seconds"] for r in runs])
        for name in runs[0]["scoring"]
    }
    gaps = {name: max(r["max_margin_gap_vs_fp32"][name] for r in runs) for name in runs[0]["max_margin_gap_vs_fp32"]}
    return {"settings": runs[0]["settings"], "pairs_per_s": rate, "max_margin_gap_vs_fp32": gaps,
            "windows": [{"round": r["round"], **r["scoring"]} for r in runs]}  # fmt: skip


def compile_summary(arms: Mapping[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per compiled arm beside its eager arm: steady speed-up (eager s/step ÷ compiled), compile seconds (the
    extra seconds of its warm-up steps: tracing and code generation) and the steps that pay them back (``None``:
    compiling is not faster, it never pays back)."""
    out = {}
    for name in COMPILED_ARMS:
        eager = eager_arm(name)
        if name not in arms or eager not in arms:
            continue
        compiled, plain = arms[name], arms[eager]
        saved = plain["seconds_per_step"] - compiled["seconds_per_step"]
        extra = compiled["warmup_seconds"] - plain["warmup_seconds"]
        steps = compiled["windows"][0]["steps_raw"]
        warmup = len(steps) - compiled["windows"][0]["steps"]
        out[eager] = {
            "speedup": plain["seconds_per_step"] / compiled["seconds_per_step"],
            "compile_seconds": extra,
            "payback_steps": max(extra, 0.0) / saved if saved > 0 else None,
            "graphs_traced_in_warmup": steps[warmup - 1]["graphs"],
            "graphs_traced_in_measured_steps": steps[-1]["graphs"] - steps[warmup - 1]["graphs"],  # recompiles timed
        }
    return out


def ratio(arms: Mapping[str, Any], top: str, bottom: str, key: str) -> float | None:
    """``arms[top][key] / arms[bottom][key]``, or ``None`` when an arm did not run."""
    if top not in arms or bottom not in arms or not arms[bottom].get(key):
        return None
    return arms[top][key] / arms[bottom][key]


def summarize(results: Sequence[Mapping[str, Any]], peak_flops: float) -> dict[str, Any]:
    """The issue's keys, per-arm medians and the raw windows."""
    by_arm: dict[str, list] = {}
    for r in results:
        by_arm.setdefault(r["arm"], []).append(r)
    arms = {name: arm_summary(runs, peak_flops) for name, runs in by_arm.items() if name not in MEASURED_ELSEWISE}
    stage2 = arms.get("stage2_prefix", {})
    summary = {
        "stage2_vs_trl_dpo_pairs_per_s": ratio(arms, "stage2_prefix", "trl_dpo", "pairs_per_s"),
        "stage2_infix_vs_trl_dpo_pairs_per_s": ratio(arms, "stage2_infix", "trl_dpo", "pairs_per_s"),
        "stage2_vs_trl_sft_tokens_per_s": ratio(arms, "stage2_prefix", "trl_sft", "tokens_per_s"),
        "stage1_vs_stage2_tokens_per_s": ratio(arms, "stage1_prompt", "stage2_prefix", "tokens_per_s"),
        "stage1_vs_trl_prompt_tuning_tokens_per_s": ratio(arms, "stage1_prompt", "trl_sft_prompt", "tokens_per_s"),
        "stage2_peak_rss_vs_trl_dpo": ratio(arms, "stage2_prefix", "trl_dpo", "peak_rss_mb"),
        "stage2_peak_cuda_vs_trl_dpo": ratio(arms, "stage2_prefix", "trl_dpo", "peak_cuda_mb"),
        "stage2_mfu": stage2.get("mfu"),
        "padding_fraction": stage2.get("padding_fraction"),
        "stage2_prefix_control_accuracy": stage2.get("control_accuracy"),
        "stage2_infix_control_accuracy": arms.get("stage2_infix", {}).get("control_accuracy"),
        "meet_dpo_vs_trl_dpo_pairs_per_s": ratio(arms, "meet_dpo", "trl_dpo", "pairs_per_s"),
        "stage1_lora_vs_stage2_tokens_per_s": ratio(arms, "stage1_lora", "stage2_prefix", "tokens_per_s"),
        "generation_vs_transformers_tokens_per_s": None,
        "generation_vs_transformers_tokens_per_s_batch1": None,
        "generation_vs_transformers_tokens_per_s_batch8": None,
        "generation_static_cache_vs_dynamic_batch1": None,
        "generation_static_cache_vs_dynamic_batch8": None,
        "scoring_speedup_vs_fp32": None,
        "scoring_vs_transformers_pairs_per_s": None,
        "scoring_bf16_speedup_vs_fp32": None,
        "scoring_bf16_max_margin_gap": None,
        "scoring_infix_speedup_vs_fp32": None,
        "compile": compile_summary(arms),
        "peak_flops": peak_flops,
        "arms": arms,
    }
    if "generation" in by_arm:
        generation = summary["arms"]["generation"] = generation_summary(by_arm["generation"])
        for batch in ("batch1", "batch8"):
            summary[f"generation_vs_transformers_tokens_per_s_{batch}"] = generation.get(batch, {}).get("ratio")
            summary[f"generation_static_cache_vs_dynamic_{batch}"] = generation.get(batch, {}).get("static_cache_ratio")
        summary["generation_vs_transformers_tokens_per_s"] = summary["generation_vs_transformers_tokens_per_s_batch8"]
    if "scoring" in by_arm:
        scoring = summary["arms"]["scoring"] = scoring_summary(by_arm["scoring"])
        rate = scoring["pairs_per_s"]
        summary["scoring_speedup_vs_fp32"] = rate["meet"] / rate["fp32_unsorted"]
        summary["scoring_bf16_speedup_vs_fp32"] = rate["meet_bf16"] / rate["fp32_unsorted"] if "meet_bf16" in rate else None
        summary["scoring_bf16_max_margin_gap"] = scoring["max_margin_gap_vs_fp32"].get("meet_bf16")
        summary["scoring_vs_transformers_pairs_per_s"] = rate["meet"] / rate["transformers"]
        summary["scoring_infix_speedup_vs_fp32"] = rate["meet_infix"] / rate["fp32_unsorted_infix"]
    return summary


def check_settings(summary: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Problems: an arm that ran with other shared settings than asked, or whose loss did not fall."""
    problems = []
    for name, arm in summary["arms"].items():
        if name in MEASURED_ELSEWISE:
            continue
        for key, want in expected.items():
            if arm["settings"].get(key) != want:
                problems.append(f"{name} ran with {key}={arm['settings'].get(key)!r}, not {want!r}")
        if not arm["loss_fell"]:
            problems.append(f"{name}: the loss on its first batch did not fall ({arm['losses']})")
    return problems


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(summary: Mapping[str, Any]) -> str:
    """The per-arm table, the targets with pass/miss, and the extra measurements, as markdown."""
    lines = [
        "| arm | tokens/s | pairs/s | s/step | MFU | peak RSS GiB | padding | tok/pair | loss first → after |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, arm in summary["arms"].items():
        if name in MEASURED_ELSEWISE:
            continue
        losses = "; ".join(f"{a:.3f}→{b:.3f}" for a, b in arm["losses"])
        lines.append(
            f"| {name} | {arm['tokens_per_s']:.0f} | {arm['pairs_per_s']:.2f} | {arm['seconds_per_step']:.2f} | {arm['mfu']:.1%} |"
            f" {arm['peak_rss_mb'] / 1024:.2f} | {arm['padding_fraction']:.1%} | {arm['tokens_per_pair']:.0f} | {losses} |"
        )
    lines += ["", "| target | measured | goal | result |", "| --- | ---: | ---: | --- |"]
    for label, key, goal, higher in TARGETS:
        value = summary.get(key)
        verdict = "n/a" if value is None else "pass" if (value >= goal if higher else value <= goal) else "miss"
        lines.append(f"| {label} | {_fmt(value, '.3f')} | {'≥' if higher else '≤'} {goal} | {verdict} |")
    lines += [
        "",
        f"- held-out control accuracy after the same budget: prefix {_fmt(summary['stage2_prefix_control_accuracy'])},"
        f" infix {_fmt(summary['stage2_infix_control_accuracy'])}",
        f"- generation tokens/s, meet ÷ transformers: batch 1 {_fmt(summary['generation_vs_transformers_tokens_per_s_batch1'])},"
        f" batch 8 {_fmt(summary['generation_vs_transformers_tokens_per_s_batch8'])}; static KV cache ÷ dynamic:"
        f" batch 1 {_fmt(summary['generation_static_cache_vs_dynamic_batch1'])},"
        f" batch 8 {_fmt(summary['generation_static_cache_vs_dynamic_batch8'])}",
        f"- scoring pairs/s: ÷ the fp32 unsorted path {_fmt(summary['scoring_speedup_vs_fp32'])} (goal ≥ 3.0),"
        f" ÷ plain transformers {_fmt(summary['scoring_vs_transformers_pairs_per_s'])} (goal ≥ 1.0);"
        f" opt-in bf16 body ÷ the fp32 unsorted path {_fmt(summary['scoring_bf16_speedup_vs_fp32'])}"
        f" (largest margin gap {_fmt(summary['scoring_bf16_max_margin_gap'], '.3g')} nats); infix controls, whose rows"
        f" share the prompt pass: {_fmt(summary['scoring_infix_speedup_vs_fp32'])} ÷ their unsorted path",
        f"- this library's DPO pairs/s ÷ TRL DPO: {_fmt(summary['meet_dpo_vs_trl_dpo_pairs_per_s'])}",
        *(
            [f"- peak CUDA memory (GiB): {cuda}; stage 2 ÷ TRL DPO {_fmt(summary['stage2_peak_cuda_vs_trl_dpo'])}"]
            if (
                cuda := ", ".join(
                    f"{n} {a['peak_cuda_mb'] / 1024:.2f}" for n, a in summary["arms"].items() if a.get("peak_cuda_mb")
                )
            )
            else []
        ),
        *(
            f"- `compile: true`, {name} (one window): {c['speedup']:.2f}× its eager s/step, compile {c['compile_seconds']:.0f} s,"
            + (f" paid back after {c['payback_steps']:.0f} steps" if c["payback_steps"] is not None else " never paid back")
            + f"; graphs traced in warm-up {c['graphs_traced_in_warmup']}, in the timed steps {c['graphs_traced_in_measured_steps']}"
            for name, c in summary["compile"].items()
        ),
        f"- precision {summary['precision']['precision']} ({summary['precision']['reason']});"
        f" {summary['precision']['peak_dtype']} matmul peak (best of {len(summary['peak_flops_trials'])} trials):"
        f" {summary['peak_flops'] / 1e9:.0f} GFLOP/s, trials {summary['peak_flops_trials'][-1] / 1e9:.0f}–"
        f"{summary['peak_flops_trials'][0] / 1e9:.0f}",
    ]
    return "\n".join(lines)


def settings_lines(summary: Mapping[str, Any]) -> str:
    """Every arm's effective settings, one line each."""
    return "\n".join(f"- {name}: {json.dumps(arm['settings'], default=str)}" for name, arm in summary["arms"].items())


# ----------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=4, help="measured optimizer steps per window (default 4)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="unmeasured steps before each window (raise with --compile)")
    parser.add_argument("--windows", type=int, default=3, help="interleaved measurement windows per arm (default 3)")
    parser.add_argument("--arms", type=str, default=",".join(ALL_ARMS), help=f"comma-separated subset of {', '.join(ALL_ARMS)}")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads of every arm")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step (2 rows each) in every arm")
    parser.add_argument("--max-length", type=int, default=256, help="longest row in tokens")
    parser.add_argument(
        "--model",
        type=str,
        default="smollm2-135m-instruct",
        help="model alias or folder (tiny-debug for tests); llama-1b: a ~1.1B llama built in code (benchmarks/memory.py)",
    )
    parser.add_argument("--tokenizer", type=str, default="smollm2-135m-instruct", help="the tokenizer of --model llama-1b")
    parser.add_argument(
        "--device",
        choices=list(ACCELERATORS),
        default="cpu",
        help="where every training arm runs (cuda: peak CUDA memory and the GPU's bf16 matmul peak are reported too)",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="pairwise preference file")
    parser.add_argument("--json", type=Path, default=None, help="write the summary and raw timings here")
    parser.add_argument("--pool-pairs", type=int, default=None, help="pairs sampled for training (default 50 × batch size)")
    parser.add_argument("--accuracy-pairs", type=int, default=16, help="held-out pairs for the prefix/infix control accuracy")
    parser.add_argument("--scoring-pairs", type=int, default=32, help="held-out pairs the scoring arm scores")
    parser.add_argument("--gen-tokens", type=int, default=64, help="new tokens per generation")
    parser.add_argument(
        "--precision",
        type=str,
        default="auto",
        choices=["auto", "bf16-mixed", "32-true"],
        help="every training arm's precision; auto: bf16-mixed where the CPU computes bf16 natively, else 32-true",
    )
    parser.add_argument(
        "--gen-dtype",
        type=str,
        default="auto",
        choices=["auto", "bfloat16", "float32"],
        help="weights for generation (auto: the dtype of --precision)",
    )
    parser.add_argument("--all-logits", action="store_true", help="lever off: library arms compute logits on every position")
    parser.add_argument("--no-group-by-length", action="store_true", help="lever off: random batches instead of length-grouped")
    parser.add_argument(
        "--shared-prompt", action="store_true", help="lever on: library arms' share_prompt (a pair's rows share its prompt pass)"
    )
    parser.add_argument("--compile", action="store_true", help="lever on: torch.compile the library arms' decoder")
    parser.add_argument("--pack-rows", action="store_true", help="lever on: library arms' pack_rows (no padding computed)")
    parser.add_argument(
        "--one-backward", action="store_true", help="lever off: library arms back-propagate once per step, not per chunk"
    )
    parser.add_argument(
        "--forward-chunks",
        type=int,
        default=None,
        help="library arms' forward_chunks (unset: the library's choice, 4 on a CPU, the fewest that fit on a CUDA device;"
        " 1: lever off, one padded pass per batch)",
    )
    parser.add_argument("--dpo-precompute", action="store_true", help="both DPO arms cache reference log-probs before training")
    parser.add_argument("--in-process", action="store_true", help="run arms in this process (tests; peak RSS is then shared)")
    parser.add_argument("--peak-size", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> list[str]:
    """Every arm named in ``--arms``, checked; the TRL ones need trl installed."""
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ALL_ARMS]
    problems = [
        (bool(unknown), f"unknown arm(s) {', '.join(unknown)} — pick from {', '.join(ALL_ARMS)}"),
        (not arms, "no arms — pass --arms with at least one of " + ", ".join(ALL_ARMS)),
        (args.steps < 1 or args.warmup_steps < 1, "--steps and --warmup-steps must be ≥ 1 (warm-up is never measured)"),
        (args.windows < 1, "--windows must be ≥ 1 (3 for the report)"),
        (args.batch_size < 1 or args.threads < 1, "--batch-size and --threads must be ≥ 1"),
        (
            args.device != "cpu" and bool(set(arms) & set(MEASURED_ELSEWISE)),
            f"--device {args.device}: the {' and '.join(MEASURED_ELSEWISE)} arms run on the CPU only — leave them out",
        ),
    ]
    messages = [m for failed, m in problems if failed]
    if messages:
        raise BenchError("; ".join(messages))
    if any(a in TRL_ARMS for a in arms):
        require_trl()
    return arms


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the exit code (1 when an arm's settings differ or its loss did not fall)."""
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    try:
        return run_benchmark(args)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run_benchmark(args: argparse.Namespace) -> int:
    """Prepares data, measures the peak, runs the rounds, prints and writes the summary."""
    import torch

    from meet_lightning.precision import resolve_precision

    arms = check_args(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: no CUDA device here — run it on a GPU machine, or leave --device out")
    resolved = resolve_precision(args.precision, args.device)
    peak_dtype = "bfloat16" if resolved.precision == "bf16-mixed" else "float32"
    workdir = Path(tempfile.mkdtemp(prefix="meet-throughput-"))
    model = str(llama_1b(workdir / "llama-1b", args.tokenizer)) if args.model == "llama-1b" else args.model
    settings = {
        "device": args.device,
        "precision": resolved.precision,
        "model": model,
        "batch_pairs": args.batch_size,
        "max_length": args.max_length,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "threads": args.threads,
    }
    levers = {
        "all_logits": args.all_logits,
        "group_by_length": not args.no_group_by_length,
        "shared_prompt": args.shared_prompt,
        "backward_per_chunk": not args.one_backward,
        "compile": args.compile,
        "dpo_precompute": args.dpo_precompute,
        "forward_chunks": args.forward_chunks,
        "pack_rows": args.pack_rows,
    }
    start = time.perf_counter()
    # a pool of one length-grouping window (50 batches): batches as uniform as in a long run; the arms then
    # train on the first warm-up + measured batches of the library's order
    pool = max(args.pool_pairs or 50 * args.batch_size, (args.warmup_steps + args.steps) * args.batch_size)
    data = prepare_data(args.data, model, args.max_length, pool, max(args.accuracy_pairs, args.scoring_pairs, 8), workdir)
    plan = batch_plan(settings, data["train_file"], levers["group_by_length"])[: args.warmup_steps + args.steps]
    peak_size = args.peak_size if args.device == "cpu" else max(args.peak_size, 8192)  # a GPU needs a larger matmul
    peak_trials = measure_peak(args.threads, peak_dtype, peak_size, device=args.device)
    base = {
        "settings": settings,
        "levers": levers,
        "plan": plan,
        "workdir": str(workdir),
        "accuracy_pairs": args.accuracy_pairs,
        "scoring_pairs": args.scoring_pairs,
        "generation": {
            "batch_size": 8,
            "max_new_tokens": args.gen_tokens,
            "dtype": peak_dtype if args.gen_dtype == "auto" else args.gen_dtype,
        },
        **{k: data[k] for k in ("train_file", "heldout_file")},
    }
    results = run_rounds(arms, base, args.windows, args.in_process, workdir)
    summary = summarize(results, peak_trials[0])
    summary["peak_flops_trials"] = peak_trials
    expected = {
        "rows_per_step": 2 * args.batch_size,
        "max_length": args.max_length,
        "precision": resolved.precision,
        "threads": args.threads,
        "gradient_checkpointing": False,
    }
    problems = check_settings(summary, expected)
    summary.update(
        precision={
            "precision": resolved.precision,
            "reason": resolved.reason,
            "peak_dtype": peak_dtype,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_model": cpu_model(),
        },
        settings=settings,
        levers=levers,
        data={
            **{k: v for k, v in data.items() if not k.endswith("_file")},
            "source": str(args.data),
            "timed_pairs_per_arm": args.steps * args.batch_size,
        },
        problems=problems,
        total_seconds=time.perf_counter() - start,
        command=" ".join(sys.argv),
    )
    print(settings_lines(summary) + "\n\n" + markdown(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))
    shutil.rmtree(workdir, ignore_errors=True)
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
