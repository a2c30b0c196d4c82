"""Validation that is really held out (issue 31 row 10 and the data items of "smaller"), and folders of data files
read file by file (row 15): the split by first user turn, exact duplicates, val_path overlap, big CSV fields."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from meet_lightning.commands.cli import main
from meet_lightning.data.datamodule import PreferenceDataModule
from meet_lightning.data.formats import SourceConfig, read_source
from meet_lightning.data.heldout import DUPLICATES, drop_duplicates, split_key
from meet_lightning.data.rows import ControlledExample, ParsedSource
from meet_lightning.data.streaming import StreamedBatches, held_out
from meet_lightning.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
HH_FILE = "hh_rlhf_harmless.train.jsonl.gz"


def run(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exit:
        return int(exit.code or 0)


def write_pairs(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pairs(count: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No {i}."} for i in range(start, start + count)]


def module(path: Path, cache: Path, **options) -> PreferenceDataModule:
    defaults = dict(model_name_or_path="tiny-debug", max_length=128, batch_size=4, cache_dir=str(cache))
    return PreferenceDataModule(path=str(path), **{**defaults, **options})


def first_turn(prompt) -> str:
    return next(m["content"] for m in prompt if m["role"] == "user")


# ------------------------------------------------------------------------------- the split by first user turn


def test_split_groups_hh_conversations_by_their_first_user_turn(shared_data):
    """Old code (split by whole prompt): 16 of the 180 validation pairs open with a training conversation's turn."""
    data = PreferenceDataModule(path=str(shared_data / HH_FILE), preference="harmless", val_fraction=0.1, seed=1234)
    train, val = data.train_val_split()
    opened = {first_turn(p.prompt) for p in train.pairs}
    assert len(val.pairs) > 100 and len(train.pairs) + len(val.pairs) == 1796
    assert sum(first_turn(p.prompt) in opened for p in val.pairs) == 0


def test_cached_validation_prompts_share_no_opening_with_training(shared_data, tmp_path):
    """The cache builds the same split (old code: validation prompts whose first turn is in training)."""
    data = module(shared_data / HH_FILE, tmp_path, preference="harmless", max_examples=32, max_length=256)
    data.setup("fit")
    train, _ = data.train_val_split()
    opened = {split_key(p.prompt) for p in train.pairs}
    cached = [json.loads(text) for text in data.val_items.column("prompt")]
    assert len(cached) > 100 and not [p for p in cached if split_key(p) in opened]


def test_a_stream_holds_out_every_conversation_that_opens_alike():
    """Old code hashed the whole prompt: a follow-up of a held-out opening could land in training."""
    opening = [{"role": "user", "content": "How do I pick a lock?"}]
    follow_up = [*opening, {"role": "assistant", "content": "Why?"}, {"role": "user", "content": "I am locked out."}]
    sides = [(held_out(opening, seed, 0.5), held_out(follow_up, seed, 0.5)) for seed in range(40)]
    assert all(a == b for a, b in sides) and {a for a, _ in sides} == {True, False}


def test_a_stream_says_what_it_cannot_check(shared_data):
    stream = StreamedBatches([SourceConfig(path=str(shared_data / HH_FILE))], tokenizer=None, max_length=128, batch_size=4)
    line = stream.unchecked("heldout.jsonl")
    assert line.startswith("data: streaming") and "duplicate" in line and "heldout.jsonl" in line and "\n" not in line


# ----------------------------------------------------------------------------------- val_path overlap (row 10)


def test_val_path_equal_to_path_is_refused_with_one_line_naming_both_files(tmp_path):
    """Old code: 'val prompts also in train: 40 / 40', trained and validated on the same pairs."""
    path = write_pairs(tmp_path / "pairs.jsonl", pairs(40))
    data = module(path, tmp_path / "cache", val_path=str(path))
    with pytest.raises(DataError) as error:
        data.setup("fit")
    message = str(error.value)
    assert "\n" not in message and message.count(str(path)) == 2 and "40 of 40 validation pairs" in message
    assert "--data.drop_val_overlap true" in message
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]  # nothing half-written


def test_fit_with_val_path_equal_to_path_exits_2(tmp_path, capsys):
    path = write_pairs(tmp_path / "pairs.jsonl", pairs(40))
    recipe, debug = ROOT / "configs" / "meet_hh_prompt.yaml", ROOT / "configs" / "debug.yaml"
    code = run("fit", "--config", str(recipe), "--config", str(debug), "--data.path", str(path), "--data.format",
               "pairwise", "--data.val_path", str(path), "--data.cache_dir", str(tmp_path / "cache"), "--output_dir", str(tmp_path / "out"))  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and "share their first user turn" in err[-1]


