"""meet_lightning: align language models to several preferences with learned control tokens (MEET).

Imports are lazy so ``python -m meet_lightning --help`` and YAML ``class_path`` lookups stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ControlTokens": "meet_lightning.control",
    "PromptTuningControl": "meet_lightning.control",
    "LoRAControl": "meet_lightning.control",
    "TextControl": "meet_lightning.control",
    "SpecialTokenControl": "meet_lightning.control",
    "PreferenceDataModule": "meet_lightning.data",
    "SourceConfig": "meet_lightning.formats",
    "DataFormat": "meet_lightning.formats",
    "ParsedRecord": "meet_lightning.formats",
    "BadRow": "meet_lightning.formats",
    "register_format": "meet_lightning.formats",
    "ControlledExample": "meet_lightning.examples",
    "PreferencePair": "meet_lightning.examples",
    "MeetModule": "meet_lightning.modules.base",
    "ControlTokenModule": "meet_lightning.modules.stage1",
    "JointFinetuneModule": "meet_lightning.modules.stage2",
    "SFTModule": "meet_lightning.modules.baselines",
    "DPOModule": "meet_lightning.modules.baselines",
    "HybridDPOModule": "meet_lightning.modules.baselines",
    "SampleGenerations": "meet_lightning.callbacks",
    "AlignedModel": "meet_lightning.export",
    "NoSplitModulesPolicy": "meet_lightning.distributed",
    "Recipe": "meet_lightning.recipe",
    "StageSpec": "meet_lightning.recipe",
    "DecodingOptions": "meet_lightning.generation",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'meet_lightning' has no attribute {name!r}")
