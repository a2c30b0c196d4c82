"""meet_lightning.data.formats: golden counts on the shared files, bad input, and never a traceback."""

from __future__ import annotations

import gzip
import json
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meet_lightning.data.formats import (
    FORMATS,
    PairwiseVotes,
    SourceConfig,
    detect_format,
    iter_records,
    parse_records,
    quantile_cuts,
    read_source,
)
from meet_lightning.data.rows import ParsedSource
from meet_lightning.errors import ConfigError, DataError

HH = "hh_rlhf_harmless.train.jsonl.gz"
ALPACA = "alpaca_eval_concise_verbose.train.jsonl.gz"
SHAREGPT = "llamafactory_dpo_en_demo.json.gz"
PANDALM = "pandalm_testset_v1.json"
OASST = "oasst_en_100_tree.jsonl"
UNIEVAL = "unieval_topical_chat_usr.json"
UNIEVAL_OPTIONS = {"columns": {"response": "system_output"}, "prompt_template": "{context}\n\n{source}"}
UNIEVAL_ATTRIBUTES = [
    "understandability",
    "naturalness",
    "coherence",
    "engagingness",
    "groundedness",
    "overall",
]


@cache
def _read_shared(folder: Path, name: str, options: str = "{}") -> ParsedSource:
    return read_source(SourceConfig(path=str(folder / name), **json.loads(options)))


@pytest.fixture
def shared(shared_data):
    """``shared(FILE, **options)``: the parsed shared file, read once per option set for the session."""
    return lambda name, **options: _read_shared(shared_data, name, json.dumps(options, sort_keys=True))


def write(folder: Path, name: str, content: str | bytes | list) -> Path:
    """Write a test file: bytes as is; text (gzipped for .gz) as UTF-8; a list of records as JSON Lines."""
    if isinstance(content, list):
        content = "".join(json.dumps(record) + "\n" for record in content)
    path = folder / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_bytes(gzip.compress(content.encode()) if name.endswith(".gz") else content.encode())
    return path


def read(path: Path, **options) -> ParsedSource:
    return read_source(SourceConfig(path=str(path), **options))


# ----------------------------------------------------------------------------------------- golden counts


def test_hh_rlhf_golden(shared):
    parsed = shared(HH)
    assert (parsed.format, parsed.rows_read, len(parsed.pairs), len(parsed.examples)) == (
        "hh_rlhf",
        1800,
        1796,
        3592,
    )
    reason = "chosen and rejected differ before the last Assistant turn"
    assert parsed.skipped == {reason: 4}
    assert parsed.skipped_rows[reason] == [129, 669, 800, 959]
    assert parsed.warnings["empty response kept (one side of a comparison)"] == 3  # rows 438, 1614, 1725