def test_drop_val_overlap_removes_and_counts_the_shared_conversations(tmp_path):
    """Old code: the flag does not exist (TypeError); the 10 overlapping pairs were validated on."""
    train = write_pairs(tmp_path / "train.jsonl", pairs(30))
    val = write_pairs(tmp_path / "val.jsonl", pairs(10, start=20) + pairs(6, start=100))
    data = module(train, tmp_path / "cache", val_path=str(val), drop_val_overlap=True)
    data.setup("fit")
    assert len(data.val_items) == 6 and len(data.train_items) == 60
    assert "10 units whose first user turn is also in training dropped" in data.describe()


def test_a_disjoint_val_path_is_accepted(tmp_path):
    train = write_pairs(tmp_path / "train.jsonl", pairs(30))
    val = write_pairs(tmp_path / "val.jsonl", pairs(6, start=100))
    data = module(train, tmp_path / "cache", val_path=str(val))
    data.setup("fit")
    assert len(data.val_items) == 6 and "first user turn" not in data.describe()


# ------------------------------------------------------------------------------------------ exact duplicates


def test_identical_pairs_are_dropped_and_counted(tmp_path):
    """Old code: 20 identical pairs trained as 40 rows, with no word."""
    path = write_pairs(tmp_path / "dup.jsonl", pairs(1) * 20 + pairs(10, start=1))
    data = module(path, tmp_path / "cache", val_fraction=0.0)
    data.setup("fit")
    assert len(data.train_items) == 2 * 11
    assert f"19 {DUPLICATES}" in data.describe()


def test_stand_alone_rows_and_pairs_dedup_rules():
    """Rows of distinct pairs that happen to match stay; a repeated pointwise row goes, with its row number."""
    prompt = ({"role": "user", "content": "q"},)
    rows = [ControlledExample(prompt, "a", {"length": "concise"}, f"f.jsonl:{i}") for i in (1, 2, 3)]
    rows.append(ControlledExample(prompt, "a", {"length": "verbose"}, "f.jsonl:4"))
    parsed = ParsedSource("f.jsonl", "pointwise", 4, [], rows)
    kept = drop_duplicates(parsed)
    assert [e.source for e in kept.examples] == ["f.jsonl:1", "f.jsonl:4"]
    assert kept.skipped[DUPLICATES] == 2 and kept.skipped_rows[DUPLICATES] == [2, 3]
    assert len(parsed.examples) == 4  # the input is left as read
    assert drop_duplicates(kept) is kept


def test_inspect_data_reports_duplicates(tmp_path, capsys):
    path = write_pairs(tmp_path / "dup.jsonl", pairs(1) * 20 + pairs(3, start=1))
    assert run("inspect-data", "--data.path", str(path)) == 0
    assert "duplicates: 19 records repeat an earlier one exactly" in capsys.readouterr().out


# --------------------------------------------------------------------------------- folders of files (row 15)


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_pairs(folder / "a_good.jsonl", pairs(5))
    (folder / "b_bad.jsonl").write_text(json.dumps(pairs(1)[0]) + '\n{"prompt": oops\n')
    return folder


def test_a_folder_with_an_invalid_jsonl_names_the_file_and_row(mixed_folder, capsys):
    """Old code: DatasetGenerationError traceback, exit 1."""
    assert run("inspect-data", "--data.path", str(mixed_folder)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {mixed_folder / 'b_bad.jsonl'}:2: invalid JSON")


def test_a_folder_with_a_file_of_other_columns_names_that_file(tmp_path):
    folder = tmp_path / "cols"
    folder.mkdir()
    write_pairs(folder / "a.jsonl", pairs(3))
    write_pairs(folder / "b.jsonl", [{"question": "q", "chosen": "c", "rejected": "r"}])
    data = module(folder, tmp_path / "cache", format="pairwise")
    with pytest.raises(DataError, match=rf"^{folder / 'b.jsonl'}:1: .*'prompt'"):
        data.setup("fit")


def test_a_valid_folder_reads_every_file_of_its_split(tmp_path):
    folder = tmp_path / "ok"
    folder.mkdir()
    write_pairs(folder / "train-1.jsonl", pairs(3))
    (folder / "train-2.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in pairs(4, 3)).encode()))
    write_pairs(folder / "test.jsonl", pairs(2, 50))
    assert read_source(SourceConfig(path=str(folder))).rows_read == 7
    assert read_source(SourceConfig(path=str(folder), split="test")).rows_read == 2
    with pytest.raises(DataError, match="no split 'validation'.*--data.split"):
        read_source(SourceConfig(path=str(folder), split="validation"))


# ------------------------------------------------------------------------------------------- big CSV fields


def test_a_200_kb_csv_field_loads(tmp_path):
    """Old code: 'unreadable CSV (field larger than field limit (131072)) — fix the quoting'."""
    path = tmp_path / "big.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "chosen", "rejected"])
        writer.writerow(["Tell me everything.", "word " * 40_000, "No."])
    before = csv.field_size_limit(131_072)  # the csv module's default: another test may have raised it already
    try:
        parsed = read_source(SourceConfig(path=str(path)))
    finally:
        csv.field_size_limit(before)
    assert parsed.pairs[0].chosen == "word " * 40_000
