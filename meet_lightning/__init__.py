"""meet_lightning: align language models to several preferences with learned control tokens (MEET).

Imports are lazy so ``python -m meet_lightning --help`` and YAML ``class_path`` lookups stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from meet_lightning import _moved

__version__ = "0.1.0"

_EXPORTS = {
    "ControlTokens": "meet_lightning.controls.tokens",
    "PromptTuningControl": "meet_lightning.controls.tokens",
    "LoRAControl": "meet_lightning.controls.tokens",
    "TextControl": "meet_lightning.controls.tokens",
    "SpecialTokenControl": "meet_lightning.controls.tokens",
    "PreferenceDataModule": "meet_lightning.data.datamodule",
    "SourceConfig": "meet_lightning.data.formats",
    "DataFormat": "meet_lightning.data.formats",
    "ParsedRecord": "meet_lightning.data.formats",
    "BadRow": "meet_lightning.data.formats",
    "register_format": "meet_lightning.data.formats",
    "ControlledExample": "meet_lightning.data.rows",
    "PreferencePair": "meet_lightning.data.rows",
    "MeetModule": "meet_lightning.modules.base",
    "ControlTokenModule": "meet_lightning.modules.stage1",
    "JointFinetuneModule": "meet_lightning.modules.stage2",
    "SFTModule": "meet_lightning.modules.baselines",
    "DPOModule": "meet_lightning.modules.baselines",
    "HybridDPOModule": "meet_lightning.modules.baselines",
    "SampleGenerations": "meet_lightning.training.callbacks",
    "AlignedModel": "meet_lightning.inference.export",
    "NoSplitModulesPolicy": "meet_lightning.training.distributed",
    "Recipe": "meet_lightning.recipe",
    "StageSpec": "meet_lightning.recipe",
    "DecodingOptions": "meet_lightning.inference.generation",
}

__all__ = [*_EXPORTS, "__version__"]

_moved.install()  # old module paths (`meet_lightning.control`, …) still import, for one release


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'meet_lightning' has no attribute {name!r}")
