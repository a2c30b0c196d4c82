"""Stage modules: what training must and must not change, checkpoints, and loading them back."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import build_cpu_trainer, build_tiny_hh_data

from meet_lightning.controls.files import save_controls
from meet_lightning.controls.tokens import LoRAControl, PromptTuningControl
from meet_lightning.errors import CheckpointError
from meet_lightning.modules import ControlTokenModule, JointFinetuneModule, MeetModule
from meet_lightning.modules.base import warmup_cosine

CONTROLS = {
    "prompt": lambda: PromptTuningControl(num_tokens=4, init="vocab"),
    "lora": lambda: LoRAControl(rank=4, target_modules=["q_proj", "v_proj", "o_proj"]),
}


@pytest.fixture(scope="module")
def datamodule(shared_data):
    return build_tiny_hh_data(shared_data)


def trainer(tmp_path, steps: int) -> L.Trainer:
    return build_cpu_trainer(tmp_path, steps)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", CONTROLS)
def test_stage1_trains_every_control_parameter_and_leaves_the_lm_bit_identical(name, datamodule, tmp_path):
    module = ControlTokenModule("tiny-debug", CONTROLS[name](), datamodule.control_schema, lr=5e-2)
    module.configure_model()
    lm_before, control_before = snapshot(module.lm), snapshot(module.control)
    assert not any(p.requires_grad for p in module.lm.parameters())
    batch = next(iter(datamodule.train_dataloader()))
    loss_before = module.compute_loss(batch)["loss"].item()
    fit = trainer(tmp_path, 12)
    fit.fit(module, datamodule)
    assert module.compute_loss(batch)["loss"].item() < loss_before
    for key, value in module.lm.state_dict().items():
        assert torch.equal(value, lm_before[key]), key
    for key, value in module.control.state_dict().items():
        assert not torch.equal(value, control_before[key]), f"{key} did not move"
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.control.parameters()}


def test_stage1_checkpoint_holds_only_controls_and_reloads_with_weights_only(datamodule, tmp_path):
    module = ControlTokenModule("tiny-debug", PromptTuningControl(num_tokens=2), datamodule.control_schema, lr=1e-2)
    fit = trainer(tmp_path, 2)
    fit.fit(module, datamodule)
    path = tmp_path / "s1.ckpt"
    fit.save_checkpoint(path)
    state = torch.load(path, weights_only=True)
    assert set(state["state_dict"]) == {"control.bank"}
    assert state["hyper_parameters"]["control"]["class_path"] == "meet_lightning.controls.tokens.PromptTuningControl"
    loaded = ControlTokenModule.load_from_checkpoint(path, weights_only=True)
    assert torch.equal(loaded.control.bank, module.control.bank)
    assert loaded.schema == module.schema


@pytest.mark.parametrize("lm_lora_rank", [0, 4])
def test_stage2_starts_from_stage1_controls_and_trains_lm_and_controls(datamodule, tmp_path, lm_lora_rank):
    stage1 = ControlTokenModule("tiny-debug", PromptTuningControl(num_tokens=2), datamodule.control_schema, lr=1e-2)
    stage1.configure_model()
    with torch.no_grad():
        stage1.control.bank.add_(1.0)
    controls = tmp_path / "controls.safetensors"
    save_controls(stage1.control, controls, stage1.schema, stage1.base_fingerprint)

    stage2 = JointFinetuneModule(
        "tiny-debug",
        PromptTuningControl(num_tokens=2),
        datamodule.control_schema,
        lr=1e-3,
        control_lr=1e-2,
        init_controls=str(controls),
        lm_lora_rank=lm_lora_rank,
    )
    stage2.configure_model()
    assert torch.equal(stage2.control.bank, stage1.control.bank)  # exactly equal at step 0
    lm_before, bank_before = snapshot(stage2.lm), stage2.control.bank.detach().clone()
    fit = trainer(tmp_path, 3)
    fit.fit(stage2, datamodule)
    assert not torch.equal(stage2.control.bank, bank_before)
    changed = [k for k, v in stage2.lm.state_dict().items() if not torch.equal(v, lm_before[k])]
    assert changed and (lm_lora_rank == 0 or all("lora_" in k for k in changed))
    lrs = sorted(g["lr"] for g in fit.optimizers[0].param_groups)
    assert len(lrs) >= 2 and lrs[0] < lrs[-1]  # the LM and the controls have their own learning rates


def test_stage2_refuses_controls_of_another_base_model(datamodule, tmp_path):
    other = ControlTokenModule("tiny-debug", PromptTuningControl(num_tokens=2), datamodule.control_schema)
    other.configure_model()
    controls = tmp_path / "controls.safetensors"
    save_controls(other.control, controls, other.schema, "0" * 16)
    stage2 = JointFinetuneModule(
        "tiny-debug", PromptTuningControl(num_tokens=2), datamodule.control_schema, init_controls=str(controls)
    )
    with pytest.raises(CheckpointError, match="another base model"):
        stage2.configure_model()


def test_warmup_then_cosine_schedule():
    assert warmup_cosine(0, 4, 100, 0.1) == pytest.approx(0.2)
    assert warmup_cosine(4, 4, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 4, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(52, 4, 100, 0.1) == pytest.approx(0.55)


def test_module_arguments_are_validated_at_construction():
    with pytest.raises(Exception, match="lr 2.0 must be in"):
        MeetModule("tiny-debug", lr=2.0)


SUBCLASSES = {
    "JointFinetuneModule": ({"lr": 1e-5, "control_lr": 1e-3, "controls": "train", "lm_lora_rank": 0}, True),
    "SFTModule": ({"lr": 1e-5}, False),
    "DPOModule": ({"lr": 1e-6, "beta": 0.1, "precompute_reference": False}, False),
    "HybridDPOModule": ({"lr": 1e-5, "control_lr": 1e-3, "dpo_weight": 1.0, "init_controls": None}, True),
}


@pytest.mark.parametrize("name", SUBCLASSES)
def test_a_module_that_forwards_kwargs_still_shows_and_saves_every_argument(name, datamodule):
    """Subclasses declare only what they add or change and pass ``*args, **kwargs`` on: the parser behind
    ``--help`` / ``--print_config`` and the saved hyperparameters still hold every argument of
    ``MeetModule``, with the subclass's own defaults."""
    import inspect

    from jsonargparse import ArgumentParser

    import meet_lightning.modules as modules

    cls, (own, controlled) = getattr(modules, name), SUBCLASSES[name]
    every = set(inspect.signature(MeetModule).parameters) | set(own)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "model")
    defaults = parser.get_defaults()["model"]
    assert every <= set(vars(defaults)), every - set(vars(defaults))
    assert {k: getattr(defaults, k) for k in own} == own
    control = PromptTuningControl(num_tokens=2) if controlled else None
    module = cls("tiny-debug", control, datamodule.control_schema, forward_chunks=2)  # positional, as before
    assert every <= set(module.hparams), every - set(module.hparams)
    assert module.hparams.model_name_or_path == "tiny-debug" and module.hparams.forward_chunks == 2
    assert {k: module.hparams[k] for k in own} == own
