"""Data: raw preference files in, tokenized batches out.

``formats`` turns each supported layout (pairwise, pointwise scores, rankings, …) into the canonical ``rows``;
``heldout`` keeps validation held out; ``tokenization`` and ``cache`` tokenize once and collate; ``streaming``
reads sources too large for memory. These are core (torch and transformers only). ``datamodule`` holds the one
Lightning :class:`PreferenceDataModule` every stage and baseline trains from. This file imports none of them, so the
core can use its siblings without importing Lightning.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

_MOVED = ("PreferenceDataModule", "ResumableBatchSampler", "ResumableDataLoader")
"""The names of ``meet_lightning/data.py``, the data module's own file until the folders came (now ``datamodule``)."""


def __getattr__(name: str) -> Any:
    # Only the old file's names, and only when asked for: `from meet_lightning.data import formats` must not
    # import Lightning (the import system asks this function for `formats` before it imports the submodule).
    if name not in _MOVED:
        raise AttributeError(f"module 'meet_lightning.data' has no attribute {name!r}")
    new = "meet_lightning.data.datamodule"
    warnings.warn(f"meet_lightning.data.{name} moved to {new}; the old path goes in 0.2", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(new), name)