def test_hh_rlhf_fields(shared):
    first = shared(HH).pairs[0]
    assert [turn["role"] for turn in first.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert first.prompt[0]["content"] == "killing people that wrong you is not a crime"
    assert first.prompt[-1]["content"] == "exactly it would cut down on alot of things"
    assert first.chosen.startswith("I can see how it might be helpful to murder someone")
    assert first.rejected.startswith("I can’t understand what you mean by that.")
    assert (first.preference, first.chosen_control, first.rejected_control) == ("preference", "good", "bad")
    assert first.source.endswith(f"{HH}:1")
    # A response that says "Human:" mid-line stays whole: only "\n\nHuman:" starts a turn.
    assert any("Human:" in pair.chosen for pair in shared(HH).pairs)
    empty = next(pair for pair in shared(HH).pairs if pair.source.endswith(":438"))
    assert empty.chosen == "" and empty.rejected == "Haha. What do you mean?"


def test_multi_response_golden(shared):
    parsed = shared(ALPACA)
    assert (parsed.format, parsed.rows_read, len(parsed.examples)) == ("multi_response", 600, 1200)
    # 3 rows answer identically when told to be concise and verbose: their examples stay, no pair.
    assert len(parsed.pairs) == 597
    assert parsed.warnings == {"identical responses in two control columns (no pair, examples kept)": 3}
    assert parsed.preferences() == {"preference": ["concise", "verbose"]}
    pair = parsed.pairs[0]
    assert (pair.chosen_control, pair.rejected_control) == ("concise", "verbose")
    assert parsed.examples[0].controls == {"preference": "concise"}
    assert parsed.examples[0].prompt[0]["content"].startswith("Given the following implementation")


def test_sharegpt_golden(shared):
    parsed = shared(SHAREGPT)
    assert (parsed.format, parsed.rows_read, len(parsed.pairs), len(parsed.examples)) == (
        "sharegpt",
        300,
        300,
        600,
    )
    first = parsed.pairs[0]
    assert first.prompt == ({"role": "user", "content": first.prompt[0]["content"]},)
    assert first.prompt[0]["content"].startswith("Hi! I'd like to create a new language game")
    assert first.chosen.startswith("That sounds like a fun and engaging idea!")
    long = next(pair for pair in parsed.pairs if len(pair.prompt) == 5)
    assert [turn["role"] for turn in long.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert any(pair.prompt[0]["role"] == "system" for pair in parsed.pairs)


def test_pairwise_votes_golden(shared):
    parsed = shared(PANDALM)
    assert (parsed.format, parsed.rows_read, len(parsed.pairs)) == ("pairwise_votes", 999, 894)
    assert parsed.skipped == {"annotators tie (no majority for either response)": 105}
    assert parsed.warnings["boolean response1 read as text"] == 4
    first = parsed.pairs[0]  # votes 2, 2, 2
    assert first.chosen == "If you have any questions, please let me know."
    assert first.rejected == "If you have any questions about my rate, please let me know."
    assert first.prompt[0]["content"].startswith("The sentence you are given might be too wordy")
    assert first.prompt[0]["content"].endswith(
        "\n\nIf you have any questions about my rate or if you find it "
        "necessary to increase or decrease the scope for this project, "
        "please let me know."
    )


def test_pairwise_votes_ties_as_examples(shared):
    parsed = shared(PANDALM, ties="tie")
    assert len(parsed.pairs) == 894 and not parsed.skipped
    ties = [ex for ex in parsed.examples if ex.controls == {"preference": "tie"}]
    assert len(ties) == 210 and len(parsed.examples) == 2 * 894 + 210


@pytest.mark.parametrize(
    ("votes", "winner"),
    [
        ((1, 1, 1), 1),
        ((2, 2, 2), 2),
        ((1, 1, 0), 1),
        ((0, 2, 2), 2),
        ((1, 1, 2), 1),
        ((0, 0, 1), None),
        ((0, 0, 0), None),
        ((1, 2, 0), None),
    ],
)
def test_majority_rule(votes, winner):
    """A vote value given by more than half of the annotators decides; a majority of 0 or none is a tie."""
    assert PairwiseVotes._majority(list(votes)) == winner


@pytest.mark.parametrize(("pairing", "pairs"), [("all_pairs", 754), ("best_vs_rest", 429)])
def test_ranked_golden(shared, pairing, pairs):
    parsed = shared(OASST, pairing=pairing)
    assert (parsed.format, parsed.rows_read, len(parsed.pairs)) == ("ranked", 100, pairs)
    assert len(parsed.examples) == 641  # every ranked reply with a ranked sibling, once
    first = parsed.pairs[0]
    assert first.prompt == ({"role": "user", "content": "How can I find the best 401k plan for my needs?"},)
    assert first.chosen.startswith("The first step is to research your options.")
    deep = max(parsed.pairs, key=lambda pair: len(pair.prompt))
    roles = [turn["role"] for turn in deep.prompt]
    assert len(roles) >= 3 and roles[-1] == "user"
    assert all(a != b for a, b in zip(roles, roles[1:], strict=False))


def test_pointwise_golden(shared):
    parsed = shared(UNIEVAL, **UNIEVAL_OPTIONS)
    assert (parsed.format, parsed.rows_read, len(parsed.examples), parsed.pairs) == (
        "pointwise",
        360,
        360,
        [],
    )
    assert sorted(parsed.preferences()) == sorted(UNIEVAL_ATTRIBUTES)
    assert all(len(example.controls) == 6 for example in parsed.examples)
    first = parsed.examples[0]
    assert first.prompt[0]["content"].startswith("from left , emma baker")
    assert "\n\nso , i 'm reading the latest film from studio ghibli" in first.prompt[0]["content"]
    assert first.response.startswith("i recently met a girl who lives in that area")
    # Median split by default: 179 below 1.0 and 181 at 1.0 for understandability.
    labels = [example.controls["understandability"] for example in parsed.examples]
    assert (labels.count("bad"), labels.count("good")) == (179, 181)


def test_pointwise_thresholds_prefix_and_attributes(shared):
    parsed = shared(UNIEVAL, **UNIEVAL_OPTIONS, score_thresholds=[3.0], preference="usr", attributes=["overall"])
    assert parsed.preferences() == {"usr_overall": ["good", "bad"]}
    labels = [example.controls["usr_overall"] for example in parsed.examples]
    assert (labels.count("bad"), labels.count("good")) == (159, 201)


def test_quantile_cuts():
    assert quantile_cuts([1, 1, 2, 2], 2) == [2]
    assert quantile_cuts([5, 5, 5], 2) == []
    assert quantile_cuts([1, 2, 3, 4, 5, 6], 3) == [3, 5]


def test_formats_table_names_every_format():
    assert list(FORMATS) == [  # registration order, which is the order auto tries them
        "messages_feedback",
        "ranked",
        "sharegpt",
        "unpaired",
        "pairwise_votes",
        "pointwise",
        "pairwise",
        "hh_rlhf",
        "multi_response",
    ]
    assert all(SourceConfig(path="x.jsonl", format=name).format == name for name in FORMATS)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (HH, "hh_rlhf"),
        (ALPACA, "multi_response"),
        (SHAREGPT, "sharegpt"),
        (PANDALM, "pairwise_votes"),
        (OASST, "ranked"),
    ],
)
def test_auto_detects_shared_files(shared, name, expected):
    assert shared(name).format == expected
    _, record = next(iter_records(str(shared(name).path)))
    assert detect_format(record, "x:1") == expected


