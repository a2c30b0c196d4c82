"""Checks on the hand-written length demo data in ``meet_lightning/demo_data``."""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from importlib.resources import files

import pytest

DEMO = files("meet_lightning") / "demo_data"
TRAIN = "length_train.jsonl"
HELDOUT = "length_heldout.jsonl"
CONTROLS = ("concise", "verbose")

# A sentence ends at '.', '!' or '?' followed by whitespace or the end of the text, so decimals
# such as "1.6" stay inside one sentence.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _read_jsonl(name: str) -> list[dict]:
    text = (DEMO / name).read_text(encoding="utf-8")
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        assert line.strip(), f"{name}:{lineno}: blank line"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            pytest.fail(f"{name}:{lineno}: invalid JSON ({err})")
        assert isinstance(row, dict), f"{name}:{lineno}: expected a JSON object, got {type(row).__name__}"
        rows.append(row)
    return rows


def _sentences(text: str) -> list[str]:
    return [" ".join(s.lower().split()) for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def _words(text: str) -> int:
    return len(text.split())


def _norm(prompt: str) -> str:
    return " ".join(prompt.lower().split())


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return _read_jsonl(TRAIN)


@pytest.fixture(scope="module")
def heldout() -> list[dict]:
    return _read_jsonl(HELDOUT)


def test_counts(train, heldout):
    assert len(train) >= 150, f"{TRAIN} has {len(train)} records, expected at least 150"
    assert len(heldout) == 20, f"{HELDOUT} has {len(heldout)} records, expected exactly 20"


def test_fields_present_and_non_empty(train, heldout):
    for i, row in enumerate(train, start=1):
        where = f"{TRAIN}:{i}"
        assert set(row) == {"prompt", *CONTROLS}, f"{where}: keys {sorted(row)}, want prompt/concise/verbose"
        for key in ("prompt", *CONTROLS):
            assert isinstance(row[key], str) and row[key].strip(), f"{where}: empty or non-string {key!r}"
    for i, row in enumerate(heldout, start=1):
        assert set(row) == {"prompt"}, f"{HELDOUT}:{i}: keys {sorted(row)}, expected only 'prompt'"
        assert isinstance(row["prompt"], str) and row["prompt"].strip(), f"{HELDOUT}:{i}: empty prompt"


def test_concise_is_short(train):
    for i, row in enumerate(train, start=1):
        where = f"{TRAIN}:{i} ({row['prompt']!r})"
        n_sent, n_words = len(_sentences(row["concise"])), _words(row["concise"])
        assert 1 <= n_sent <= 2, f"{where}: concise has {n_sent} sentences, expected 1-2"
        assert n_words <= 45, f"{where}: concise has {n_words} words, expected <= 45"


def test_verbose_is_long(train):
    for i, row in enumerate(train, start=1):
        where = f"{TRAIN}:{i} ({row['prompt']!r})"
        n_words = _words(row["verbose"])
        assert 120 <= n_words <= 200, f"{where}: verbose has {n_words} words, expected 120-200"


def test_no_duplicate_prompts(train, heldout):
    train_keys = [_norm(r["prompt"]) for r in train]
    held_keys = [_norm(r["prompt"]) for r in heldout]
    for name, keys in ((TRAIN, train_keys), (HELDOUT, held_keys)):
        dupes = [k for k, n in Counter(keys).items() if n > 1]
        assert not dupes, f"duplicate prompts in {name}: {dupes}"
    overlap = sorted(set(train_keys) & set(held_keys))
    assert not overlap, f"held-out prompts also in the training file: {overlap}"


def test_no_sentence_overused(train):
    counts = Counter(s for row in train for key in CONTROLS for s in _sentences(row[key]))
    overused = {s: n for s, n in counts.items() if n > 3}
    assert not overused, f"sentences used more than 3 times across all answers: {overused}"


def test_verbose_much_longer_than_concise(train):
    ratio = statistics.median(_words(r["verbose"]) / _words(r["concise"]) for r in train)
    assert ratio >= 3, f"median verbose/concise word ratio is {ratio:.2f}, expected >= 3"
