"""Control tokens on disk: ``controls.safetensors`` with the schema, control config and base model inside."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from meet_lightning._moved import current_name
from meet_lightning.atomic import write_bytes_atomic
from meet_lightning.controls.tokens import ControlTokens
from meet_lightning.data.rows import ControlSchema
from meet_lightning.errors import CheckpointError


def save_controls(control: ControlTokens, path: Path, schema: ControlSchema, fingerprint: str) -> None:
    """Writes the control parameters atomically (:func:`~meet_lightning.atomic.write_atomic`)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in control.state_dict().items()}
    metadata = {
        "schema": json.dumps(schema.to_dict()),
        "control": json.dumps(control.config()),
        "fingerprint": fingerprint,
        "format": "meet_lightning.controls/1",
    }
    write_bytes_atomic(path, save(tensors, metadata=metadata))


def read_controls_metadata(path: Path) -> dict[str, str]:
    """The metadata of a controls file; CheckpointError when it is missing, truncated or not ours."""
    if not path.is_file():
        raise CheckpointError(f"{path}: controls file not found — run stage 1 first or fix init_controls")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error}) — re-run stage 1 to write it again") from None
    if metadata.get("format") != "meet_lightning.controls/1":
        raise CheckpointError(f"{path}: not a meet_lightning controls file — pass the stage1/controls.safetensors of a run")
    return metadata


def load_controls(control: ControlTokens, path: Path, schema: ControlSchema, fingerprint: str) -> None:
    """Loads controls into ``control``, refusing another schema, control type or base model."""
    metadata = read_controls_metadata(path)
    saved_schema = json.loads(metadata["schema"])
    if saved_schema != schema.to_dict():
        raise CheckpointError(
            f"{path}: control schema {saved_schema} ≠ this run's {schema.to_dict()} — train stage 1 on the same preferences"
        )
    saved_control = json.loads(metadata["control"])
    # A file written before the modules moved names its class the old way (meet_lightning.control.…): same class.
    saved_control["class_path"] = current_name(saved_control.get("class_path", ""))
    if saved_control != control.config():
        raise CheckpointError(
            f"{path}: written by {saved_control} but this run uses {control.config()} — use the same control settings in both stages"
        )
    if metadata["fingerprint"] != fingerprint:
        raise CheckpointError(
            f"{path}: trained on another base model (fingerprint {metadata['fingerprint']} ≠ {fingerprint}) — use the same model_name_or_path"
        )
    tensors = load_file(str(path))
    control.load_state_dict(tensors, strict=True)