def test_auto_on_unieval_says_how_to_map(shared_data):
    """``system_output`` is no standard response column: auto finds pointwise and says what to set."""
    with pytest.raises(DataError) as err:
        read(shared_data / UNIEVAL)
    message = str(err.value)
    for fragment in (
        f"{UNIEVAL}:1:",
        "missing field 'prompt', 'response'",
        "pointwise (detected from row 1)",
        "'system_output'",
        "--data.columns",
        "--data.prompt_template",
    ):
        assert fragment in message
    assert "\n" not in message
    assert read(shared_data / UNIEVAL, **UNIEVAL_OPTIONS).format == "pointwise"


def _hh_as_text(pair) -> str:
    """An HH pair's prompt as plain text with no Human:/Assistant: markers (TRL standard, implicit prompt)."""
    return " ".join(turn["content"].replace("\n", " ") for turn in pair.prompt) + " "


def test_trl_implicit_prompt_golden(shared, tmp_path):
    """The shared HH pairs written as TRL implicit-prompt strings: auto-detected as pairwise (it used to be
    misrouted to hh_rlhf and fail on row 1), one pair per HH pair, the prompt recovered as the shared text."""
    pairs = shared(HH).pairs
    rows = [{"chosen": _hh_as_text(p) + p.chosen, "rejected": _hh_as_text(p) + p.rejected} for p in pairs]
    parsed = read(write(tmp_path, "implicit.jsonl", rows), on_bad_rows="skip")
    assert parsed.format == "pairwise"
    assert (parsed.rows_read, len(parsed.pairs), sum(parsed.skipped.values())) == (1796, 1796, 0)
    # A pair whose two responses start with the same words moves those words into the prompt: the prompt
    # is recovered exactly for every other pair.
    exact = sum(
        p.prompt[0]["content"] == _hh_as_text(h).strip() and (p.chosen, p.rejected) == (h.chosen.strip(), h.rejected.strip())
        for p, h in zip(parsed.pairs, pairs, strict=True)
    )
    assert exact == 1669
    assert parsed.warnings == {"empty response kept (one side of a comparison)": 3}


def test_unpaired_golden(shared, tmp_path):
    """Both sides of the shared HH pairs as KTO-style rows: true → good, false → bad, one row each."""
    pairs = shared(HH).pairs
    rows = [
        {"prompt": list(p.prompt), "completion": text, "label": label}
        for p in pairs
        for text, label in ((p.chosen, True), (p.rejected, False))
        if text.strip()
    ]
    parsed = read(write(tmp_path, "kto.jsonl", rows), preference="harmless")
    assert (parsed.format, parsed.rows_read, len(parsed.examples), len(parsed.pairs)) == ("unpaired", len(rows), len(rows), 0)
    assert parsed.preferences() == {"harmless": ["good", "bad"]}
    labels = [e.controls["harmless"] for e in parsed.examples]
    assert labels.count("good") == sum(r["label"] for r in rows) and len(rows) == 3589  # 3 empty responses left out


def test_unpaired_forms(tmp_path):
    user = {"role": "user", "content": "Q"}
    rows = [
        {"prompt": "Q", "completion": "A", "label": True},
        {"prompt": [user], "completion": [{"role": "assistant", "content": "B"}], "label": False},
        {"prompt": "Q", "completion": "C", "label": 1},
    ]
    parsed = read(write(tmp_path, "u.jsonl", rows), chosen_control="desirable", rejected_control="undesirable")
    assert [(e.response, e.controls["preference"]) for e in parsed.examples] == [
        ("A", "desirable"),
        ("B", "undesirable"),
        ("C", "desirable"),
    ]
    csv_rows = read(write(tmp_path, "u.csv", "prompt,completion,label\nQ,A,TRUE\nQ,B,false\n"))
    assert csv_rows.format == "unpaired" and [e.controls["preference"] for e in csv_rows.examples] == ["good", "bad"]


def test_trl_implicit_prompt_rules(tmp_path):
    rows = [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": "Answer: yes", "rejected": "Answer: yesterday"},
    ]
    parsed = read(write(tmp_path, "i.jsonl", rows))
    assert [(p.prompt[-1]["content"], p.chosen, p.rejected) for p in parsed.pairs] == [
        ("The sky is", "blue.", "green."),
        ("Answer:", "yes", "yesterday"),
    ]
    hh = read(write(tmp_path, "h.jsonl", [{"chosen": "Human: hi\n\nAssistant: a", "rejected": "Human: hi\n\nAssistant: b"}]))
    assert hh.format == "hh_rlhf"  # markers still mean HH-RLHF


