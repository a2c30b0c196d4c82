"""Models opened for scoring: :class:`EvalModel` from an export folder or any plain causal LM, and a DPO
export's reference model (only from where its schema may safely point).

:data:`NO_CONTROL` names the mode of a model run without any control; the pairwise and generation metrics
share it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meet_lightning.controls.tokens import ControlTokens
from meet_lightning.data.rows import ControlSchema
from meet_lightning.errors import CheckpointError, ConfigError
from meet_lightning.inference.export import SCHEMA_FILE, AlignedModel
from meet_lightning.models import load_model, load_tokenizer, model_fingerprint
from meet_lightning.precision import resolve_dtype

NO_CONTROL = "none"
"""Name of the mode without any control (plain generation)."""


@dataclass
class EvalModel:
    """A model ready to be scored.

    Attributes:
        name: What the user passed (folder or alias).
        lm: The causal LM (eval mode).
        tokenizer: Its tokenizer.
        control: The control implementation (the no-op :class:`ControlTokens` for plain models).
        schema: Preferences and controls (empty for plain Hugging Face models).
        info: The export's ``meet_schema.json`` (empty for plain models).
    """

    name: str
    lm: nn.Module
    tokenizer: Any
    control: ControlTokens
    schema: ControlSchema
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def has_controls(self) -> bool:
        """Whether choosing a control changes the model's input (so the control classifier applies)."""
        return self.schema.num_controls > 0 and self.control.steers

    @property
    def is_dpo(self) -> bool:
        """Whether the export is a DPO model (its implicit reward needs the reference)."""
        return self.info.get("objective") == "dpo"

    @property
    def kind(self) -> str:
        """``dpo``, ``controls`` or ``plain``."""
        return "dpo" if self.is_dpo else "controls" if self.has_controls else "plain"

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device


def load_for_evaluation(name: str, device: str = "cpu", dtype: str = "auto") -> EvalModel:
    """An export folder (with its controls and schema), or any plain causal LM: folder, alias or hub id.

    ``dtype`` ``auto`` loads bfloat16 weights where ``device`` computes bf16 natively, else float32.
    """
    if (Path(name) / SCHEMA_FILE).is_file():
        model = AlignedModel.from_pretrained(name, dtype=dtype, device=device)
        info = json.loads((Path(name) / SCHEMA_FILE).read_text())
        return EvalModel(name, model.lm, model.tokenizer, model.control, model.schema, info)
    try:
        weights_dtype, _ = resolve_dtype(dtype, device)
    except ValueError as error:
        raise ConfigError(f"--dtype: {error}") from None
    lm = load_model(name, weights_dtype).to(device).eval()
    return EvalModel(name, lm, load_tokenizer(name), ControlTokens().to(device), ControlSchema({}))


def load_reference(model: EvalModel, override: str | None = None) -> nn.Module:
    """The reference of a DPO export: ``override``, else the base model its schema names; checked by fingerprint."""
    name = (
        override
        or schema_model_name(model, "reference_model", "--reference_model")
        or schema_model_name(model, "base_model", "--reference_model")
    )
    if not name:
        raise CheckpointError(f"{model.name}: the DPO export names no reference model — pass --reference_model DIR")
    reference = load_model(name).to(model.device).eval()  # float32: the fingerprint is of the weights as trained
    expected = model.info.get("base_fingerprint")
    if expected and model_fingerprint(reference) != expected:
        raise CheckpointError(
            f"reference {name} is not the model {model.name} was trained against (fingerprint ≠ {expected}) — pass --reference_model with that base model"
        )
    return reference.to(model.lm.dtype)


def schema_model_name(model: EvalModel, key: str, flag: str) -> str | None:
    """A model named by the export's ``meet_schema.json`` (``base_model``, ``reference_model``), if it is safe to open.

    The schema is a file from elsewhere: an alias or hub id is fine, but a filesystem path in it must stay inside
    the export folder; anything else is refused (the user can still pass that path explicitly with ``flag``).
    """
    name = model.info.get(key)
    if not name:
        return None
    if not isinstance(name, str):
        raise CheckpointError(f"{model.name}/meet_schema.json: {key} is not text — export the run again, or pass {flag}")
    path = Path(name).expanduser()
    path_like = path.is_absolute() or ".." in path.parts or name.startswith((".", "~")) or path.exists()
    if path_like and not path.resolve().is_relative_to(Path(model.name).resolve()):
        raise CheckpointError(
            f"{model.name}/meet_schema.json names {key} {name!r}, a path outside the export folder: not opened"
            f" — pass {flag} {name} yourself if you trust it"
        )
    return name
