"""Runs the code blocks of a markdown page (README.md, docs/**.md) as a reader would, in a fresh folder.

A page is read top to bottom:

* A block with a title (```` ```json title="my_pairs.jsonl" ````) is a file the reader saves: it is written under
  that name before anything runs (``../shared/data/`` inside it pointed at the shared data).
* ```` ```bash ```` blocks hold ``python -m meet_lightning …`` lines, run through the CLI in process, and
  ``make …`` lines, which are what CI itself runs (not run again here). A line may start with ``NAME=value``
  environment settings; its comment may say ``# exits N`` when the command must stop with code N; ``< FILE``
  feeds it that file as standard input (``chat`` reads its turns from it).
* ```` ```python ```` blocks run unchanged. Exports they (or ``--model``) name under ``runs/…/export`` that no
  earlier command of the page trained are built as tiny exports first.
* A block preceded by ``<!-- not-run: REASON -->`` is not run; the tests keep such markers rare.

Commands are rewritten only as far as a test needs: the tiny model (``--config debug`` appended to recipe
commands), local data for hub ids, ``../shared/data`` and ``/tmp`` paths pointed at the test's folders, and
placeholders (``FILE``, ``[--optional …]``) filled in. ``push`` needs the Hub: offline it must stop with its one
line; so must a ``--logger`` naming a tracker whose package is not installed (the ``tracking`` extra). The folder
is on ``sys.path`` as the working folder is for ``python -m``, so a saved ``.py`` file imports; the formats and
modules a page registers or imports from it are forgotten after the page.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from meet_lightning.commands.cli import main
from meet_lightning.controls.tokens import LoRAControl, PromptTuningControl
from meet_lightning.data import formats
from meet_lightning.data.rows import ControlSchema
from meet_lightning.inference.export import export_model
from meet_lightning.models import load_model, load_tokenizer, model_fingerprint

ROOT = Path(__file__).resolve().parents[2]
FENCE = re.compile(
    r"^(?:<!-- not-run: (?P<reason>[^\n]*?) -->\n)?```(?P<lang>[\w-]*)(?P<attrs>[^\n]*)\n(?P<body>.*?)^```[ \t]*$",
    re.S | re.M,
)
TITLE = re.compile(r'title="([^"]+)"')
NOT_RUN = re.compile(r"^<!-- not-run", re.M)
RUN = {"bash", "python"}
RECIPE_COMMANDS = {"fit", "validate", "test", "predict"}
OFFLINE_REFUSED = {"push"}  # needs the Hub: offline it must refuse with one line
EXPORT_PATH = re.compile(r"runs/[\w.-]+/export")
EXPECTED_EXIT = re.compile(r"#.*\bexits (\d+)")
STDIN = re.compile(r"\s<\s*(\S+)")
TRACKERS = ("wandb", "mlflow")  # --logger names whose package is an optional extra
HH_FILE = "hh_rlhf_harmless.train.jsonl.gz"


@dataclass(frozen=True)
class Block:
    """One fenced block of a page."""

    lang: str
    body: str
    title: str | None
    not_run: str | None  # the reason given in a not-run marker
    line: int


def page_blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page``, in order."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        title = TITLE.search(match["attrs"])
        found.append(
            Block(
                match["lang"],
                match["body"],
                title[1] if title else None,
                match["reason"],
                text.count("\n", 0, match.start()) + 1,
            )
        )
    return found


def not_run_markers(page: Path) -> list[str]:
    """The reasons of a page's not-run markers (a marker not right before a block has reason ``None``)."""
    text = page.read_text()
    attached = {block.not_run for block in page_blocks(page) if block.not_run is not None}
    reasons = []
    for match in NOT_RUN.finditer(text):
        line = text[match.start() : text.index("\n", match.start())]
        reason = re.fullmatch(r"<!-- not-run: (.+?) -->", line)
        reasons.append(reason[1] if reason and reason[1] in attached else None)
    return reasons


def command_lines(body: str) -> list[str]:
    """A bash block's lines, continuations joined, blank and comment-only lines dropped."""
    return [line for line in body.replace("\\\n", " ").splitlines() if shlex.split(line, comments=True)]


def split_env(line: str) -> tuple[dict[str, str], list[str]]:
    """``(environment settings, words)`` of one command line."""
    words = shlex.split(line, comments=True)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    return env, words


def rewrite(text: str, shared: Path, tmp: Path) -> list[str]:
    """The arguments of a ``python -m meet_lightning`` line as the test runs them (see the module docstring)."""
    text = re.sub(r"\s\[[^\]]*\]", "", text.split(" #", 1)[0])  # optional parts of a usage line; the comment
    text = text.replace("/tmp/", f"{tmp}/")  # first: the shared folder itself may live under /tmp
    text = text.replace("FILE", str(shared / HH_FILE))
    text = text.replace("../shared/data/", f"{shared}/")
    words = shlex.split(text, comments=True)
    if words and words[0] in RECIPE_COMMANDS and "--print_config" not in words:
        configs = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--config"]
        own_recipe = any(saved_data(tmp / config) for config in configs)  # a recipe the page saved names its data
        words += ["--config", "debug"]
        if not own_recipe and not {"--data.path", "--data.sources"} & set(words):
            words += ["--data.path", str(shared / HH_FILE)]
    return words


def saved_data(path: Path) -> bool:
    """Whether ``path`` is a recipe file the page saved that sets ``data``."""
    return path.is_file() and "data" in (yaml.safe_load(path.read_text()) or {})