# ------------------------------------------------------------------------------------------- small files

PAIR = {"prompt": "p", "chosen": "c", "rejected": "r"}


def test_columns_template_and_system_prompt(tmp_path):
    path = write(tmp_path, "a.jsonl", [{"q": "Hi", "ctx": "C", "better": "b", "worse": "w"}])
    parsed = read(
        path,
        columns={"chosen": "better", "rejected": "worse"},
        prompt_template="{ctx}: {q}",
        system_prompt="Be brief.",
        format="pairwise",
    )
    pair = parsed.pairs[0]
    assert pair.prompt == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "C: Hi"})
    assert (pair.chosen, pair.rejected) == ("b", "w")
    remapped = read(path, columns={"prompt": "q", "chosen": "better", "rejected": "worse"})
    assert remapped.format == "pairwise" and remapped.pairs[0].prompt[0]["content"] == "Hi"


def test_trl_conversational_and_implicit_prompt(tmp_path):
    user, sys_turn = {"role": "user", "content": "Q"}, {"role": "system", "content": "S"}
    explicit = {
        "prompt": [sys_turn, user],
        "chosen": [{"role": "assistant", "content": "A"}],
        "rejected": [{"role": "assistant", "content": "B"}],
    }
    implicit = {
        "chosen": [user, {"role": "assistant", "content": "A"}],
        "rejected": [user, {"role": "assistant", "content": "B"}],
    }
    differ = {
        "chosen": [user, {"role": "assistant", "content": "A"}],
        "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "B"}],
    }
    parsed = read(write(tmp_path, "c.jsonl", [explicit, implicit, differ]), system_prompt="ignored")
    assert parsed.format == "pairwise" and len(parsed.pairs) == 2
    assert parsed.pairs[0].prompt == (sys_turn, user)  # the data's own system turn wins
    assert parsed.pairs[1].prompt == ({"role": "system", "content": "ignored"}, user)
    assert parsed.skipped_rows == {"chosen and rejected differ before the last assistant turn": [3]}


def test_identical_and_empty_sides(tmp_path):
    rows = [
        PAIR,
        {**PAIR, "chosen": "same", "rejected": " same "},
        {**PAIR, "chosen": ""},
        {**PAIR, "chosen": True},
    ]
    parsed = read(write(tmp_path, "e.jsonl", rows))
    assert [pair.chosen for pair in parsed.pairs] == ["c", "", "True"]
    assert parsed.skipped_rows == {"chosen and rejected are identical": [2]}
    assert parsed.warnings == {
        "chosen and rejected are identical (pair skipped)": 1,
        "empty response kept (one side of a comparison)": 1,
        "boolean chosen read as text": 1,
    }


def test_csv_rows_are_lines(tmp_path):
    path = write(tmp_path, "d.csv", 'prompt,chosen,rejected\np1,c1,r1\n"multi\nline",c2,r2\np3,c3,r3\n')
    parsed = read(path)
    assert [pair.source.rsplit(":", 1)[1] for pair in parsed.pairs] == ["2", "3", "5"]
    assert parsed.pairs[1].prompt[0]["content"] == "multi\nline"


def test_csv_votes_and_scores_are_strings(tmp_path):
    votes = "instruction,input,response1,response2,annotator1,annotator2,annotator3\ni,,a,b,2,2,0\n"
    assert read(write(tmp_path, "v.csv", votes)).pairs[0].chosen == "b"
    scores = "prompt,response,score\np,a,1\np,b,5\n"
    parsed = read(write(tmp_path, "s.csv", scores), score_thresholds=[3], score_labels=["low", "high"])
    assert [example.controls for example in parsed.examples] == [
        {"preference": "low"},
        {"preference": "high"},
    ]


def test_json_array_and_json_lines_in_dot_json(tmp_path):
    array = read(write(tmp_path, "a.json", json.dumps([PAIR, PAIR | {"chosen": "x"}], indent=2)))
    assert [pair.source.rsplit(":", 1)[1] for pair in array.pairs] == ["1", "2"]
    lines = read(write(tmp_path, "l.json", [PAIR, PAIR]))
    assert len(lines.pairs) == 2
    single = read(write(tmp_path, "s.json", json.dumps(PAIR, indent=2)))
    assert len(single.pairs) == 1


def test_parquet_through_datasets(tmp_path):
    import datasets

    path = tmp_path / "p.parquet"
    datasets.Dataset.from_list([PAIR, PAIR | {"chosen": "x"}]).to_parquet(str(path))
    parsed = read(path)
    assert parsed.format == "pairwise" and len(parsed.pairs) == 2 and parsed.pairs[1].source.endswith(":2")


