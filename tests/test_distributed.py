"""Sharded training: the FSDP wrap policy comes from the model, and the FSDP overlay runs for real on 2 CPU ranks.

Lightning 2.6.6 refuses ``FSDPStrategy`` without a GPU; ``tests/helpers/cpu_fsdp.py`` lifts exactly those
refusals (see its docstring) so that the shipped overlay ``configs/strategies/fsdp.yaml`` runs on gloo here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from meet_lightning.commands.cli import main
from meet_lightning.training.distributed import NoSplitModulesPolicy, is_sharded, unwrapped_name

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
HELPERS = Path(__file__).resolve().parent / "helpers"
STEPS = 3


def run(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exit:
        return int(exit.code or 0)


# ------------------------------------------------------------------------------------------ wrap policy
TINY = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4}
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"num_key_value_heads": 2}, "LlamaDecoderLayer"),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"num_key_value_heads": 2}, "Qwen2DecoderLayer"),
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM, {}, "GPTNeoXLayer"),
}


@pytest.fixture
def one_process_group():
    """A gloo group of one process (FSDP needs a group); torn down so later tests see no distributed run."""
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=store)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


class Holder(nn.Module):
    """The shape FSDP sees in a run: a LightningModule-like root holding the LM and the controls."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm, self.control = lm, nn.Embedding(2, lm.config.hidden_size)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_wrap_policy_takes_the_blocks_each_architecture_declares(architecture, one_process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    config_class, model_class, extra, block = ARCHITECTURES[architecture]
    lm = model_class(config_class(**TINY, **extra))
    assert block in lm._no_split_modules  # what the policy reads: the class attribute of the HF model
    policy = NoSplitModulesPolicy()
    wrapped = FSDP(Holder(lm), auto_wrap_policy=policy, device_id=torch.device("cpu"), use_orig_params=True)
    units = [type(m.module).__name__ for m in wrapped.modules() if isinstance(m, FSDP)]
    assert units == ["Holder"] + [block] * TINY["num_hidden_layers"]
    assert is_sharded(wrapped.module) and not is_sharded(lm.__class__(lm.config))
    names = [n for n, _ in wrapped.named_parameters()]
    assert any("_fsdp_wrapped_module" in n for n in names)
    assert {unwrapped_name(n) for n in names} == {n for n, _ in Holder(model_class(lm.config)).named_parameters()}


def test_wrap_policy_extra_names_and_a_model_without_declared_blocks():
    policy = NoSplitModulesPolicy(extra=["Linear"])
    plain = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert policy(plain, recurse=True, nonwrapped_numel=6)
    assert policy(plain[0], recurse=False, nonwrapped_numel=6) and not policy(plain[1], recurse=False, nonwrapped_numel=0)
    assert not NoSplitModulesPolicy()(plain[0], recurse=False, nonwrapped_numel=6)  # nothing declared: root only


def test_unwrapped_name_drops_every_wrapper_segment():
    name = "lm.model.layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.mlp.up_proj.weight"
    assert unwrapped_name(name) == "lm.model.layers.0.mlp.up_proj.weight"
    assert unwrapped_name("_fsdp_wrapped_module.control.prompts") == "control.prompts"
    assert unwrapped_name("lm.model.embed_tokens.weight") == "lm.model.embed_tokens.weight"


# ------------------------------------------------------------------------------------------ 2 CPU ranks
def cpu_fsdp_overlay(folder: Path, probes: Path) -> Path:
    """The shipped FSDP overlay on 2 CPU ranks: only accelerator, devices, float32 and the strategy class change."""
    overlay = yaml.safe_load((CONFIGS / "strategies" / "fsdp.yaml").read_text())
    for stage in ("stage1", "stage2"):
        trainer = overlay[stage]["trainer"]
        trainer.update(accelerator="cpu", devices=2, precision="32-true")  # fp32: numbers compared with one process
        trainer["callbacks"] = [{"class_path": "ddp_probe.RankProbe", "init_args": {"folder": str(probes), "stage": stage}}]
    strategy = overlay["stage2"]["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    strategy["class_path"] = "cpu_fsdp.CPUFSDPStrategy"
    path = folder / "fsdp_cpu.yaml"
    path.write_text(json.dumps(overlay))
    return path


def fit_args(out: Path, hh: Path, *extra: str) -> list[str]:
    recipe = ["--config", str(CONFIGS / "meet_hh_prompt.yaml"), "--config", str(CONFIGS / "debug.yaml")]
    return ["fit", *recipe, "--data.path", str(hh), "--output_dir", str(out), "--data.eval_batch_size", "1", *extra]


def start(args: list[str], **env: str) -> subprocess.Popen:
    environment = dict(os.environ)
    # the checkout first: the ranks must import this tree's meet_lightning, not an installed one
    environment.update(
        {
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{HELPERS}",
            **env,
        }
    )
    command = [sys.executable, "-m", "meet_lightning", *args]
    return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def max_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], what: str) -> float:
    assert ours.keys() == theirs.keys() and ours, what
    return max(float((ours[k].double() - theirs[k].double()).abs().max()) for k in ours)


