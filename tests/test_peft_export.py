"""LoRA controls exported as standard PEFT adapters: peft + transformers, without this library, generate what
``AlignedModel`` does for each control and for a combination of preferences."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

from meet_lightning.controls.tokens import LoRAControl
from meet_lightning.data.rows import ControlSchema
from meet_lightning.inference.export import AlignedModel, export_model, read_schema
from meet_lightning.models import load_model, load_tokenizer, model_fingerprint

SCHEMA = ControlSchema.from_dict({"length": ["concise", "verbose"], "harmless": ["good", "bad"]})
MESSAGES = [{"role": "user", "content": "How do I boil an egg?"}]


def export_lora(folder) -> AlignedModel:
    """A tiny LM with LoRA controls whose B factors are random (an untrained B is zero and changes nothing)."""
    torch.manual_seed(0)
    lm, tokenizer = load_model("tiny-debug"), load_tokenizer("tiny-debug")
    control = LoRAControl(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "down_proj"])
    control.setup(lm, tokenizer, SCHEMA)
    with torch.no_grad():  # larger weights than the default init: greedy output that depends on the adapters
        for name, weight in lm.named_parameters():
            weight.normal_(1.0 if "norm" in name else 0.0, 0.3 if "norm" in name else 0.15)
        for b in control.lora_b.values():
            b.normal_(0.0, 0.3)
    export_model(folder, lm, tokenizer, control, SCHEMA, "tiny-debug", model_fingerprint(lm))
    return AlignedModel.from_pretrained(folder, dtype="float32")


PEFT_ONLY = textwrap.dedent(
    """
    import json, sys
    sys.modules["meet_lightning"] = None  # this process cannot use the library
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, adapters = sys.argv[1], json.loads(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How do I boil an egg?"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )

    def answer(model):
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1]:]
        return tokenizer.decode(out, skip_special_tokens=True).strip()

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), f"{folder}/{adapters['length/concise']}",
                                      adapter_name="length/concise").eval()
    for name in ("length/verbose", "harmless/good", "harmless/bad"):
        model.load_adapter(f"{folder}/{adapters[name]}", adapter_name=name)
    result = {}
    for name in ("length/concise", "length/verbose", "harmless/bad"):
        model.set_adapter(name)
        result[name] = answer(model)
    model.base_model.set_adapter(["length/verbose", "harmless/good"])  # several active adapters: their sum
    result["active: length/verbose + harmless/good"] = answer(model)
    combined = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder),
                                         f"{folder}/{adapters['length/verbose+harmless/good']}").eval()
    result["combined: length/verbose + harmless/good"] = answer(combined)
    with model.disable_adapter():
        result["none"] = answer(model)
    print(json.dumps(result))
    """
)


def test_peft_loads_each_lora_control_and_generates_what_aligned_model_does(tmp_path):
    model = export_lora(tmp_path / "export")
    adapters = read_schema(tmp_path / "export")["adapters"]
    run = subprocess.run(
        [sys.executable, "-c", PEFT_ONLY, str(tmp_path / "export"), json.dumps(adapters)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    plain = json.loads(run.stdout.strip().splitlines()[-1])

    def ours(control):
        return model.generate([MESSAGES], control=control, max_new_tokens=12)[0]

    both = ours(["length/verbose", "harmless/good"])
    assert plain == {
        "length/concise": ours("length/concise"),
        "length/verbose": ours("length/verbose"),
        "harmless/bad": ours("harmless/bad"),
        "active: length/verbose + harmless/good": both,
        "combined: length/verbose + harmless/good": both,
        "none": ours(None),
    }
    # every control and the combination answer differently: the comparison could fail
    assert len(set(plain.values()) - {plain["active: length/verbose + harmless/good"]}) == 4


def test_the_export_writes_one_adapter_per_control_and_one_per_full_combination(tmp_path):
    export_lora(tmp_path / "export")
    adapters = read_schema(tmp_path / "export")["adapters"]
    assert set(adapters) == {
        *SCHEMA.names,
        *(f"length/{a}+harmless/{b}" for a in ("concise", "verbose") for b in ("good", "bad")),
    }
    single = json.loads((tmp_path / "export" / adapters["length/concise"] / "adapter_config.json").read_text())
    combined_dir = tmp_path / "export" / adapters["length/concise+harmless/bad"]
    combined = json.loads((combined_dir / "adapter_config.json").read_text())
    assert (single["r"], single["lora_alpha"], combined["r"], combined["lora_alpha"]) == (4, 8.0, 8, 16.0)
    assert single["target_modules"] == ["q_proj", "v_proj", "down_proj"]
    tensors = load_file(str(combined_dir / "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert a.shape[0] == b.shape[1] == 8


def test_prompt_tuning_exports_have_no_adapters(tmp_path):
    from meet_lightning.controls.tokens import PromptTuningControl

    lm, tokenizer = load_model("tiny-debug"), load_tokenizer("tiny-debug")
    control = PromptTuningControl(num_tokens=2, init="random")
    control.setup(lm, tokenizer, SCHEMA)
    export_model(tmp_path / "export", lm, tokenizer, control, SCHEMA, "tiny-debug", model_fingerprint(lm))
    assert read_schema(tmp_path / "export")["adapters"] is None
    assert not (tmp_path / "export" / "adapters").exists()