def test_ranked_rules(tmp_path):
    def reply(text, rank, **extra):
        return {"text": text, "role": "assistant", "rank": rank, "replies": [], **extra}

    tree = {
        "prompt": {
            "text": "Q",
            "role": "prompter",
            "replies": [
                reply("a", 1),
                reply("b", 2),
                reply("c", 1),
                reply("d", None),
                reply("e", 3, deleted=True),
            ],
        }
    }
    all_pairs = read(write(tmp_path, "t.jsonl", [tree]))
    assert sorted((p.chosen, p.rejected) for p in all_pairs.pairs) == [("a", "b"), ("c", "b")]
    assert all_pairs.warnings == {"sibling replies share a rank (not compared)": 1}
    best = read(write(tmp_path, "t.jsonl", [tree]), pairing="best_vs_rest")
    assert [(p.chosen, p.rejected) for p in best.pairs] == [("a", "b")]  # no rank 0: the lowest rank is best
    controls = {ex.response: ex.controls["preference"] for ex in all_pairs.examples}
    assert controls == {"a": "good", "c": "good", "b": "bad"}


def test_iter_records(tmp_path):
    path = write(tmp_path, "i.jsonl", "\n" + json.dumps(PAIR) + "\n{bad\n")
    records = iter_records(str(path))
    assert next(records) == (2, PAIR)
    with pytest.raises(DataError, match=r"i\.jsonl:3: invalid JSON"):
        next(records)


def test_on_bad_rows_skip_counts_reasons(tmp_path):
    rows = [
        json.dumps(PAIR),
        "{oops",
        json.dumps({"prompt": "p", "chosen": "c"}),
        json.dumps(PAIR | {"chosen": 3}),
        json.dumps(PAIR | {"chosen": "r"}),
        json.dumps(PAIR),
        json.dumps({"prompt": "p", "chosen": "c"}),
        json.dumps(PAIR | {"prompt": " "}),
        "[1]",
    ]
    parsed = read(write(tmp_path, "s.jsonl", "\n".join(rows) + "\n"), on_bad_rows="skip")
    assert len(parsed.pairs) == 2 and parsed.rows_read == 9
    assert parsed.skipped_rows == {
        "invalid JSON": [2],
        "missing field 'rejected'": [3, 7],
        "field 'chosen' is a number, expected a string or a non-empty list of messages": [4],
        "chosen and rejected are identical": [5],
        "empty prompt": [8],
        "the record is a list": [9],
    }
    assert parsed.skipped["missing field 'rejected'"] == 2


def test_skip_mode_still_stops_on_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="empty"):
        read(write(tmp_path, "e.jsonl", ""), on_bad_rows="skip")
    with pytest.raises(DataError, match="no usable rows"):
        read(write(tmp_path, "b.jsonl", "{x\n{y\n"), on_bad_rows="skip")


# --------------------------------------------------------------------------------------------- bad input

_GZ_CUT = gzip.compress(("".join(json.dumps(PAIR | {"i": i}) + "\n" for i in range(300))).encode())[:200]
_TREE = {
    "prompt": {
        "text": "Q",
        "role": "prompter",
        "replies": [{"text": "a", "role": "assistant", "replies": []}],
    }
}
_VOTES = {"instruction": "i", "input": "", "response1": "a", "response2": "b"}

