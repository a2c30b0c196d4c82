"""Export: a Hugging Face model folder plus the control tokens, schema and model card; and loading it back.

``export/`` loads with plain ``transformers`` (``AutoModelForCausalLM.from_pretrained("export")``, LoRA on the
LM merged), and with :class:`AlignedModel` to generate under controls. Only safetensors and JSON are read.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from meet_lightning import __version__
from meet_lightning.controls.files import load_controls, save_controls
from meet_lightning.controls.tokens import ControlTokens, build_control
from meet_lightning.controls.vocab import add_control_vocabulary
from meet_lightning.data.rows import ControlSchema
from meet_lightning.data.tokenization import PromptTokenizer
from meet_lightning.errors import CheckpointError, ConfigError
from meet_lightning.inference.generation import ControlSpec, DecodingOptions, as_messages, generate_responses, resolve_controls
from meet_lightning.inference.model_card import model_card
from meet_lightning.inference.peft_export import write_peft_adapters
from meet_lightning.models import load_model, load_tokenizer, model_fingerprint
from meet_lightning.names import public_value, without_local_paths
from meet_lightning.precision import resolve_dtype

SCHEMA_FILE = "meet_schema.json"
CONTROLS_FILE = "controls.safetensors"


def export_model(
    folder: Path,
    lm: torch.nn.Module,
    tokenizer: Any,
    control: ControlTokens,
    schema: ControlSchema,
    base_model: str,
    base_fingerprint: str,
    metadata: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
) -> None:
    """Writes ``folder`` (replacing it atomically): HF model + tokenizer, controls, schema and model card.

    Args:
        folder: The export folder.
        lm: The LM to save (LoRA on the LM already merged: plain ``transformers`` must load it).
        tokenizer: Its tokenizer.
        control: The trained controls.
        schema: The run's preferences and controls.
        base_model: Name or path of the base LM the controls were trained on.
        base_fingerprint: Its fingerprint (:func:`~meet_lightning.models.model_fingerprint`).
        metadata: More schema fields (DPO: objective, reference model).
        recipe: The resolved recipe, for the model card and the data source.
        metrics: Final metrics, for the model card.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    lm, tokenizer, vocabulary = with_control_vocabulary(lm, tokenizer, control, schema)
    lm.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    save_controls(control, tmp / CONTROLS_FILE, schema, base_fingerprint)
    lora = control.lora_weights()
    info = {
        "preferences": schema.to_dict(),
        "controls": schema.names,
        "control": control.config(),
        "placement": control.placement,
        # An export is meant to be published: local paths are kept as base names (hub ids as they are).
        "base_model": public_value(base_model),
        "base_fingerprint": base_fingerprint,
        "lm_fingerprint": model_fingerprint(lm),
        "data": without_local_paths((recipe or {}).get("data")),
        "library_version": __version__,
        "vocabulary": vocabulary,
        "adapters": write_peft_adapters(tmp, lora, schema) if lora is not None else None,
        **without_local_paths(metadata or {}),
    }
    (tmp / SCHEMA_FILE).write_text(json.dumps(info, indent=2))
    (tmp / "README.md").write_text(model_card(info, recipe, metrics))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def with_control_vocabulary(
    lm: torch.nn.Module, tokenizer: Any, control: ControlTokens, schema: ControlSchema
) -> tuple[torch.nn.Module, Any, dict[str, Any] | None]:
    """``lm`` and a copy of ``tokenizer`` that plain ``transformers`` steers (see :mod:`meet_lightning.controls.vocab`).

    Input-vector controls (prompt tuning, special tokens) become added tokens, whose output rows never win (a
    tied head is untied first); every export's generation config stops at the end of the assistant turn.
    ``lm`` is extended in place (a copy would double the memory of a large model; the export's caller discards
    it). Returns both and the schema's ``vocabulary`` entry (``None`` when the controls are not input vectors).
    """
    tokenizer = copy.deepcopy(tokenizer)
    encoder = PromptTokenizer(tokenizer, 1)
    lm.generation_config.eos_token_id = sorted({encoder.eot_id, tokenizer.eos_token_id} - {None})
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    vectors = control.input_vectors()
    if vectors is None or not schema.num_controls:
        return lm, tokenizer, None
    rows = lm.get_input_embeddings().weight.shape[0]
    head = lm.get_output_embeddings()
    tied = head is not None and head.weight is lm.get_input_embeddings().weight  # the export unties it
    ids = add_control_vocabulary(lm, tokenizer, vectors.float(), schema, control.placement, encoder.bos_first)
    vocabulary = {"token_ids": ids, "tokens_per_control": vectors.shape[1], "base_rows": rows, "untied_head": tied}
    return lm, tokenizer, {**vocabulary, "template_variable": "controls"}


