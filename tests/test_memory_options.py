"""Memory levers of every stage: gradient checkpointing (same loss and gradients), the AdamW implementation,
and a frozen 4-bit base (refused with the requirement where it cannot run)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import build_tiny_hh_data

from meet_lightning.controls.tokens import LoRAControl, PromptTuningControl
from meet_lightning.errors import ConfigError
from meet_lightning.modules import ControlTokenModule, JointFinetuneModule

CONTROLS = {
    "prefix": lambda: PromptTuningControl(num_tokens=3, init="random", placement="prefix"),
    "infix": lambda: PromptTuningControl(num_tokens=3, init="random", placement="infix"),
    "lora": lambda: LoRAControl(rank=4, target_modules=["q_proj", "v_proj", "down_proj"]),
}
MODULES = {"stage1": ControlTokenModule, "stage2": JointFinetuneModule}


@pytest.fixture(scope="module")
def batch(shared_data):
    data = build_tiny_hh_data(shared_data, max_examples=8, max_val_examples=2)
    return data.control_schema, next(iter(data.train_dataloader()))


def loss_and_grads(module_class, control_name, schema, batch, **options):
    """One forward and backward in fp32; also how often the first decoder layer's MLP computed (counted by
    wrapping its ``forward``: transformers recomputes a checkpointed layer without running module hooks)."""
    torch.manual_seed(0)
    module = module_class("tiny-debug", CONTROLS[control_name](), schema, **options)
    module.configure_model()
    with torch.no_grad():  # LoRA B starts at zero (no effect): give the controls' routing something to change
        for name, p in module.control.named_parameters():
            if "lora_b" in name:
                p.normal_(0.0, 0.1)
    module.train()
    runs = []
    mlp = module.lm.get_decoder().layers[0].mlp
    forward = mlp.forward
    mlp.forward = lambda *args, **kwargs: (runs.append(1), forward(*args, **kwargs))[1]
    loss = module.compute_loss(batch)["loss"]
    loss.backward()
    del mlp.forward
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return loss.detach(), grads, len(runs)


@pytest.mark.parametrize("control_name", CONTROLS)
@pytest.mark.parametrize("stage", MODULES)
def test_gradient_checkpointing_keeps_the_loss_and_every_gradient(stage, control_name, batch):
    schema, data = batch
    loss, grads, runs = loss_and_grads(MODULES[stage], control_name, schema, data)
    ckpt_loss, ckpt_grads, ckpt_runs = loss_and_grads(MODULES[stage], control_name, schema, data, gradient_checkpointing=True)
    # the layer ran once per forward chunk, and again for each in backward: checkpointing was on
    assert runs >= 1 and ckpt_runs == 2 * runs
    torch.testing.assert_close(ckpt_loss, loss, rtol=0, atol=1e-6)
    assert grads.keys() == ckpt_grads.keys() and any(n.startswith("control.") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def saved_for_backward(module, batch) -> list[tuple[int, ...]]:
    """The shapes of the tensors autograd keeps for backward during a forward of ``compute_loss`` (weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
    shapes = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module.compute_loss(batch)["loss"].backward()
    return shapes


@pytest.mark.parametrize("control_name", ["prefix", "lora"])
def test_under_gradient_checkpointing_the_head_keeps_no_logits(control_name, batch):
    """Logits are (positions × vocabulary): with the layers checkpointed they were most of what a step kept. The
    head recomputes them in backward now (same loss and gradients: the test above)."""
    schema, data = batch
    held = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = JointFinetuneModule("tiny-debug", CONTROLS[control_name](), schema, gradient_checkpointing=checkpointing)
        module.configure_model()
        module.train()
        vocab = module.lm.get_output_embeddings().weight.shape[0]
        held[checkpointing] = [s for s in saved_for_backward(module, data) if len(s) == 2 and s[-1] == vocab]
    assert held[False]  # without checkpointing the log-softmax of each chunk is kept: (positions, vocabulary)
    assert held[True] == []


def test_a_lora_control_refuses_the_output_layer(batch):
    """The head runs after the decoder, on response positions, outside the controls' routing: a LoRA control on it
    trained nothing (its B matrices stayed zero) and the export carried an adapter the training never used."""
    schema, _ = batch
    module = JointFinetuneModule("tiny-debug", LoRAControl(rank=4, target_modules=["q_proj", "lm_head"]), schema)
    with pytest.raises(ConfigError, match=r"not the output layer 'lm_head' — remove 'lm_head' from init_args.target_modules"):
        module.configure_model()


@pytest.mark.parametrize("optimizer", ["adamw_foreach", "adamw_fused"])
def test_every_adamw_implementation_makes_the_same_update(optimizer, batch):
    schema, data = batch

    def trained(name: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        module = JointFinetuneModule("tiny-debug", CONTROLS["prefix"](), schema, lr=1e-3, optimizer=name)
        module.configure_model()
        module.trainer = type("Trainer", (), {"estimated_stepping_batches": 10})()
        opt = module.configure_optimizers()["optimizer"]
        module.train()
        for _ in range(2):
            opt.zero_grad()
            module.compute_loss(data)["loss"].backward()
            opt.step()
        return {n: p.detach().clone() for n, p in module.named_parameters()}

    reference, other = trained("adamw"), trained(optimizer)
    for name, value in reference.items():
        torch.testing.assert_close(other[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_fused"])
def test_every_adamw_implementation_trains_under_mixed_precision_with_clipping(optimizer, tiny_hh_data, cpu_trainer):
    """The recipes clip gradients (1.0) under bf16-mixed where the hardware has it: Lightning refused a fused AdamW
    there ("performs unscaling of gradients internally") at the first step."""
    data = tiny_hh_data()
    torch.manual_seed(0)
    module = JointFinetuneModule("tiny-debug", CONTROLS["prefix"](), data.control_schema, optimizer=optimizer)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = cpu_trainer(2, precision="bf16-mixed", gradient_clip_val=1.0)
    trainer.fit(module, datamodule=data)
    after = dict(module.named_parameters())
    assert trainer.global_step == 2 and all(torch.isfinite(p).all() for p in after.values())
    assert not torch.equal(after["lm.model.embed_tokens.weight"], before["lm.model.embed_tokens.weight"])


def test_bad_memory_options_are_refused_with_the_fix(batch):
    schema, _ = batch
    with pytest.raises(ConfigError, match="optimizer 'sgd' is not one of adamw, adamw_foreach, adamw_fused, adamw_8bit"):
        JointFinetuneModule("tiny-debug", None, schema, optimizer="sgd")
    with pytest.raises(ConfigError, match="quantize 'int3' is not nf4 or null"):
        ControlTokenModule("tiny-debug", CONTROLS["prefix"](), schema, quantize="int3")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_the_8bit_optimizer_without_bitsandbytes_names_the_package(batch):
    schema, _ = batch
    module = JointFinetuneModule("tiny-debug", CONTROLS["prefix"](), schema, optimizer="adamw_8bit")
    module.configure_model()
    module.trainer = type("Trainer", (), {"estimated_stepping_batches": 10})()
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        module.configure_optimizers()


def test_a_4bit_base_on_a_cpu_is_refused_naming_the_requirement(batch):
    schema, _ = batch
    module = ControlTokenModule("tiny-debug", CONTROLS["prefix"](), schema, quantize="nf4")
    with pytest.raises(ConfigError, match="quantize: nf4 needs a CUDA GPU .*runs on cpu"):
        module.configure_model()


def test_fit_with_a_4bit_base_on_a_cpu_is_one_line_exit_2(tmp_path, shared_data, capsys):
    from meet_lightning.commands.cli import main

    args = ["fit", "--config", "meet_hh_prompt", "--config", "debug", "--output_dir", str(tmp_path / "run")]
    args += ["--data.path", str(shared_data / "hh_rlhf_harmless.train.jsonl.gz"), "--stage1.model.init_args.quantize", "nf4"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "quantize: nf4 needs a CUDA GPU" in err
    assert not (tmp_path / "run" / "recipe.yaml").exists() and not list((tmp_path / "run").rglob("*.ckpt"))


def test_stage2_in_bf16_true_starts_from_stage1_and_exports(tmp_path, shared_data):
    """bf16 weights (and optimizer state) in stage 2: Lightning builds the module under a bf16 default dtype,
    which made the tiny model initialise differently and stage 2 refuse stage 1's controls."""
    import json

    from meet_lightning.commands.cli import main
    from meet_lightning.inference.export import AlignedModel

    out = tmp_path / "run"
    args = ["fit", "--config", "meet_hh_prompt", "--config", "debug", "--output_dir", str(out)]
    args += ["--data.path", str(shared_data / "hh_rlhf_harmless.train.jsonl.gz"), "--stage2.trainer.precision", "bf16-true"]
    assert main(args) == 0
    assert json.loads((out / "stage2" / "done.json").read_text())["precision"] == "bf16-true"
    assert AlignedModel.from_pretrained(out / "export", dtype="float32").generate(["Hi"], control="good", max_new_tokens=4)


def test_a_4bit_stage_fingerprints_the_full_precision_base(batch):
    """A quantized LM's packed weights fingerprint as another model: stage 2 would refuse stage 1's controls."""
    from meet_lightning.models import load_model, model_fingerprint

    schema, _ = batch
    full = model_fingerprint(load_model("tiny-debug"))
    module = ControlTokenModule("tiny-debug", CONTROLS["prefix"](), schema, quantize="nf4")
    packed = load_model("tiny-debug")
    with torch.no_grad():  # stands in for the quantized copy: same names, other values
        for p in packed.parameters():
            p.mul_(0.5)
    assert model_fingerprint(packed) != full
    assert module.fingerprint_base(packed) == full
    assert ControlTokenModule("tiny-debug", CONTROLS["prefix"](), schema).fingerprint_base(packed) != full


def test_the_export_of_a_4bit_stage_holds_the_full_precision_base(tmp_path, shared_data):
    """The export is built without quantization (on a CPU, building a 4-bit stage again would stop the export)."""
    import yaml

    from meet_lightning.commands.cli import main
    from meet_lightning.inference.export import AlignedModel
    from meet_lightning.recipe import Recipe
    from meet_lightning.training.pipeline import export_run

    out = tmp_path / "run"
    args = ["fit", "--config", "meet_hh_prompt", "--config", "debug", "--output_dir", str(out), "--stage2.model", "null"]
    assert main([*args, "--data.path", str(shared_data / "hh_rlhf_harmless.train.jsonl.gz")]) == 0
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    recipe["stage1"]["model"]["init_args"]["quantize"] = "nf4"  # as a CUDA run that trained on a 4-bit base wrote it
    export_run(Recipe.from_dict(recipe), {}, log=lambda line: None)
    assert AlignedModel.from_pretrained(out / "export", dtype="float32").generate(["Hi"], control="good", max_new_tokens=4)


def test_compile_keeps_loss_and_gradients_for_every_control_in_one_process(batch):
    """A compiled decoder gives the eager loss and gradients, also for a LoRA model built after a prompt-tuning
    one in the same process (with dynamo's default hook guards it ran the first model's graph: another loss
    and no gradient for the LoRA controls)."""
    schema, rows = batch
    for name in ("prefix", "lora"):
        eager_loss, eager_grads, _ = loss_and_grads(JointFinetuneModule, name, schema, rows)
        loss, grads, _ = loss_and_grads(JointFinetuneModule, name, schema, rows, compile=True)
        torch.testing.assert_close(loss, eager_loss)
        assert grads.keys() == eager_grads.keys()
        for key, grad in eager_grads.items():
            torch.testing.assert_close(grads[key], grad, rtol=1e-4, atol=1e-6, msg=lambda m, key=key: f"{key}: {m}")