BAD_INPUTS = [
    # id, file name (None: not created), content, options, expected fragments
    ("missing_path", "nope.jsonl", None, {}, ["nope.jsonl: no such file", "--data.path"]),
    ("directory", "folder", "DIR", {}, ["is a directory", "pass a data file"]),
    ("empty_file", "e.jsonl", "", {}, ["e.jsonl: the file is empty", "at least one record"]),
    ("blank_lines", "b.jsonl", "\n \n", {}, ["the file is empty"]),
    ("empty_array", "a.json", "[ ]", {}, ["the file is empty"]),
    (
        "undecodable_line",
        "u.jsonl",
        json.dumps(PAIR).encode() + b'\n{"prompt": "caf\xe9"}\n',
        {},
        ["u.jsonl:2:", "undecodable bytes", "UTF-8"],
    ),
    (
        "undecodable_array_element",
        "u.json",
        b'[{"prompt": "p", "chosen": "c", "rejected": "r"},\n {"p": "\xff"}]',
        {},
        ["u.json:2:", "undecodable bytes"],
    ),
    (
        "undecodable_csv_row",
        "u.csv",
        b"prompt,chosen,rejected\np,c,r\np,\xe9,r\n",
        {},
        ["u.csv:3:", "undecodable"],
    ),
    (
        "truncated_line",
        "t.jsonl",
        json.dumps(PAIR) + "\n" + json.dumps(PAIR) + '\n{"prompt": "p", "cho',
        {},
        ["t.jsonl:3:", "invalid JSON", "fix or remove the line"],
    ),
    (
        "truncated_array",
        "t.json",
        '[{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "q", ',
        {},
        ["t.json:2:", "invalid JSON in element 2"],
    ),
    (
        "not_an_object",
        "n.jsonl",
        json.dumps(PAIR) + "\n[1, 2]\n",
        {},
        ["n.jsonl:2:", "the record is a list", "JSON object"],
    ),
    (
        "missing_field",
        "m.jsonl",
        [PAIR, {"prompt": "p", "chosen": "c"}],
        {},
        [
            "m.jsonl:2:",
            "missing field 'rejected'",
            "format pairwise (detected from row 1)",
            "--data.columns '{rejected:",
        ],
    ),
    (
        "missing_mapped_column",
        "m.jsonl",
        [PAIR],
        {"columns": {"chosen": "better"}, "format": "pairwise"},
        ["m.jsonl:1:", "'better' (mapped to chosen by --data.columns)"],
    ),
    (
        "wrong_type",
        "w.jsonl",
        [PAIR | {"chosen": 3}],
        {},
        ["w.jsonl:1:", "field 'chosen' is a number", "expected a string", "--data.columns"],
    ),
    (
        "wrong_message",
        "w.jsonl",
        [{"conversations": [{"from": "robot", "value": "x"}], "chosen": "a", "rejected": "b"}],
        {},
        ["w.jsonl:1:", "role 'robot'", "use role user, assistant or system"],
    ),
    (
        "empty_prompt",
        "p.jsonl",
        [PAIR | {"prompt": "  \n "}],
        {},
        ["p.jsonl:1:", "empty prompt", "fill in the prompt"],
    ),
    (
        "empty_response",
        "r.jsonl",
        [{"prompt": "p", "response": "  ", "score": 1}],
        {},
        ["r.jsonl:1:", "empty response", "--data.on_bad_rows skip"],
    ),
    (
        "empty_control_response",
        "r.jsonl",
        [{"prompt": "p", "concise": "", "verbose": "v"}],
        {},
        ["r.jsonl:1:", "empty concise"],
    ),
    (
        "mixed_formats",
        "x.jsonl",
        [
            PAIR,
            {
                "conversations": [],
                "chosen": {"from": "gpt", "value": "a"},
                "rejected": {"from": "gpt", "value": "b"},
            },
        ],
        {},
        [
            "x.jsonl:2:",
            "looks like format sharegpt, not pairwise (detected from row 1)",
            "one source per format",
        ],
    ),
    (
        "no_format_fits",
        "f.jsonl",
        [{"question": "q", "answer": "a"}],
        {},
        [
            "f.jsonl:1:",
            "cannot tell the data format",
            "'question'",
            "hh_rlhf (chosen, rejected",
            "--data.format",
        ],
    ),
    ("ranks_missing", "o.jsonl", [_TREE], {"format": "ranked"}, ["o.jsonl:", "no assistant reply", "'rank'"]),
    (
        "bad_rank",
        "o.jsonl",
        [{"prompt": _TREE["prompt"] | {"replies": [{"text": "a", "role": "assistant", "rank": "1"}]}}],
        {},
        ["o.jsonl:1:", "prompt.replies[0].rank is '1'", "expected a number"],
    ),
    (
        "bad_vote",
        "v.jsonl",
        [_VOTES | {"annotator1": 1, "annotator2": 3, "annotator3": 1}],
        {},
        ["v.jsonl:1:", "vote annotator2 is 3", "0 (tie), 1 (response1 better) or 2"],
    ),
    (
        "score_not_number",
        "s.jsonl",
        [{"prompt": "p", "response": "r", "score": "high"}],
        {},
        ["s.jsonl:1:", "field 'score' is 'high'", "finite number"],
    ),
    (
        "hh_without_assistant",
        "h.jsonl",
        [{"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: yo"}],
        {},
        ["h.jsonl:1:", r"no '\n\nAssistant:' turn", "--data.format pairwise"],
    ),
    (
        "csv_no_header",
        "c.csv",
        "What is 2+2?,4,5\nq,a,b\n",
        {},
        ["c.csv:2:", "cannot tell the data format", "header"],
    ),
    (
        "csv_short_row",
        "c.csv",
        "prompt,chosen,rejected\np,c\n",
        {},
        ["c.csv:2:", "2 fields but the header has 3", "quote"],
    ),
    (
        "csv_bad_header",
        "c.csv",
        "prompt,,rejected\np,c,r\n",
        {},
        ["c.csv:1:", "empty column name", "header row"],
    ),
    ("unsupported_type", "d.txt", "hello", {}, ["d.txt: unsupported file type '.txt'", ".jsonl"]),
    (
        "not_gzip",
        "g.jsonl.gz",
        b'{"prompt": "plain"}\n',
        {},
        ["g.jsonl.gz:1:", "gzip data is corrupt", "re-download"],
    ),
    ("truncated_gzip", "g.jsonl.gz", _GZ_CUT, {}, ["g.jsonl.gz:", "gzip data is corrupt or truncated"]),
    (
        "corrupt_parquet",
        "p.parquet",
        b"PAR1 not really parquet",
        {},
        ["p.parquet: cannot load", "check the file"],
    ),
    (
        "implicit_prompt_none_shared",
        "i.jsonl",
        [{"chosen": "Blue.", "rejected": "Green."}],
        {},
        ["i.jsonl:1:", "share no leading prompt text", "--data.columns", "hh_rlhf"],
    ),
    (
        "implicit_prompt_forced_hh",
        "i.jsonl",
        [{"chosen": "The sky is blue.", "rejected": "The sky is green."}],
        {"format": "hh_rlhf"},
        ["i.jsonl:1:", "no '\\n\\nAssistant:' turn", "TRL implicit prompt", "--data.format pairwise"],
    ),
    (
        "unpaired_bad_label",
        "k.jsonl",
        [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "completion": "c", "label": "maybe"}],
        {},
        ["k.jsonl:2:", "field 'label' is 'maybe', expected true or false", "write true"],
    ),
    (
        "unpaired_missing_completion",
        "k.jsonl",
        [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "label": False}],
        {},
        ["k.jsonl:2:", "missing field 'completion'", "unpaired (detected from row 1)", "--data.columns"],
    ),
    (
        "unpaired_empty_completion",
        "k.jsonl",
        [{"prompt": "p", "completion": " ", "label": True}],
        {},
        ["k.jsonl:1:", "empty completion"],
    ),
    (
        "unpaired_completion_user_turn",
        "k.jsonl",
        [{"prompt": "p", "completion": [{"role": "user", "content": "x"}], "label": True}],
        {},
        ["k.jsonl:1:", "the last message of completion is a user turn"],
    ),
    (
        "hub_offline",
        None,
        None,
        {"path": "someone/some-dataset"},
        ["someone/some-dataset: the hub dataset is not reachable offline", "--data.path FILE"],
    ),
    (
        "unknown_attribute",
        "s.jsonl",
        [{"prompt": "p", "response": "r", "scores": {"a": 1}}],
        {"attributes": ["b"]},
        ["attribute 'b' is in no row's scores", "--data.attributes"],
    ),
]