def without_control_vocabulary(lm: torch.nn.Module, vocabulary: Mapping[str, Any]) -> None:
    """Drops the added control rows again (in place), so the LM scores and generates exactly as trained.

    The added rows are output classes too: kept, they would enter every log-softmax's normaliser and shift
    ``evaluate``'s log-probs from the trained model's. ``AlignedModel`` splices the vectors in itself. A head the
    export untied (``untied_head``: its other rows are copies of the input embeddings) is tied again, as trained.
    """
    lm.resize_token_embeddings(vocabulary["base_rows"])
    if vocabulary.get("untied_head"):
        lm.get_output_embeddings().weight = lm.get_input_embeddings().weight
        for config in {id(c): c for c in (lm.config, lm.config.get_text_config())}.values():
            config.tie_word_embeddings = True
    added = set(vocabulary["token_ids"])
    suppressed = [t for t in lm.generation_config.suppress_tokens or [] if t not in added]
    lm.generation_config.suppress_tokens = suppressed or None


SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_SCHEMA_FIELDS = {"preferences": dict, "controls": list, "control": dict, "base_fingerprint": str}


def read_schema(folder: Path) -> dict[str, Any]:
    """An export's ``meet_schema.json``; CheckpointError when the folder, the file or one of its fields is wrong."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder — pass the export/ folder of a meet_lightning run")
    schema_file = folder / SCHEMA_FILE
    if not schema_file.is_file():
        raise CheckpointError(f"{folder}: no {SCHEMA_FILE} — pass the export/ folder of a meet_lightning run")
    try:
        info = json.loads(schema_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{schema_file}: not valid JSON ({error}) — export the run again") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{schema_file}: not a JSON object — export the run again")
    wrong = [f"{key} (want a {kind.__name__})" for key, kind in _SCHEMA_FIELDS.items() if not isinstance(info.get(key), kind)]
    if wrong:
        raise CheckpointError(f"{schema_file}: missing or wrong fields: {', '.join(wrong)} — export the run again")
    return info


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
    def from_pretrained(cls, folder: str | Path, dtype: str = "auto", device: str = "cpu") -> AlignedModel:
        """Loads ``export/`` (safetensors + JSON only: a pickle file in the folder is never opened).

        Args:
            folder: The ``export/`` folder of a run.
            dtype: Weights dtype: ``auto`` (bfloat16 where ``device`` computes it natively, else float32 — see
                :mod:`meet_lightning.precision`), ``float32``, ``bfloat16`` or ``float16``.
            device: Where the model runs.
        """
        folder = Path(folder)
        info = read_schema(folder)
        schema = ControlSchema.from_dict(info["preferences"])
        try:
            weights_dtype, _ = resolve_dtype(dtype, device)
        except ValueError as error:
            raise ConfigError(f"{error} — pass one of them") from None
        if not any((folder / name).is_file() for name in SAFETENSORS_WEIGHTS):
            raise CheckpointError(
                f"{folder}: no model.safetensors — exports hold safetensors only (pickle weights are never loaded);"
                " export the run again"
            )
        tokenizer = load_tokenizer(str(folder))
        lm = load_model(str(folder), weights_dtype).to(device)
        if info.get("vocabulary"):
            without_control_vocabulary(lm, info["vocabulary"])
        control = build_control(info["control"])
        control.setup(lm, tokenizer, schema)
        # the same schema, control settings and base model as the schema file says, or a one-line error
        load_controls(control, folder / CONTROLS_FILE, schema, info["base_fingerprint"])
        return cls(lm, tokenizer, control.to(device), schema)

    @property
    def controls(self) -> list[str]:
        """Every ``preference/control`` this model knows."""
        return self.schema.names

    def generate(
        self,
        prompts: Sequence[str | Sequence[Mapping[str, str]]],
        control: ControlSpec = None,
        controls: Sequence[ControlSpec] | None = None,
        options: DecodingOptions | None = None,
        progress: bool = False,
        streamer: Any = None,
        **decoding: Any,
    ) -> list[str]:
        """Responses to ``prompts``.

        Args:
            prompts: User messages, or chat message lists.
            control: One choice for every prompt: ``"good"``, ``["harmless/good", "concise"]`` (several
                preferences), ``{"harmless": "good"}``, or ``None`` (no control).
            controls: Instead of ``control``, one choice per prompt (a mixed batch).
            options: How to decode (:class:`~meet_lightning.inference.generation.DecodingOptions`: ``max_new_tokens``,
                ``temperature`` (0 = greedy), ``top_p``, ``top_k``, ``repetition_penalty``, ``batch_size``,
                ``cache``). Its ``seed`` is not applied here: seed torch yourself for reproducible samples.
            progress: Draw a progress bar over batches on stderr.
            streamer: A transformers streamer that receives new tokens as they come (one prompt at a time).
            **decoding: Any of those options by name, over ``options``: ``generate(p, max_new_tokens=64)``.
        """
        if controls is not None and (control is not None or len(controls) != len(prompts)):
            raise ConfigError(f"controls= needs one choice per prompt ({len(prompts)}), without control= — pass one of them")
        specs = list(controls) if controls is not None else [control] * len(prompts)
        ids = [resolve_controls(self.schema, spec) for spec in specs]
        messages = [as_messages(p, f"prompt {i + 1}") for i, p in enumerate(prompts)]
        options = dataclasses.replace(options or DecodingOptions(), **decoding)
        return generate_responses(
            self.lm, self.tokenizer, self.control, messages, ids, options, progress=progress, streamer=streamer
        )
