"""Your own data: ``--data.columns`` in ``fit``, and chat logs with feedback (``messages_feedback``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from meet_lightning.commands.cli import main
from meet_lightning.data.formats import SourceConfig, read_source
from meet_lightning.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "meet_hh_prompt.yaml"
DEBUG = ROOT / "configs" / "debug.yaml"


def run(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exit:  # --print_config exits inside the parser
        return int(exit.code or 0)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def fit(data: Path, out: Path, *extra: str) -> int:
    """A stage-1-only debug run of the main recipe on the tiny model (seconds)."""
    return run(
        "fit",
        "--config",
        str(RECIPE),
        "--config",
        str(DEBUG),
        "--data.path",
        str(data),
        "--data.format",
        "auto",
        "--output_dir",
        str(out),
        "--stage2.model",
        "null",
        *extra,
    )


def chat(user: str, reply: str, feedback=None, **row) -> dict:
    assistant = {"role": "assistant", "content": reply, **({} if feedback is None else {"feedback": feedback})}
    return {"messages": [{"role": "user", "content": user}, assistant], **row}


# ------------------------------------------------------------------------------------------- --data.columns

RENAMED = [
    {"question": f"How do I do task {i}?", "good_answer": f"Step by step: do {i} carefully.", "bad_answer": "No."}
    for i in range(24)
]
MAPPING = {"prompt": "question", "chosen": "good_answer", "rejected": "bad_answer"}
COLUMNS = "{prompt: question, chosen: good_answer, rejected: bad_answer}"  # as the error's hint writes it (YAML)


def test_columns_in_fit_trains_a_file_with_renamed_columns(tmp_path, capsys):
    """The hint of the format-detection error (rename columns with --data.columns) works in ``fit``."""
    data = write_jsonl(tmp_path / "renamed.jsonl", RENAMED)
    assert fit(data, tmp_path / "run", "--data.columns", COLUMNS) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "stage1" / "controls.safetensors").is_file()
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["data"]["columns"] == MAPPING


def test_without_columns_the_error_names_the_flag_that_works(tmp_path, capsys):
    data = write_jsonl(tmp_path / "renamed.jsonl", RENAMED)
    assert fit(data, tmp_path / "run") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (a handler of an earlier run may log above it)
    assert err.startswith("error: ") and "renamed.jsonl:1: cannot tell the data format" in err and "--data.columns" in err


def test_columns_in_print_config_and_yaml(tmp_path, capsys):
    data = write_jsonl(tmp_path / "renamed.jsonl", RENAMED)
    assert fit(data, tmp_path / "run", "--data.columns", json.dumps(MAPPING), "--print_config") == 0  # or JSON
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["columns"] == MAPPING
    overlay = tmp_path / "columns.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"columns": MAPPING}}))
    assert fit(data, tmp_path / "run", "--config", str(overlay), "--print_config") == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["columns"] == MAPPING


def test_columns_apply_to_path_and_val_path_but_not_to_sources(tmp_path):
    from meet_lightning.data.datamodule import PreferenceDataModule

    data = write_jsonl(tmp_path / "renamed.jsonl", RENAMED)
    module = PreferenceDataModule(path=str(data), val_path=str(data), columns=MAPPING)
    assert module.sources[0].columns == module.val_source.columns == MAPPING
    assert len(read_source(module.sources[0]).pairs) == len(RENAMED)
    with pytest.raises(ConfigError, match="set columns on each entry of --data.sources"):
        PreferenceDataModule(sources=[SourceConfig(path=str(data))], columns={"prompt": "question"})


# ------------------------------------------------------------------------------------------ messages_feedback


def parse(tmp_path: Path, rows: list, **options):
    return read_source(SourceConfig(path=str(write_jsonl(tmp_path / "chats.jsonl", rows)), **options))


def test_messages_feedback_is_detected_and_pairs_replies_to_the_same_prompt_across_rows(tmp_path):
    rows = [
        chat("Name a prime.", "7", "up"),
        chat("Name a prime.", "9", "down"),  # a regenerated answer, logged as its own row
        chat("Say hi.", "Hello!", rating="thumbs_up"),  # the row's feedback: its last assistant turn
        chat("Say hi.", "Go away."),  # no feedback anywhere: skipped, counted
    ]
    parsed = parse(tmp_path, rows, preference="helpful")
    assert parsed.format == "messages_feedback"
    assert [(p.chosen, p.rejected, p.chosen_control, p.rejected_control) for p in parsed.pairs] == [("7", "9", "good", "bad")]
    assert parsed.pairs[0].prompt == ({"role": "user", "content": "Name a prime."},)
    got = [(e.response, dict(e.controls), e.source.rsplit(":", 1)[1]) for e in parsed.examples]
    assert got == [("7", {"helpful": "good"}, "1"), ("9", {"helpful": "bad"}, "2"), ("Hello!", {"helpful": "good"}, "3")]
    assert parsed.skipped == {"no feedback on any assistant turn": 1}
    assert parsed.skipped_rows == {"no feedback on any assistant turn": [4]}


def test_messages_feedback_per_turn_system_prompt_and_text_parts(tmp_path):
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "2+2?"}]},
            {"role": "assistant", "content": "5", "feedback": -1},
            {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "4", "feedback": 1},
        ]
    }
    parsed = parse(tmp_path, [row])
    first, second = parsed.examples
    assert (first.response, first.controls, first.prompt[-1]["content"]) == ("5", {"preference": "bad"}, "2+2?")
    assert (second.response, second.controls) == ("4", {"preference": "good"})
    assert [t["role"] for t in second.prompt] == ["system", "user", "assistant", "user"]
    assert not parsed.pairs  # different prompts: nothing to compare


@pytest.mark.parametrize(
    ("values", "controls", "skipped"),
    [
        ([True, False], ["good", "bad"], 0),
        (["👍", "Thumbs_Down"], ["good", "bad"], 0),
        ([1, 0], ["good", "bad"], 0),  # a file of 0 and 1: 0 is thumbs down
        ([1, -1, 0], ["good", "bad"], 1),  # -1/0/1: 0 is neutral, skipped and counted
    ],
)
def test_messages_feedback_thumb_values(tmp_path, values, controls, skipped):
    parsed = parse(tmp_path, [chat(f"Q{i}", f"A{i}", v) for i, v in enumerate(values)])
    assert [e.controls["preference"] for e in parsed.examples] == controls
    assert sum(parsed.skipped.values()) == skipped


def test_messages_feedback_scores_are_binned_like_pointwise(tmp_path):
    rows = [chat("Q", f"answer {s}", score=s) for s in (1, 2, 4, 5)]
    median = parse(tmp_path, rows)
    assert [e.controls["preference"] for e in median.examples] == ["bad", "bad", "good", "good"]
    assert len(median.pairs) == 4 and all(p.chosen_control == "good" for p in median.pairs)
    three = parse(tmp_path, rows, score_thresholds=[2, 5], score_labels=["low", "mid", "high"])
    assert [e.controls["preference"] for e in three.examples] == ["low", "mid", "mid", "high"]
    assert {(p.chosen, p.rejected) for p in three.pairs} >= {("answer 5", "answer 1"), ("answer 2", "answer 1")}
    assert ("answer 4", "answer 2") not in {(p.chosen, p.rejected) for p in three.pairs}  # same bin: no pair


def test_messages_feedback_bad_rows_name_the_row_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"chats.jsonl:2: messages\[1\].feedback is 'meh' — use up/down"):
        parse(tmp_path, [chat("Q", "A", "up"), chat("Q", "B", "meh")])
    with pytest.raises(DataError, match=r"chats.jsonl:1: the row's feedback and its last assistant turn's feedback disagree"):
        parse(tmp_path, [{**chat("Q", "A", "up"), "feedback": "down"}])
    with pytest.raises(DataError, match="chats.jsonl:1: the row has feedback but no assistant turn"):
        parse(tmp_path, [{"messages": [{"role": "user", "content": "Q"}], "feedback": "up"}])
    with pytest.raises(DataError, match="is a thumb, but other rows give scores"):
        parse(tmp_path, [chat("Q", "A", "up"), chat("Q", "B", 4)])
    skipped = parse(tmp_path, [chat("Q", "A", "up"), chat("Q", "B", "meh")], on_bad_rows="skip")
    assert skipped.skipped_rows == {"messages[1].feedback is 'meh'": [2]}


def test_messages_without_any_feedback_say_why_nothing_is_usable(tmp_path):
    with pytest.raises(DataError, match=r"no usable rows in 2 records \(no feedback on any assistant turn ×2\)"):
        parse(tmp_path, [chat("Q", "A"), chat("R", "B")])


def feedback_log() -> list[dict]:
    """A small chat log: each question answered twice (thumbs up and down), plus unpaired and unrated rows."""
    rows = []
    for i in range(12):
        rows.append(chat(f"How do I do chore {i}?", f"Start with step one of chore {i}, then finish it.", "up"))
        rows.append(chat(f"How do I do chore {i}?", "Figure it out.", "down"))
    rows += [chat(f"Tell me a fact about {n}.", f"{n} is a number.", rating=1) for n in range(4)]
    rows += [chat("Unrated question?", "Unrated answer.")]
    return rows


def test_messages_feedback_trains_through_fit(tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat_log.jsonl", feedback_log())
    assert fit(data, tmp_path / "run", "--data.preference", "helpful") == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "stage1" / "controls.safetensors").is_file()
    inspected = run("inspect-data", "--data.path", str(data))
    assert inspected == 0
    report = capsys.readouterr().out
    assert "format:    messages_feedback  (detected)" in report and "no feedback on any assistant turn: 1" in report