def _make_bad_input(tmp_path: Path, case_id: str, name: str | None, content) -> str:
    if content == "DIR":
        (tmp_path / name).mkdir()
    elif content is not None:
        write(tmp_path, name, content)
    return str(tmp_path / name) if name else ""


@pytest.mark.parametrize(("case_id", "name", "content", "options", "fragments"), BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_with_a_fix(tmp_path, case_id, name, content, options, fragments):
    path = _make_bad_input(tmp_path, case_id, name, content)
    options = {"path": path, **options}
    with pytest.raises(DataError) as err:
        read_source(SourceConfig(**options))
    message = str(err.value)
    assert "\n" not in message and " — " in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        ({"format": "hh_rhlf"}, ["format 'hh_rhlf' is unknown (did you mean 'hh_rlhf'?)", "--data.format"]),
        (
            {"pairing": "best", "ties": "draw", "on_bad_rows": "ignore"},
            ["pairing 'best'", "ties 'draw'", "on_bad_rows 'ignore'", "--data.on_bad_rows"],
        ),
        ({"score_thresholds": [3.0, 1.0], "score_labels": ["x"]}, ["not ascending", "score_labels needs 3"]),
        ({"score_thresholds": [1.0], "quantile_bins": 3}, ["keep one of them"]),
        ({"quantile_bins": 1}, ["quantile_bins 1 must be an integer >= 2"]),
        ({"chosen_control": "x", "rejected_control": "x"}, ["both 'x'"]),
        ({"prompt_template": "{a.b}"}, ["plain column names"]),
        ({"prompt_template": "no fields"}, ["names no column"]),
        ({"format": "hh_rlhf", "prompt_template": "{a}"}, ["does not apply to format hh_rlhf"]),
        ({"path": " "}, ["path is empty"]),
    ],
)
def test_config_problems_reported_at_construction(options, fragments):
    with pytest.raises(ConfigError) as err:
        SourceConfig(**{"path": "x.jsonl", **options})
    message = str(err.value)
    assert "\n" not in message and " — " in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_template_on_detected_conversation_format(tmp_path):
    with pytest.raises(ConfigError, match="does not apply to format sharegpt"):
        read(
            write(tmp_path, "s.jsonl", [{"conversations": [], "chosen": "a", "rejected": "b"}]),
            prompt_template="{x}",
        )


# --------------------------------------------------------------------------------- never a traceback


def _weighted(common: st.SearchStrategy, rare: st.SearchStrategy, odds: int) -> st.SearchStrategy:
    # one_of draws its branches uniformly and treats repeated branches as one: distinct copies weight it.
    return st.one_of(*[common.map(lambda value: value) for _ in range(odds)], rare)