TOLERANCE = 1e-6
"""Largest |Δ| allowed between the 2-rank run and one process accumulating the same 2 batches per step. Measured
(2026-12, torch 2.13 CPU): exactly 0 for the stage-1 controls, the stage-2 checkpoint and the export — with 2
ranks FSDP pre-divides each gradient by 2 and sums two terms, which is what accumulation computes. The margin is
for reduction orders that differ elsewhere (more ranks, another gloo build)."""


@pytest.fixture(scope="module")
def hh() -> Path:
    return Path(os.environ.get("MEET_SHARED_DATA", ROOT.parent / "shared" / "data")) / "hh_rlhf_harmless.train.jsonl.gz"


def test_fsdp_overlay_on_two_cpu_ranks_matches_one_process_and_resumes_on_one(tmp_path, hh, capsys, monkeypatch):
    out, probes, audit = tmp_path / "fsdp", tmp_path / "probes", tmp_path / "audit"
    started = time.monotonic()
    process = start(fit_args(out, hh, "--config", str(cpu_fsdp_overlay(tmp_path, probes))),
                    MEET_AUDIT_ROOT=str(out), MEET_AUDIT_LOG=str(audit))  # fmt: skip
    output, _ = process.communicate(timeout=600)
    seconds = time.monotonic() - started
    assert process.returncode == 0, output[-4000:]

    # stage 1 keeps DDP (a frozen LM needs no sharding), stage 2 is Lightning's FSDPStrategy, one unit per block
    for stage, strategy in {"stage1": "DDPStrategy", "stage2": "CPUFSDPStrategy"}.items():
        ranks = [json.loads((probes / f"{stage}-rank{r}.json").read_text()) for r in (0, 1)]
        assert [(i["world_size"], i["rank"], i["process_group"], i["strategy"]) for i in ranks] == [
            (2, 0, 2, strategy),
            (2, 1, 2, strategy),
        ]
        controls = [torch.load(probes / f"{stage}-rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert controls[0]["global_step"] == controls[1]["global_step"] == STEPS
        assert max_difference(controls[0]["controls"], controls[1]["controls"], stage) == 0, f"{stage} controls across ranks"
        assert json.loads((out / stage / "done.json").read_text())["global_step"] == STEPS
    sharded = [json.loads((probes / f"stage2-rank{r}.json").read_text()) for r in (0, 1)]
    for info in sharded:
        assert "FSDPStrategy" in info["strategy_bases"]
        assert info["fsdp_units"] == ["JointFinetuneModule", "LlamaDecoderLayer", "LlamaDecoderLayer"]
        assert info["local_numel"] < 0.6 * info["full_numel"]  # each rank holds about half between steps
    models = [torch.load(probes / f"stage2-rank{r}-model.pt", weights_only=True) for r in (0, 1)]
    assert max_difference(models[0], models[1], "stage2 weights across ranks") == 0

    # only rank zero writes stage files, checkpoints and the export
    rank0 = (tmp_path / "audit.rank0").read_text()
    for written in ("recipe.yaml", "stage1/controls.safetensors", "stage2/done.json", "stage2/checkpoints/last.ckpt", "/export"):
        assert written in rank0, written
    assert not (tmp_path / "audit.rank1").exists(), (tmp_path / "audit.rank1").read_text()[:2000]
    assert output.count("stage2: done") == 1

    # one process that accumulates the 2 batches the 2 ranks took per step: the same update, up to float32 sums
    reference = tmp_path / "single"
    same = ("--stage1.trainer.accumulate_grad_batches", "2", "--stage2.trainer.accumulate_grad_batches", "2",
            "--stage2.trainer.gradient_clip_val", "null")  # fmt: skip
    assert run(*fit_args(reference, hh, *same)) == 0
    stage1 = max_difference(
        load_file(out / "stage1" / "controls.safetensors"), load_file(reference / "stage1" / "controls.safetensors"), "stage1"
    )
    ours, theirs = (torch.load(r / "stage2" / "checkpoints" / "last.ckpt", weights_only=True) for r in (out, reference))
    stage2 = max_difference(ours["state_dict"], theirs["state_dict"], "stage2")
    assert len(ours["state_dict"]) > 20  # every LM weight and the controls, gathered into one file on rank zero
    groups = [[(len(g["params"]), g["weight_decay"]) for g in c["optimizer_states"][0]["param_groups"]] for c in (ours, theirs)]
    assert groups[0] == groups[1] and len(groups[0]) == 3, groups  # matrices decay under FSDP too (flat shards are 1-D)
    exported = max_difference(
        load_file(out / "export" / "model.safetensors"), load_file(reference / "export" / "model.safetensors"), "export"
    )
    measured = f"2 ranks {seconds:.0f} s; max |Δ| vs one process: stage1 controls {stage1:.2e}, stage2 {stage2:.2e}, export {exported:.2e}"
    with capsys.disabled():
        print(f"\nfsdp: {measured}")
    assert max(stage1, stage2, exported) <= TOLERANCE, measured
    before = {k: v.clone() for k, v in ours["state_dict"].items()}

    # the FSDP checkpoint (one full file) resumes in one process without FSDP: stage 2 continues at step 3
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    (resumed / "stage2" / "done.json").unlink()
    shutil.rmtree(resumed / "export")
    capsys.readouterr()
    one_process = [f"--{stage}.trainer.{key}" for stage in ("stage1", "stage2") for key in ("devices", "strategy")]
    hardware = [arg for flag in one_process for arg in (flag, "1" if flag.endswith("devices") else "auto")]
    overlay = tmp_path / "fsdp_cpu.yaml"  # the run's own recipe (a changed hardware key is still the same run)
    monkeypatch.syspath_prepend(str(HELPERS))  # its probe callback, now in this process
    assert run(*fit_args(resumed, hh, "--config", str(overlay), *hardware, "--stage2.trainer.max_steps", str(STEPS + 2))) == 0
    printed = capsys.readouterr().out
    assert "stage1: finished earlier" in printed
    assert f"stage2: restoring from {resumed / 'stage2' / 'checkpoints' / 'last.ckpt'} at step {STEPS}" in printed
    assert json.loads((resumed / "stage2" / "done.json").read_text())["global_step"] == STEPS + 2
    after = torch.load(resumed / "stage2" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert after.keys() == before.keys() and max_difference(after, before, "resumed") > 0  # it trained on


# ------------------------------------------------------------------------------------------ NaN on one rank
class OtherRankSawNaN:
    """The strategy seen by a rank whose own gradient shard is finite while another rank's is not."""

    def __init__(self) -> None:
        self.asked: list[bool] = []

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        self.asked.append(decision)
        return False  # `all` over the ranks: the other rank said False


def test_gradient_check_stops_every_rank_when_one_shard_holds_a_nan():
    from types import SimpleNamespace

    from meet_lightning.errors import NumericalError
    from meet_lightning.training.reliability import GradientCheck

    layer = nn.Linear(2, 2)
    for p in layer.parameters():
        p.grad = torch.zeros_like(p)  # finite on this rank
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    strategy = OtherRankSawNaN()
    trainer = SimpleNamespace(strategy=strategy, precision_plugin=None, global_step=4)
    with pytest.raises(NumericalError, match=r"stage2: NaN/inf gradient at step 5 in another rank's shard"):
        GradientCheck("stage2").on_before_optimizer_step(trainer, layer, optimizer)
    assert strategy.asked == [True]  # this rank's own verdict went into the reduction
