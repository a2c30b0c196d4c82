"""The modules' paths before the package had folders, kept importable for one release (until 0.2).

``import meet_lightning.control`` (or a recipe's ``class_path: meet_lightning.control.PromptTuningControl``) still
works: a finder on ``sys.meta_path`` answers each old name with the module at its new path, the same module object,
and warns once with the new path. ``meet_lightning.data`` needs no entry: it is now the ``data`` folder, whose
``__init__`` forwards the data module's names.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {
    "examples": "data.rows",
    "formats": "data.formats",
    "heldout": "data.heldout",
    "tokenization": "data.tokenization",
    "tokenized_cache": "data.cache",
    "streaming": "data.streaming",
    "control": "controls.tokens",
    "control_vocab": "controls.vocab",
    "controls_io": "controls.files",
    "steering": "controls.steering",
    "pipeline": "training.pipeline",
    "callbacks": "training.callbacks",
    "reliability": "training.reliability",
    "distributed": "training.distributed",
    "generation": "inference.generation",
    "export": "inference.export",
    "peft_export": "inference.peft_export",
    "model_card": "inference.model_card",
    "publish": "inference.publish",
    "chat": "inference.chat",
    "serve": "inference.serve",
    "playground": "inference.playground",
    "evaluate": "evaluation.metrics",
    "report": "evaluation.run",
    "plots": "evaluation.plots",
    "figures": "evaluation.figures",
    "cli": "commands.cli",
    "inference_cli": "commands.inference",
    "demo": "commands.demo",
    "inspect_data": "commands.inspect_data",
}


def current_name(dotted: str) -> str:
    """``meet_lightning.control.PromptTuningControl`` → ``meet_lightning.controls.tokens.PromptTuningControl``; any
    other name unchanged. A run's ``recipe.yaml`` written before the move names its classes the old way: its resume
    check compares them by this."""
    package, _, rest = dotted.partition(".")
    old, dot, name = rest.partition(".")
    return f"meet_lightning.{MOVED[old]}{dot}{name}" if package == "meet_lightning" and old in MOVED else dotted


class _OldPath(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``meet_lightning.<old>`` and loads it as the module at its new path."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        package, _, old = fullname.partition(".")
        if package != "meet_lightning" or old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None  # a throwaway module: exec_module puts the real one in its place

    def exec_module(self, module: ModuleType) -> None:
        new = current_name(module.__name__)
        warnings.warn(f"{module.__name__} moved to {new}; the old path goes in 0.2", DeprecationWarning, stacklevel=2)
        # The import system returns whatever sys.modules holds under the old name once this returns.
        sys.modules[module.__name__] = importlib.import_module(new)


def install() -> None:
    """Put the finder first on ``sys.meta_path`` (once): it answers only the old names, and must answer them before
    an editable install's finder, which maps every ``meet_lightning.*`` name to a file path whether or not it exists."""
    if not any(isinstance(finder, _OldPath) for finder in sys.meta_path):
        sys.meta_path.insert(0, _OldPath())
