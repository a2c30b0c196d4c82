"""A damaged tokenized cache is rebuilt, never read as fewer rows; a resume never mixes two datasets; settings
that cannot change results never block a resume (issue 31, rows 5-9 and the ``num_workers`` complaint)."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.faults import fit_with_fault

from meet_lightning.commands.cli import main
from meet_lightning.data.cache import BUILDING, META, DataSpec, data_identity, fingerprint, prepare_tokenized
from meet_lightning.data.formats import SourceConfig
from meet_lightning.models import load_tokenizer
from meet_lightning.training.reliability import InjectedFault

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
HH = "hh_rlhf_harmless.train.jsonl.gz"
TRAIN_ROWS = 1300  # two Arrow record batches (datasets writes 1000 rows per batch)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-debug")


@pytest.fixture(scope="module")
def spec(shared_data) -> DataSpec:
    # max_length large enough that no row is dropped: the train split holds exactly TRAIN_ROWS rows
    return DataSpec((SourceConfig(path=str(shared_data / HH)),), max_length=4096, max_examples=TRAIN_ROWS, max_val_examples=8)


def prepare(spec, tokenizer, cache: Path):
    """The prepared data and what it said, less the build's own progress lines (``data: tokenizing …``)."""
    lines: list[str] = []
    data = prepare_tokenized(spec, tokenizer, cache, log=lines.append)
    return data, [line for line in lines if not line.startswith(("data: tokenizing ", "data: tokenized "))]


def train_arrow(folder: Path) -> Path:
    (path,) = (folder / "train").glob("*.arrow")
    return path


def record_batch_ends(path: Path) -> list[int]:
    """Byte offsets where each record batch of an Arrow stream file ends."""
    import pyarrow as pa

    ends = []
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.MessageReader.open_stream(source)
        while True:
            try:
                message = reader.read_next_message()
            except StopIteration:
                return ends
            if message.type == "record batch":
                ends.append(source.tell())


def cut(path: Path, size: int) -> None:
    with path.open("r+b") as handle:
        handle.truncate(size)


def assert_rebuilt_once(data, lines: list[str], folder: Path, why: str) -> None:
    assert data.path == folder and data.built
    assert len(data.train) == TRAIN_ROWS and len(data.val) == 8
    assert len(lines) == 1, lines
    assert str(folder) in lines[0] and why in lines[0] and "rebuilt" in lines[0], lines[0]


# ------------------------------------------------------------------------------------------ the cache (5-8)
def test_row5_a_file_cut_at_a_record_batch_boundary_is_rebuilt_not_read_short(spec, tokenizer, tmp_path):
    first, _ = prepare(spec, tokenizer, tmp_path)
    arrow = train_arrow(first.path)
    ends = record_batch_ends(arrow)
    assert len(ends) == 2
    del first
    cut(arrow, ends[0])  # a valid stream of the first 1000 rows: the old code loaded it silently
    again, lines = prepare(spec, tokenizer, tmp_path)
    assert_rebuilt_once(again, lines, arrow.parent.parent, "damaged")
    assert "train/" in lines[0]  # names what is wrong
    reused, quiet = prepare(spec, tokenizer, tmp_path)
    assert not reused.built and not quiet and len(reused.train) == TRAIN_ROWS


def test_row5_row_counts_are_checked_even_when_the_file_sizes_agree(spec, tokenizer, tmp_path):
    first, _ = prepare(spec, tokenizer, tmp_path)
    meta_path = first.path / META
    meta = json.loads(meta_path.read_text())
    meta["checks"]["rows"]["train"] = 5700  # what the issue saw: the metadata says more rows than the file holds
    meta_path.write_text(json.dumps(meta))
    again, lines = prepare(spec, tokenizer, tmp_path)
    assert_rebuilt_once(again, lines, first.path, "train holds 1300 rows, 5700 recorded")


def test_row6_a_file_cut_mid_batch_is_rebuilt_with_one_line_naming_the_folder(spec, tokenizer, tmp_path):
    first, _ = prepare(spec, tokenizer, tmp_path)
    arrow = train_arrow(first.path)
    del first
    cut(arrow, arrow.stat().st_size // 2)  # the old code: OSError traceback on every run
    again, lines = prepare(spec, tokenizer, tmp_path)
    assert_rebuilt_once(again, lines, arrow.parent.parent, "damaged")


def test_a_cut_file_is_caught_by_reading_it_too(spec, tokenizer, tmp_path):
    """Without the size record, the reader's own failure still rebuilds (one line, no traceback)."""
    first, _ = prepare(spec, tokenizer, tmp_path)
    arrow, meta_path = train_arrow(first.path), first.path / META
    meta = json.loads(meta_path.read_text())
    meta["checks"]["files"] = {}
    meta_path.write_text(json.dumps(meta))
    cut(arrow, arrow.stat().st_size // 2)
    again, lines = prepare(spec, tokenizer, tmp_path)
    assert_rebuilt_once(again, lines, first.path, "unreadable")


def test_row7_a_folder_without_its_metadata_is_moved_aside_and_rebuilt(spec, tokenizer, tmp_path):
    first, _ = prepare(spec, tokenizer, tmp_path)
    (first.path / META).unlink()  # e.g. a copy of the cache interrupted: the old code failed on every run
    again, lines = prepare(spec, tokenizer, tmp_path)
    assert_rebuilt_once(again, lines, first.path, f"incomplete (no {META})")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.path.name, first.path.name + ".lock"])


