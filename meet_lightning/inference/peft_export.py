"""LoRA controls as standard PEFT adapters: each control a folder that ``peft`` and serving engines load.

``export/adapters/<preference>/<label>/`` holds ``adapter_config.json`` and ``adapter_model.safetensors`` for
one control, on top of the exported LM (the export's root folder)::

    lm = AutoModelForCausalLM.from_pretrained("export")
    model = PeftModel.from_pretrained(lm, "export/adapters/length/concise", adapter_name="length/concise")

Several preferences at once are the sum of their deltas, as in training. PEFT gives it two ways, both written
or shown here: several adapters active at once (``model.base_model.set_adapter([...])``), or one adapter per
combination that the export writes to ``export/adapters/combined/<pref>-<label>+<pref>-<label>/`` — the factors
concatenated along the rank (rank ``Σ r``, ``lora_alpha`` scaled so that every part keeps ``alpha / r``), which
is the exact sum and what an engine serving one adapter per request (vLLM multi-LoRA) needs.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from meet_lightning.controls.tokens import LoRAWeights
from meet_lightning.data.rows import ControlSchema
from meet_lightning.names import safe_path

ADAPTERS_DIR = "adapters"
COMBINED_DIR = "combined"


def write_peft_adapters(folder: Path, weights: LoRAWeights, schema: ControlSchema) -> dict[str, str]:
    """Writes every control of ``schema`` (and every combination of one label per preference) as a PEFT adapter.

    Args:
        folder: The export folder being written (adapters go under ``folder/adapters``).
        weights: The trained LoRA factors (:meth:`~meet_lightning.controls.tokens.ControlTokens.lora_weights`).
        schema: The run's preferences and controls.

    Returns:
        ``{"preference/label" or "a/x+b/y": adapter folder relative to folder}`` for the schema file.

    Raises:
        ConfigError: A preference or label name that is not one plain folder name, or a folder that would resolve
            outside ``folder`` (:func:`~meet_lightning.names.safe_path`); nothing is written then.
    """
    # Every folder is planned (one plain name per level, resolved under folder) before the first is written.
    plan: list[tuple[str, Path, list[int]]] = []
    for control_id, (preference, label) in enumerate(_pairs(schema)):
        plan.append((f"{preference}/{label}", safe_path(folder, ADAPTERS_DIR, preference, label), [control_id]))
    if len(schema.preferences) > 1:
        for combination in itertools.product(*([f"{p}/{label}" for label in labels] for p, labels in schema.preferences.items())):
            leaf = "+".join(n.replace("/", "-") for n in combination)
            ids = [schema.names.index(n) for n in combination]
            plan.append(("+".join(combination), safe_path(folder, ADAPTERS_DIR, COMBINED_DIR, leaf), ids))
    written: dict[str, str] = {}
    for name, path, control_ids in plan:
        _write_adapter(path, weights, control_ids)
        written[name] = path.relative_to(folder).as_posix()
    return written


def _pairs(schema: ControlSchema) -> list[tuple[str, str]]:
    """``(preference, label)`` for every global id, in id order."""
    return [(preference, label) for preference, labels in schema.preferences.items() for label in labels]


def _write_adapter(folder: Path, weights: LoRAWeights, control_ids: list[int]) -> None:
    """One adapter folder: the sum of ``control_ids``' deltas as one LoRA of rank ``len(control_ids) · r``."""
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b) in weights.layers.items():  # a: (C, r, in), b: (C, out, r)
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = torch.cat([a[c] for c in control_ids], 0).contiguous()  # (k·r, in)
        tensors[f"{prefix}.lora_B.weight"] = torch.cat([b[c] for c in control_ids], 1).contiguous()  # (out, k·r)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    rank = weights.rank * len(control_ids)
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config(weights, rank), indent=2) + "\n")


def adapter_config(weights: LoRAWeights, rank: int) -> dict[str, Any]:
    """A PEFT LoRA config whose scaling ``lora_alpha / r`` equals the training's ``alpha / rank``."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": weights.alpha * rank / weights.rank,
        "target_modules": weights.target_modules,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        # The base is the export's own LM (the folder two or three levels up), not the hub model it came from.
        "base_model_name_or_path": None,
    }
