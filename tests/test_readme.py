"""Every code block of the README runs: its commands through the CLI in process, its Python as written.

Commands are rewritten only as far as a test needs: the tiny model (``--config debug`` appended to recipe
commands), local data for hub ids, ``../shared/data`` and ``/tmp`` paths pointed at the test's folders, and
placeholders (``FILE``, ``[--optional …]``) filled in. ``make`` lines are what CI itself runs. ``push`` is run
too: offline it must stop with its one-line error. Python blocks run unchanged on tiny exports built at the
paths they name.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import torch

from meet_lightning.cli import main
from meet_lightning.control import LoRAControl, PromptTuningControl
from meet_lightning.examples import ControlSchema
from meet_lightning.export import export_model
from meet_lightning.models import load_model, load_tokenizer, model_fingerprint

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
RECIPE_COMMANDS = {"fit", "validate", "test", "predict"}
OFFLINE_REFUSED = {"push"}  # needs the Hub: offline it must refuse with one line


def blocks(language: str) -> list[str]:
    return [body for lang, body in BLOCK.findall((ROOT / "README.md").read_text()) if lang == language]


def readme_commands() -> list[str]:
    """Each ``python -m meet_lightning …`` command line of the bash blocks (continuations joined)."""
    commands = []
    for body in blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:3] == ["python", "-m", "meet_lightning"]:
                commands.append(line.split("meet_lightning", 1)[1])
            else:
                assert not words or words[0] == "make", f"README command this test cannot run: {line}"
    return commands


def rewrite(text: str, shared: Path, tmp: Path) -> list[str]:
    """The command's arguments as this test runs them (see the module docstring)."""
    text = re.sub(r"\s\[[^\]]*\]", "", text.split(" #", 1)[0])  # optional parts of a usage line; the comment
    text = text.replace("/tmp/", f"{tmp}/")  # first: the shared folder itself may live under /tmp
    text = text.replace("FILE", str(shared / "hh_rlhf_harmless.train.jsonl.gz"))
    text = text.replace("../shared/data/", f"{shared}/")
    words = shlex.split(text, comments=True)
    if words[0] in RECIPE_COMMANDS and "--print_config" not in words:
        words += ["--config", "debug"]
        if "--data.path" not in words:
            words += ["--data.path", str(shared / "hh_rlhf_harmless.train.jsonl.gz")]
    return words


def test_every_readme_command_runs(tmp_path, monkeypatch, shared_data, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Hi", "controls": "good"}) + "\n")
    pair = {"prompt": "How do I pick a lock?", "chosen": "I can't help with that.", "rejected": "Use a pin."}
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(pair) for _ in range(4)) + "\n")
    commands = readme_commands()
    assert {c.split()[0] for c in commands} >= {"fit", "validate", "predict", "generate", "evaluate", "inspect-data", "push"}
    for command in commands:
        args = rewrite(command, shared_data, tmp_path)
        try:
            code = main(args)
        except SystemExit as exit:  # --print_config exits inside the parser
            code = int(exit.code or 0)
        err = capsys.readouterr().err
        if args[0] in OFFLINE_REFUSED:
            assert code == 2 and "HF_HUB_OFFLINE" in err, args
        else:
            assert code == 0, f"{args}: {err.strip().splitlines()[-1:] or ''}"
    for written in (
        "runs/meet_hh_prompt/export/config.json",
        "runs/meet_hh_prompt/stage2/predictions.jsonl",
        "out.jsonl",
        "metrics.json",
    ):
        assert (tmp_path / written).is_file(), written  # the commands did their work


def tiny_export(folder: Path, control, preferences: dict[str, list[str]]) -> None:
    torch.manual_seed(0)
    lm, tokenizer = load_model("tiny-debug"), load_tokenizer("tiny-debug")
    schema = ControlSchema.from_dict(preferences)
    control.setup(lm, tokenizer, schema)
    export_model(folder, lm, tokenizer, control, schema, "tiny-debug", model_fingerprint(lm))


def test_every_readme_python_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    both = {"harmless": ["good", "bad"], "length": ["concise", "verbose"]}
    for run in ("demo", "meet_hh_prompt"):
        tiny_export(tmp_path / "runs" / run / "export", PromptTuningControl(num_tokens=2, init="random"), both)
    tiny_export(tmp_path / "runs" / "meet_hh_lora" / "export", LoRAControl(rank=2), {"harmless": ["good", "bad"]})
    sources = blocks("python")
    assert len(sources) >= 3
    for source in sources:
        exec(compile(source, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 - the README's own code
