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

CORE = {
    "errors", "examples", "formats", "heldout", "names", "update_probe", "chat", "serve", "playground", "steering", "recipe", "figures", "atomic", "precision", "stats", "heads", "losses", "tokenization", "tokenized_cache",
    "streaming", "models", "control", "control_vocab", "controls_io", "generation", "export", "evaluate", "report",
    "plots", "peft_export", "model_card", "publish", "rss",
}  # fmt: skip
TRAINING = {"data", "modules", "modules.base", "modules.stage1", "modules.stage2", "modules.baselines", "callbacks",
            "reliability", "pipeline", "distributed"}  # fmt: skip
COMMANDS = {"cli", "inference_cli", "demo", "inspect_data", "__main__"}
LAYERS = {**dict.fromkeys(CORE, "core"), **dict.fromkeys(TRAINING, "training"), **dict.fromkeys(COMMANDS, "commands")}
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
            if node.module == "meet_lightning":  # `from meet_lightning import pipeline`
                found |= {f"meet_lightning.{alias.name}" for alias in node.names}
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
    unknown = sorted(set(package_modules()) - set(LAYERS) - {""})
    assert not unknown, f"put {unknown} in a layer (tests/test_layers.py and docs/contributing.md's three layers)"


def test_no_import_cycles():
    assert find_cycle(internal_graph()) is None


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_never_imports_lightning_training_or_commands():
    wrong = {
        name: sorted(m for m in imports(tree) if m.split(".")[0] == "lightning" or LAYERS.get(m) in ("training", "commands"))
        for name, tree in package_modules().items()
        if LAYERS.get(name) == "core"
    }
    assert not {k: v for k, v in wrong.items() if v}


def test_training_never_imports_commands_reports_or_plots():
    wrong = {
        name: sorted(m for m in imports(tree) if LAYERS.get(m) == "commands" or m in ("report", "plots"))
        for name, tree in package_modules().items()
        if LAYERS.get(name) == "training"
    }
    assert not {k: v for k, v in wrong.items() if v}


def test_only_commands_build_parsers():
    builders = {}
    for name, tree in package_modules().items():
        calls = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call)]
        names = {c.id if isinstance(c, ast.Name) else c.attr for c in calls if isinstance(c, ast.Name | ast.Attribute)}
        if names & PARSERS or "argparse" in imports(tree):
            builders[name] = sorted(names & PARSERS)
    assert set(builders) <= COMMANDS, builders


def test_inference_api_loads_without_lightning():
    code = (
        "import sys, meet_lightning.export, meet_lightning.evaluate, meet_lightning.report\n"
        "from meet_lightning import AlignedModel\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
