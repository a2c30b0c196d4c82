"""MkDocs hooks: pages generated at build time instead of copied by hand.

* ``reference/configuration.md``: every command's ``--help``, produced by the CLI's own parsers in this process,
  so the reference cannot drift from the code (it is never written into ``docs/``).
* The benchmark plots under ``benchmarks/results/`` are served from where the benchmarks write them, so the
  results pages show the committed figures without a copy in ``docs/``.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
CONFIGURATION_PAGE = "reference/configuration.md"
COMMANDS = ("fit", "validate", "test", "predict", "generate", "evaluate", "push", "inspect-data", "download-model", "demo")
"""Commands whose ``--help`` the configuration reference holds, in the order a user meets them."""

INTRO = """# Configuration reference

Generated when the site is built: each section is the `--help` of one command, printed by the parser the
command itself uses (`meet_lightning/commands/cli.py` and `meet_lightning/commands/inference.py`), so every flag,
default and help text here is the code's. A recipe YAML uses the same keys without the leading `--`, nested by the dots
(`--stage1.trainer.max_steps 300` is `stage1: {trainer: {max_steps: 300}}`); `fit --print_config` prints a
whole resolved recipe.

"""


def command_help(argv: list[str]) -> str:
    """What ``python -m meet_lightning ARGV`` prints, run in this process (a parser's ``--help`` exits 0)."""
    from meet_lightning.commands.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exit:
            if exit.code not in (0, None):
                raise RuntimeError(f"meet_lightning {' '.join(argv)} exited {exit.code}") from None
    return out.getvalue().rstrip()


RECIPE_COMMANDS = ("validate", "test", "predict")
"""Commands that read the same recipe as ``fit``: their page lists how their flags differ from fit's."""


def recipe_flags(command: str) -> set[str]:
    """The option strings of a recipe command's parser."""
    from meet_lightning.commands.cli import recipe_parser

    return {option for action in recipe_parser(command)._actions for option in action.option_strings}


def flag_difference(command: str) -> str:
    """How ``command``'s flags differ from ``fit``'s, as a sentence (the rest of its help repeats fit's)."""
    fit, own = recipe_flags("fit"), recipe_flags(command)
    added = ", ".join(f"`{flag}`" for flag in sorted(own - fit)) or "none"
    missing = ", ".join(f"`{flag}`" for flag in sorted(fit - own)) or "none"
    return (
        f"`{command}` reads the same recipe as `fit` and takes every flag of `fit` above except {missing}; "
        f"flags of its own: {added}.\n"
    )


def configuration_page() -> str:
    """The whole configuration reference as markdown."""
    os.environ["COLUMNS"] = "120"  # argparse wraps help to the terminal; a fixed width keeps the page stable
    sections = [INTRO, "## Commands\n\n```text\n" + command_help(["--help"]) + "\n```\n"]
    for command in COMMANDS:
        if command in RECIPE_COMMANDS:
            sections.append(f"## `{command}`\n\n{flag_difference(command)}")
        else:
            sections.append(f"## `{command}`\n\n```text\n{command_help([command, '--help'])}\n```\n")
    return "\n".join(sections)


def on_files(files: Files, config) -> Files:
    """Adds the generated configuration page and the benchmark plots to the site."""
    files.append(File.generated(config, CONFIGURATION_PAGE, content=configuration_page()))
    for plot in sorted((ROOT / "benchmarks" / "results").rglob("*.png")):
        uri = plot.relative_to(ROOT).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(plot)))
    return files
