"""Export: a Hugging Face model folder plus the control tokens, schema and model card; and loading it back.

``export/`` loads with plain ``transformers`` (``AutoModelForCausalLM.from_pretrained("export")``, LoRA on the
LM merged), and with :class:`AlignedModel` to generate under controls. Only safetensors and JSON are read.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from meet_lightning import __version__
from meet_lightning.control import ControlTokens
from meet_lightning.controls_io import read_controls_metadata, save_controls
from meet_lightning.errors import CheckpointError
from meet_lightning.examples import ControlSchema
from meet_lightning.generation import ControlSpec, as_messages, generate_responses, resolve_controls
from meet_lightning.models import load_model, load_tokenizer, model_fingerprint
from meet_lightning.modules.base import DTYPES, MeetModule, build_control

SCHEMA_FILE = "meet_schema.json"
CONTROLS_FILE = "controls.safetensors"


def export_run(recipe: Mapping[str, Any], metrics: Mapping[str, Any], log=print) -> Path:
    """Exports the last stage of a finished run to ``output_dir/export``.

    The module class comes from the recipe (which the user wrote), never from the checkpoint file.
    """
    from meet_lightning.pipeline import active_stages, build_stage, restore_module

    stage = active_stages(recipe)[-1]
    module = build_stage(recipe, stage).model
    restore_module(module, Path(recipe["output_dir"]) / stage / "checkpoints" / "last.ckpt")
    folder = Path(recipe["output_dir"]) / "export"
    export_model(module, folder, recipe=recipe, metrics=metrics)
    log(f"exported to {folder}")
    return folder


def export_model(
    module: MeetModule, folder: Path, recipe: Mapping[str, Any] | None = None, metrics: Mapping[str, Any] | None = None
) -> None:
    """Writes ``folder`` (replacing it atomically): HF model + tokenizer, controls, schema and model card."""
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm = module.merged_lm() if hasattr(module, "merged_lm") else module.lm
    lm.save_pretrained(tmp, safe_serialization=True)
    module.tokenizer.save_pretrained(tmp)
    save_controls(module.control, tmp / CONTROLS_FILE, module.schema, module.base_fingerprint)
    schema = {
        "preferences": module.schema.to_dict(),
        "controls": module.schema.names,
        "control": module.control.config(),
        "placement": module.control.placement,
        "base_model": module.hparams.model_name_or_path,
        "base_fingerprint": module.base_fingerprint,
        "lm_fingerprint": model_fingerprint(lm),
        "data": (recipe or {}).get("data"),
        "library_version": __version__,
        **(module.export_metadata() if hasattr(module, "export_metadata") else {}),  # e.g. DPO: objective, reference
    }
    (tmp / SCHEMA_FILE).write_text(json.dumps(schema, indent=2))
    (tmp / "README.md").write_text(model_card(schema, recipe, metrics))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def model_card(schema: Mapping[str, Any], recipe: Mapping[str, Any] | None, metrics: Mapping[str, Any] | None) -> str:
    """A short model card: base model, data and licence note, controls, metrics, the resolved recipe."""
    data = schema.get("data") or {}
    example = schema["controls"][0].split("/", 1)[1] if schema["controls"] else None
    sources = [data.get("path")] if data.get("path") else [s.get("path") for s in data.get("sources") or []]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [meet_lightning, control-tokens, alignment]",
        "---",
        "",
        f"# MEET-aligned {schema['base_model']}",
        "",
        f"Trained with meet_lightning {schema['library_version']} (MEET, arXiv 2310.00819).",
        "",
        f"- Base model: `{schema['base_model']}` (fingerprint `{schema['base_fingerprint']}`)",
        f"- Data: {', '.join(f'`{s}`' for s in sources) or 'unknown'} — the data's own licence applies to this model's use",
        f"- Controls: {', '.join(f'`{c}`' for c in schema['controls'])} ({schema['control']['class_path']}, placement `{schema['placement']}`)",
        "",
        "## Metrics",
        "",
        "```json",
        json.dumps(metrics or {}, indent=2),
        "```",
        "",
        "## Use",
        "",
        "```python",
        "from meet_lightning import AlignedModel",
        'model = AlignedModel.from_pretrained("path/to/export")',
        f'print(model.generate(["How do I boil an egg?"], control={example!r}))',
        "```",
        "",
        "## Recipe",
        "",
        "```yaml",
        yaml.safe_dump(dict(recipe or {}), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


class AlignedModel:
    """An exported model that generates under chosen controls.

    Args:
        lm: The causal LM.
        tokenizer: Its tokenizer.
        control: The control implementation, built and loaded.
        schema: The run's preferences and controls.
    """

    def __init__(self, lm: torch.nn.Module, tokenizer: Any, control: ControlTokens, schema: ControlSchema) -> None:
        self.lm, self.tokenizer, self.control, self.schema = lm.eval(), tokenizer, control, schema

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: str = "float32", device: str = "cpu") -> AlignedModel:
        """Loads ``export/`` (safetensors + JSON only)."""
        folder = Path(folder)
        schema_file = folder / SCHEMA_FILE
        if not schema_file.is_file():
            raise CheckpointError(f"{folder}: no {SCHEMA_FILE} — pass the export/ folder of a meet_lightning run")
        info = json.loads(schema_file.read_text())
        schema = ControlSchema.from_dict(info["preferences"])
        tokenizer = load_tokenizer(str(folder))
        lm = load_model(str(folder), DTYPES[dtype]).to(device)
        control = build_control(info["control"])
        control.setup(lm, tokenizer, schema)
        read_controls_metadata(folder / CONTROLS_FILE)
        control.load_state_dict(load_file(str(folder / CONTROLS_FILE)), strict=True)
        return cls(lm, tokenizer, control.to(device), schema)

    @property
    def controls(self) -> list[str]:
        """Every ``preference/control`` this model knows."""
        return self.schema.names

    def generate(
        self,
        prompts: Sequence[str | Sequence[Mapping[str, str]]],
        control: ControlSpec | Sequence[ControlSpec] = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        batch_size: int = 8,
    ) -> list[str]:
        """Responses to ``prompts``.

        Args:
            prompts: User messages, or chat message lists.
            control: One choice for every prompt (``"good"``, ``["harmless/good", "concise"]``,
                ``{"harmless": "good"}``) or a list with one choice per prompt (mixed batch).
            max_new_tokens: Longest response.
            temperature: 0 for greedy decoding.
            batch_size: Prompts per generate call.
        """
        per_prompt = isinstance(control, list) and len(control) == len(prompts) and not all(isinstance(c, str) for c in control)
        specs = list(control) if per_prompt else [control] * len(prompts)
        ids = [resolve_controls(self.schema, spec) for spec in specs]
        messages = [as_messages(p, f"prompt {i + 1}") for i, p in enumerate(prompts)]
        return generate_responses(self.lm, self.tokenizer, self.control, messages, ids, max_new_tokens, temperature, batch_size)