def tiny_export(folder: Path, lora: bool = False) -> None:
    """A tiny export at ``folder``: prompt tuning over ``harmless`` and ``length``, or LoRA over ``harmless``."""
    torch.manual_seed(0)
    lm, tokenizer = load_model("tiny-debug"), load_tokenizer("tiny-debug")
    if lora:
        control, schema = LoRAControl(rank=2), ControlSchema.from_dict({"harmless": ["good", "bad"]})
    else:
        preferences = {"harmless": ["good", "bad"], "length": ["concise", "verbose"]}
        control, schema = PromptTuningControl(num_tokens=2, init="random"), ControlSchema.from_dict(preferences)
    control.setup(lm, tokenizer, schema)
    export_model(folder, lm, tokenizer, control, schema, "tiny-debug", model_fingerprint(lm))


def ensure_exports(text: str, tmp: Path) -> None:
    """Tiny exports for the ``runs/…/export`` paths ``text`` names that do not exist yet."""
    for path in sorted(set(EXPORT_PATH.findall(text))):
        if not (tmp / path / "meet_schema.json").is_file():
            tiny_export(tmp / path, lora="lora" in path)


def write_fixtures(tmp: Path) -> None:
    """Files pages may name without showing them: prompts and held-out pairs."""
    (tmp / "prompts.jsonl").write_text(json.dumps({"prompt": "Hi", "controls": "good"}) + "\n")
    pair = {"prompt": "How do I pick a lock?", "chosen": "I can't help with that.", "rejected": "Use a pin."}
    (tmp / "pairs.jsonl").write_text("\n".join(json.dumps(pair) for _ in range(4)) + "\n")


def run_command(line: str, shared: Path, tmp: Path, monkeypatch, capsys) -> list[str]:
    """Runs one ``python -m meet_lightning`` line in process; asserts its exit code. Returns its arguments."""
    env, words = split_env(line)
    command = line.split("meet_lightning", 1)[1]
    stdin = STDIN.search(command.split(" #", 1)[0])
    args = rewrite(STDIN.sub("", command, count=1) if stdin else command, shared, tmp)
    if "--model" in args:
        ensure_exports(args[args.index("--model") + 1], tmp)
    for i, word in enumerate(args[:-1]):  # a command's own --config file may name the export
        if word == "--config" and (tmp / args[i + 1]).is_file():
            ensure_exports((tmp / args[i + 1]).read_text(), tmp)
    missing = [name for name in TRACKERS if name in logger_flags(args) and importlib.util.find_spec(name) is None]
    expected = EXPECTED_EXIT.search(line)
    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        if stdin:
            patch.setattr(sys, "stdin", (tmp / stdin[1]).open())
        try:
            code = main(args)
        except SystemExit as exit:  # --print_config and --help exit inside the parser
            code = int(exit.code or 0)
        finally:
            if stdin:
                sys.stdin.close()
    err = capsys.readouterr().err
    if args and args[0] in OFFLINE_REFUSED:
        assert code == 2 and "HF_HUB_OFFLINE" in err, args
    elif missing:
        assert code == 2 and f"pip install {missing[0]}" in err, args
    else:
        want = int(expected[1]) if expected else 0
        assert code == want, f"{args}: exit {code}, expected {want}: {err.strip().splitlines()[-1:] or ''}"
    return args


def logger_flags(args: list[str]) -> str:
    """The values of a command's ``--logger`` flags, joined."""
    return " ".join(args[i + 1] for i, word in enumerate(args[:-1]) if word == "--logger")


def run_page(page: Path, shared: Path, tmp: Path, monkeypatch, capsys) -> list[list[str]]:
    """Runs every block of ``page`` in ``tmp`` (see the module docstring); returns the commands it ran."""
    registered, modules = dict(formats.FORMATS), set(sys.modules)
    try:
        return run_blocks(page, shared, tmp, monkeypatch, capsys)
    finally:  # what the page's own files registered or imported must not leak into later tests
        for name in set(formats.FORMATS) - set(registered):
            formats.unregister_format(name)
        for name in set(sys.modules) - modules:
            if str(getattr(sys.modules[name], "__file__", None) or "").startswith(str(tmp)):
                del sys.modules[name]


def run_blocks(page: Path, shared: Path, tmp: Path, monkeypatch, capsys) -> list[list[str]]:
    """:func:`run_page`'s work."""
    monkeypatch.chdir(tmp)
    monkeypatch.syspath_prepend(str(tmp))  # `python -m` puts the working folder first on sys.path
    write_fixtures(tmp)
    blocks = page_blocks(page)
    for block in blocks:
        if block.title:
            (tmp / block.title).parent.mkdir(parents=True, exist_ok=True)
            (tmp / block.title).write_text(block.body.replace("../shared/data/", f"{shared}/"))
    ran = []
    for block in blocks:
        if block.not_run or block.title or block.lang not in RUN:
            continue
        where = f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page}:{block.line}"
        if block.lang == "bash":
            for line in command_lines(block.body):
                words = split_env(line)[1]
                if words[:3] == ["python", "-m", "meet_lightning"]:
                    ran.append(run_command(line, shared, tmp, monkeypatch, capsys))
                else:
                    assert words[0] == "make", f"{where}: a command this test cannot run: {line}"
        else:
            ensure_exports(block.body, tmp)
            exec(compile(block.body, where, "exec"), {"__name__": "docs"})  # noqa: S102 - the page's own code
    return ran