def dead_pid() -> int:
    """The pid of a process killed with SIGKILL (as a build killed by ``kill -9`` leaves it)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    return process.pid


def test_row8_build_folders_of_killed_processes_are_removed(spec, tokenizer, tmp_path):
    key, host, dead = fingerprint(spec, tokenizer), socket.gethostname(), dead_pid()
    stale = [
        tmp_path / f"{key}{BUILDING}{host}-{dead}",  # this key: its builder would hold the lock we now hold
        tmp_path / f"{key}{BUILDING}{dead}",  # this key, named as the old code named it
        tmp_path / f"{'0' * 32}{BUILDING}{host}-{dead}",  # another key, its process gone
    ]
    kept = [
        tmp_path / f"{'1' * 32}{BUILDING}{host}-{os.getpid()}",  # another key, its builder alive
        tmp_path / f"{'2' * 32}{BUILDING}elsewhere.example-{dead}",  # another machine's: not ours to judge
    ]
    for folder in stale + kept:
        (folder / "data" / "train").mkdir(parents=True)
        (folder / "data" / "train" / "data-00000-of-00001.arrow").write_bytes(b"\0" * 100)
    data, _ = prepare(spec, tokenizer, tmp_path)
    assert len(data.train) == TRAIN_ROWS
    assert [p.name for p in stale if p.exists()] == []
    assert all(p.is_dir() for p in kept)


def test_the_data_identity_follows_contents_not_modification_times(spec, tokenizer, tmp_path):
    local = tmp_path / HH
    shutil.copyfile(spec.sources[0].path, local)
    copied = DataSpec((SourceConfig(path=str(local)),), max_length=4096, max_examples=TRAIN_ROWS, max_val_examples=8)
    before = data_identity(copied, tokenizer)
    os.utime(local, ns=(1, 1))
    assert data_identity(copied, tokenizer) == before
    edit_last_pair(local)
    assert data_identity(copied, tokenizer) != before


# ---------------------------------------------------------------------------------------------- resumes (9)
def run(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exit:
        return int(exit.code or 0)


def fit_args(out: Path, data: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(CONFIGS / "meet_hh_prompt.yaml"),
        "--config",
        str(CONFIGS / "debug.yaml"),
        "--data.path",
        str(data),
        "--data.cache_dir",
        str(out.parent / "cache"),
        "--output_dir",
        str(out),
        *extra,
    ]


def error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def edit_last_pair(path: Path) -> None:
    """Changes the chosen answer of the file's last pair (a user fixing a typo in the data)."""
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    record = json.loads(lines[-1])
    record["chosen"] += " Edited."
    lines[-1] = json.dumps(record)
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))


@pytest.fixture()
def own_data(shared_data, tmp_path) -> Path:
    local = tmp_path / HH
    shutil.copyfile(shared_data / HH, local)
    return local


def test_row9_a_stage_cut_off_then_resumed_on_edited_data_is_refused(own_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with pytest.raises(InjectedFault):
        fit_with_fault("stage1:step=2", *fit_args(out, own_data))
    last = out / "stage1" / "checkpoints" / "last.ckpt"
    assert last.is_file() and not (out / "stage1" / "done.json").exists()
    edit_last_pair(own_data)
    capsys.readouterr()
    assert run(*fit_args(out, own_data)) == 2  # the old code resumed from last.ckpt on the new data, exit 0
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"error: stage1: {last} was trained on other data"), err
    assert "--overwrite true" in err
    assert not (out / "stage1" / "done.json").exists()
    assert run(*fit_args(out, own_data, "--overwrite", "true")) == 0  # the offered fix works


def test_row9_a_finished_stage_is_not_skipped_for_edited_data(own_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(*fit_args(out, own_data, "--stage2.model", "null")) == 0
    edit_last_pair(own_data)
    capsys.readouterr()
    assert run(*fit_args(out, own_data, "--stage2.model", "null")) == 2  # the old code skipped it, exit 0
    err = error_line(capsys.readouterr().err)
    assert err.startswith(f"error: stage1: {out / 'stage1' / 'done.json'} was trained on other data"), err
    assert "--overwrite true" in err


def test_settings_that_cannot_change_results_do_not_block_a_resume(own_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(*fit_args(out, own_data, "--stage2.model", "null")) == 0
    capsys.readouterr()
    neutral = (
        "--stage2.model", "null",
        "--data.num_workers", "1",  # the old code: "holds a run of another recipe" and --overwrite (progress lost)
        "--data.cache_dir", str(tmp_path / "another-cache"),
        "--stage1.trainer.log_every_n_steps", "7",
        "--stage1.trainer.enable_progress_bar", "true",
        "--stage1.checkpoint_every_n_steps", "5",
    )  # fmt: skip
    assert run(*fit_args(out, own_data, *neutral)) == 0, capsys.readouterr().err
    assert "stage1: finished earlier" in capsys.readouterr().out
    assert run(*fit_args(out, own_data, "--stage2.model", "null", "--data.batch_size", "2")) == 2  # still refused
    assert "data.batch_size: 4 → 2" in error_line(capsys.readouterr().err)