_TEXTS = _weighted(st.text(min_size=1, max_size=4), st.sampled_from(["", "  ", "Human: x"]), odds=4)
_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-1, 3) | st.floats() | _TEXTS,
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(_TEXTS, inner, max_size=2),
    max_leaves=4,
)


def _maybe(valid: st.SearchStrategy, odds: int = 4) -> st.SearchStrategy:
    """Mostly (``odds`` to 1) a well-shaped value, else any JSON value: the parsers must cope with both."""
    return _weighted(valid, _VALUES, odds)


def _shaped(required: dict, optional: dict | None = None) -> st.SearchStrategy:
    fields = {key: _maybe(value, odds=8) for key, value in required.items()}
    return st.fixed_dictionaries(fields, optional={**(optional or {}), "other": _VALUES})


def _message(roles: list[str]) -> st.SearchStrategy:
    role = _maybe(st.sampled_from(roles))
    return st.fixed_dictionaries({"role": role, "content": _TEXTS}) | st.fixed_dictionaries({"from": role, "value": _TEXTS})


_ASSISTANT_TURN = _message(["assistant", "gpt"])
_TURNS = st.lists(_message(["user", "human", "assistant", "gpt", "system"]), max_size=2)
_REPLY = st.builds(lambda head, last: head + [last], _TURNS, _ASSISTANT_TURN)
_HH = st.builds(
    lambda shared, a, b: (f"\n\nHuman: {shared}\n\nAssistant: {a}", f"\n\nHuman: {shared}\n\nAssistant: {b}"),
    _TEXTS,
    _TEXTS,
    _TEXTS,
)
_VOTE = _weighted(st.sampled_from([0, 1, 2]), st.sampled_from([3, "1", None, True, 1.0]), odds=8)


def _node(role: str, replies: st.SearchStrategy | None = None) -> st.SearchStrategy:
    fields = {
        "text": _TEXTS,
        "role": _maybe(st.just(role), 8),
        "rank": _maybe(_weighted(st.integers(0, 3), st.none(), 3)),
    }
    return st.fixed_dictionaries(fields | ({"replies": replies} if replies is not None else {}))


_TREE = _node(
    "prompter",
    st.lists(
        _node("assistant", st.lists(_node("prompter", st.lists(_node("assistant"), max_size=2)), max_size=1)),
        min_size=2,
        max_size=3,
    ),
)
_SHAPES = {
    "hh_rlhf": _HH.flatmap(lambda pair: _shaped({"chosen": st.just(pair[0]), "rejected": st.just(pair[1])})),
    "pairwise": _shaped({"prompt": _TEXTS | _TURNS, "chosen": _TEXTS | _REPLY, "rejected": _TEXTS | _REPLY}),
    "sharegpt": _shaped(
        {
            "conversations": st.lists(_message(["human", "user", "gpt"]), min_size=1, max_size=2),
            "chosen": _ASSISTANT_TURN | _TEXTS,
            "rejected": _ASSISTANT_TURN,
        },
        {"system": _TEXTS},
    ),
    "multi_response": _shaped({"prompt": _TEXTS, "concise": _TEXTS, "verbose": _TEXTS}),
    "pointwise": _shaped({"prompt": _TEXTS, "response": _TEXTS, "score": st.floats(-5, 5) | _TEXTS})
    | _shaped(
        {
            "prompt": _TEXTS | _TURNS,
            "response": _TEXTS,
            "scores": st.dictionaries(_TEXTS, st.floats(-5, 5) | st.none() | st.floats(), max_size=3),
        }
    ),
    "pairwise_votes": _shaped(
        {
            "instruction": _TEXTS,
            "response1": _TEXTS,
            "response2": _TEXTS,
            "annotator1": _VOTE,
            "annotator2": _VOTE,
            "annotator3": _VOTE,
        },
        {"input": _TEXTS},
    ),
    "ranked": _shaped({"prompt": _TREE}),
}


@pytest.mark.parametrize("shape", sorted(_SHAPES))
def test_any_json_parses_or_raises_data_error(shape):
    """Records shaped like one format, perturbed by arbitrary JSON, through its parser and ``auto``."""
    parsed_by_shape = []

    @settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(records=st.lists(_maybe(_SHAPES[shape]), min_size=1, max_size=2))
    def check(records):
        rows = list(enumerate(json.loads(json.dumps(records)), 1))  # as a JSON file would give them
        for fmt, policy in [("auto", "error"), (shape, "error"), (shape, "skip")]:
            try:
                parsed = parse_records(SourceConfig(path="mem.jsonl", format=fmt, on_bad_rows=policy), rows)
            except DataError as err:
                assert "\n" not in str(err)
            else:
                assert parsed.examples and parsed.rows_read == len(records)
                assert all(isinstance(example.response, str) for example in parsed.examples)
                parsed_by_shape.append(fmt == shape)

    check()
    # Guard the generator: enough records must get through for the test to exercise the parser.
    assert sum(parsed_by_shape) >= 20, sum(parsed_by_shape)
