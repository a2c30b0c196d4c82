"""The package's three layers, held by its imports (those inside functions included).

* **core** — tokenization, models, controls, generation, export and ``AlignedModel``, metrics, reports, plots:
  torch and transformers only; never Lightning, the training layer or the commands.
* **training** — the data module, the LightningModules, callbacks, the orchestrator: may use the core, never
  the commands, the evaluation report or plots.
* **commands** — the only modules that build argument parsers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "meet_lightning"

# A layer is mostly a folder: data/, controls/, inference/ and evaluation/ are core, training/ and modules/ the
# training layer, commands/ the commands. The exceptions are named: the shared core modules at the top, and the data
# module, which lives with the rest of data/ but is Lightning's.
FOLDER_LAYERS = {"data": "core", "controls": "core", "inference": "core", "evaluation": "core", "training": "training",
                 "modules": "training", "commands": "commands"}  # fmt: skip
TOP_CORE = {"", "_moved", "errors", "names", "recipe", "atomic", "precision", "stats", "heads", "losses", "models", "rss",
            "update_probe"}  # fmt: skip
EXCEPTIONS = {"data.datamodule": "training", "__main__": "commands"}


def layer(name: str) -> str | None:
    """The layer of module ``name`` (``data.formats``), or ``None`` where it has none yet."""
    if name in EXCEPTIONS:
        return EXCEPTIONS[name]
    if name in TOP_CORE:
        return "core"
    return FOLDER_LAYERS.get(name.split(".")[0]) if "." in name or name in FOLDER_LAYERS else None


PARSERS = {"ArgumentParser", "OneLineParser"}


def module_name(path: Path) -> str:
    """``meet_lightning/modules/base.py`` → ``modules.base``; a package's ``__init__`` → the package."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def imports(tree: ast.Module) -> set[str]:
    """Every module a file imports, anywhere in it: ``meet_lightning.x`` as ``x``, others by their full name."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            if node.module.split(".")[0] == "meet_lightning":  # `from meet_lightning.training import pipeline`
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name.removeprefix("meet_lightning.") if name.startswith("meet_lightning.") else name for name in found}


def internal_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: {m for m in imports(tree) if m in modules and m != name} for name, tree in modules.items() if name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, …, a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    return next((cycle for node in sorted(graph) if node not in state and (cycle := visit(node))), None)


def test_every_module_belongs_to_one_layer():
    unknown = sorted(name for name in package_modules() if layer(name) is None)
    assert not unknown, f"put {unknown} in a layer (tests/test_layers.py and docs/contributing.md's three layers)"


def test_no_import_cycles():
    assert find_cycle(internal_graph()) is None


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_never_imports_lightning_training_or_commands():
    wrong = {
        name: sorted(m for m in imports(tree) if m.split(".")[0] == "lightning" or layer(m) in ("training", "commands"))
        for name, tree in package_modules().items()
        if layer(name) == "core"
    }
    assert not {k: v for k, v in wrong.items() if v}


def test_training_never_imports_commands_reports_or_plots():
    wrong = {
        name: sorted(m for m in imports(tree) if layer(m) == "commands" or m in ("evaluation.run", "evaluation.plots"))
        for name, tree in package_modules().items()
        if layer(name) == "training"
    }
    assert not {k: v for k, v in wrong.items() if v}


def test_only_commands_build_parsers():
    builders = {}
    for name, tree in package_modules().items():
        calls = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call)]
        names = {c.id if isinstance(c, ast.Name) else c.attr for c in calls if isinstance(c, ast.Name | ast.Attribute)}
        if names & PARSERS or "argparse" in imports(tree):
            builders[name] = sorted(names & PARSERS)
    assert {layer(name) for name in builders} <= {"commands"}, builders


def test_inference_api_loads_without_lightning():
    code = (
        "import sys, meet_lightning.inference.export, meet_lightning.evaluation.metrics, meet_lightning.evaluation.run\n"
        "from meet_lightning import AlignedModel\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
