"""Tokenization, masking, truncation, batching and the PreferenceDataModule, on a tiny tokenizer built in code."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from meet_lightning.data.datamodule import PreferenceDataModule, ResumableBatchSampler
from meet_lightning.data.formats import SourceConfig
from meet_lightning.data.heldout import split_by_first_turn
from meet_lightning.data.rows import ControlledExample, ControlSchema, ParsedSource, PreferencePair
from meet_lightning.data.tokenization import IGNORE_INDEX, PromptTokenizer, collate_pairs, collate_rows
from meet_lightning.errors import ConfigError, DataError
from meet_lightning.models import build_tiny_tokenizer, end_of_turn_id, prepare_tokenizer

SCHEMA = ControlSchema.from_dict({"harmless": ["good", "bad"], "length": ["concise", "verbose"]})


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_labels_cover_the_response_and_its_end_of_turn_token_only(tokenizer):
    encoder = PromptTokenizer(tokenizer, max_length=200)
    row = encoder.tokenize(ControlledExample((user("Hi?"),), "Hello!", {"harmless": "good"}), SCHEMA)
    labelled = [t for t in row.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(labelled) == "Hello!<|im_end|>"
    assert labelled[-1] == end_of_turn_id(tokenizer)
    assert row.labels[: row.response_start] == (IGNORE_INDEX,) * row.response_start
    assert tokenizer.decode(row.input_ids[: row.response_start]).endswith("<|im_start|>assistant\n")
    assert row.prefix_pos == 0 and row.control_ids == (0, -1)


def test_fallback_template_without_a_chat_template(tokenizer):
    plain = build_tiny_tokenizer()
    plain.chat_template = None
    plain = prepare_tokenizer(plain)
    encoder = PromptTokenizer(plain, max_length=200)
    row = encoder.tokenize(ControlledExample((user("Hi?"),), "Hello!", {}), ControlSchema({}))
    assert plain.decode(row.input_ids[: row.response_start]).endswith("Assistant:")
    assert plain.decode([t for t in row.labels if t != IGNORE_INDEX]).strip() == f"Hello!{plain.eos_token}"


def test_truncation_drops_oldest_turns_first_and_keeps_the_system_turn(tokenizer):
    turns = [{"role": "system", "content": "Be nice."}]
    for i in range(6):
        turns += [user(f"question {i} " + "x" * 30), {"role": "assistant", "content": f"answer {i} " + "y" * 30}]
    turns.append(user("last question"))
    encoder = PromptTokenizer(tokenizer, max_length=220)
    row = encoder.tokenize(ControlledExample(tuple(turns), "final answer", {}), ControlSchema({}))
    text = tokenizer.decode(row.input_ids)
    assert len(row.input_ids) <= 220
    assert text.startswith("<|im_start|>system\nBe nice.") and "last question" in text and "final answer" in text
    assert "question 5" in text and "answer 5" in text  # the latest turns stay
    assert "question 0" not in text and "question 4" not in text  # the oldest went first
    assert text.index("<|im_start|>user") < text.index("<|im_start|>assistant")  # restarts on a user turn


def test_truncation_cuts_inside_a_long_single_turn_from_the_left(tokenizer):
    encoder = PromptTokenizer(tokenizer, max_length=80)
    row = encoder.tokenize(ControlledExample((user("START " + "z" * 200 + " END"),), "ok", {}), ControlSchema({}))
    text = tokenizer.decode(row.input_ids)
    assert len(row.input_ids) <= 80 and "END" in text and "START" not in text and text.endswith("ok<|im_end|>")


def test_a_response_longer_than_max_length_is_dropped(tokenizer):
    encoder = PromptTokenizer(tokenizer, max_length=40)
    assert encoder.tokenize(ControlledExample((user("q"),), "r" * 100, {}), ControlSchema({})) is None


def test_both_sides_of_a_pair_answer_the_same_cut_prompt(tokenizer):
    encoder = PromptTokenizer(tokenizer, max_length=80)
    pair = PreferencePair((user("START " + "z" * 200 + " END"),), "ok", "a much longer answer " * 2, "harmless")
    chosen, rejected = encoder.tokenize_pair(pair, SCHEMA)
    assert chosen.input_ids[: chosen.response_start] == rejected.input_ids[: rejected.response_start]
    assert max(len(chosen.input_ids), len(rejected.input_ids)) <= 80 and chosen.control_ids != rejected.control_ids
    alone = encoder.tokenize(pair.examples()[0], SCHEMA)  # cut for its own short response, it keeps more prompt
    assert alone.response_start > chosen.response_start
    assert encoder.tokenize_pair(PreferencePair(pair.prompt, "ok", "r" * 100, "harmless"), SCHEMA) is None


def test_collate_pairs_puts_chosen_first_and_pads_right(tokenizer):
    encoder = PromptTokenizer(tokenizer, max_length=100)
    pair = PreferencePair((user("q"),), "yes", "a much longer no", "harmless")
    rows = tuple(encoder.tokenize(e, SCHEMA) for e in pair.examples())
    batch = collate_pairs([rows, rows], tokenizer.pad_token_id)
    assert batch["input_ids"].shape[0] == 4 and int(batch["num_pairs"]) == 2
    assert batch["control_ids"][:, 0].tolist() == [0, 0, 1, 1]
    assert batch["attention_mask"][0].tolist()[-1] == 0 and batch["attention_mask"][2].tolist()[-1] == 1
    single = collate_rows([rows[0]], tokenizer.pad_token_id)
    assert single["control_ids"].shape == (1, 2)


def test_sampler_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch():
    lengths = [i % 17 for i in range(40)]
    full = ResumableBatchSampler(40, 4, seed=3, lengths=lengths)
    epoch0, epoch1 = list(full), list(full)
    assert epoch0 != epoch1 and sorted(i for b in epoch0 for i in b) == list(range(40))
    resumed = ResumableBatchSampler(40, 4, seed=3, lengths=lengths)
    iterator = iter(resumed)
    first = [next(iterator) for _ in range(3)]
    state = resumed.state_dict()
    restarted = ResumableBatchSampler(40, 4, seed=3, lengths=lengths)
    restarted.load_state_dict(state)
    assert first + list(restarted) == epoch0 and list(restarted) == epoch1


@pytest.mark.parametrize("world_size", [1, 2])
def test_sampler_skip_continues_the_stream_where_a_run_of_that_many_batches_stopped(world_size):
    lengths = [i % 17 for i in range(40)]
    ranks = [ResumableBatchSampler(40, 4, seed=3, lengths=lengths, rank=r, world_size=world_size) for r in range(world_size)]
    streams = [list(s) + list(s) + list(s) for s in ranks]  # three epochs of each rank's batches
    per_epoch = 10 // world_size  # batches of one epoch on one rank
    for skip in (0, 6, 10, 14):  # start, mid-epoch, an epoch boundary, into the second epoch
        for rank, stream in enumerate(streams):
            later = ResumableBatchSampler(40, 4, seed=3, lengths=lengths, rank=rank, world_size=world_size)
            later.skip(skip)
            start = skip // world_size
            rest_of_epoch = per_epoch - start % per_epoch
            assert list(later) + list(later) == stream[start : start + rest_of_epoch + per_epoch]


def test_sampler_splits_batches_between_ranks_without_overlap():
    ranks = [list(ResumableBatchSampler(40, 4, seed=1, rank=r, world_size=2)) for r in range(2)]
    seen = [i for batches in ranks for b in batches for i in b]
    assert len(ranks[0]) == len(ranks[1]) == 5 and sorted(seen) == list(range(40))


def test_split_keeps_every_row_and_pair_of_a_prompt_on_one_side():
    pairs = [PreferencePair((user(f"p{i % 7}"),), f"c{i}", f"r{i}", "harmless", source=str(i)) for i in range(30)]
    source = ParsedSource("x", "pairwise", 30, pairs, [e for p in pairs for e in p.examples()])
    train, val = split_by_first_turn([source], 0.3, seed=0)
    train_prompts = {json.dumps(p.prompt) for p in train.pairs} | {json.dumps(e.prompt) for e in train.examples}
    val_prompts = {json.dumps(p.prompt) for p in val.pairs} | {json.dumps(e.prompt) for e in val.examples}
    assert not train_prompts & val_prompts and len(val_prompts) == 2
    assert len(train.pairs) + len(val.pairs) == 30 and len(train.examples) + len(val.examples) == 60


def test_datamodule_on_real_hh_data_counts_and_batches(shared_data):
    data = PreferenceDataModule(
        path=str(shared_data / "hh_rlhf_harmless.train.jsonl.gz"),
        preference="harmless",
        model_name_or_path="tiny-debug",
        max_length=256,
        batch_size=4,
        val_fraction=0.1,
    )
    assert data.control_schema == {"harmless": ["good", "bad"]}
    data.setup("fit")
    kept, dropped = (
        data.summary["train: rows"] + data.summary["val: pairs"],
        data.summary["train: dropped, a response longer than max_length"],
    )
    assert data.summary["train: rows"] > 2000 and data.summary["val: pairs"] > 100 and dropped > 0 and kept > 0
    batch = next(iter(data.val_dataloader()))
    assert int(batch["num_pairs"]) == 4 and batch["input_ids"].shape[0] == 8
    assert "1800 rows read" in data.describe() and "4 chosen and rejected differ" in data.describe()


def test_pair_batches_for_dpo(shared_data):
    data = PreferenceDataModule(
        path=str(shared_data / "hh_rlhf_harmless.train.jsonl.gz"),
        model_name_or_path="tiny-debug",
        max_length=256,
        batch_size=2,
        pair_batches=True,
        max_examples=10,
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert int(batch["num_pairs"]) == 2 and batch["input_ids"].shape[0] == 4 and 0 < len(data.train_items) <= 10
    prompts = [[row.input_ids[: row.response_start] for row in pair] for pair in data.train_items]
    assert all(chosen == rejected for chosen, rejected in prompts)  # long HH prompts are cut once per pair


def test_several_sources_each_feed_their_own_preference(shared_data):
    from meet_lightning.data.formats import SourceConfig

    data = PreferenceDataModule(
        sources=[
            SourceConfig(path=str(shared_data / "hh_rlhf_harmless.train.jsonl.gz"), preference="harmless"),
            SourceConfig(path=str(shared_data / "alpaca_eval_concise_verbose.train.jsonl.gz"), preference="length"),
        ],
        model_name_or_path="tiny-debug",
        max_length=4096,
    )
    assert data.control_schema == {"harmless": ["good", "bad"], "length": ["concise", "verbose"]}
    data.setup("fit")
    labelled = {tuple(c >= 0 for c in row.control_ids) for row in data.train_items}
    assert labelled == {(True, False), (False, True)}  # a row without a label for a preference gets no token


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({}, "no data: set --data.path"),
        ({"path": "x.jsonl", "sources": [{"path": "y"}]}, "--data.path and --data.sources were both given"),
        ({"path": "x.jsonl", "batch_size": 0}, "--data.batch_size 0 must be ≥ 1"),
        ({"path": "x.jsonl", "val_fraction": 1.5}, "--data.val_fraction 1.5 must be in [0, 1)"),
        ({"path": "x.jsonl", "max_length": 2}, "--data.max_length 2 is too small"),
        ({"path": "x.jsonl", "max_examples": 0}, "--data.max_examples 0 must be ≥ 1"),
    ],
)
def test_datamodule_arguments_are_checked_at_construction(kwargs, fragment):
    with pytest.raises(ConfigError) as error:
        PreferenceDataModule(**kwargs)
    assert fragment in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------ tokenized cache

HH_FILE = "hh_rlhf_harmless.train.jsonl.gz"


def hh_module(path, cache, **options) -> PreferenceDataModule:
    defaults = dict(preference="harmless", model_name_or_path="tiny-debug", max_length=128, batch_size=4, max_examples=64)
    return PreferenceDataModule(path=str(path), cache_dir=str(cache), **{**defaults, **options})


def as_lists(items) -> list:
    return [items[i] for i in range(len(items))]


def test_tokenized_once_and_reused_by_the_next_data_module(shared_data, tmp_path):
    first = hh_module(shared_data / HH_FILE, tmp_path)
    first.setup("fit")
    second = hh_module(shared_data / HH_FILE, tmp_path)
    assert second.control_schema == {"harmless": ["good", "bad"]}
    second.setup("fit")
    assert first.prepared.built and not second.prepared.built and first.prepared.path == second.prepared.path
    assert as_lists(second.train_items) == as_lists(first.train_items) and second.summary == first.summary
    # memory-mapped from the cache folder, not a Python list of rows
    assert {Path(f["filename"]).parent.parent for f in second.train_items.dataset.cache_files} == {second.prepared.path}
    assert "data: cache" in second.prepared.describe_cache() and "reused" in second.prepared.describe_cache()
    assert second.validation_prompts(2) and second.validation_prompts(2) == first.validation_prompts(2)


def test_cached_rows_are_the_rows_the_tokenizer_writes(shared_data, tmp_path):
    """The cache stores ids and the response start; the labels rebuilt from them equal PromptTokenizer's."""
    data = hh_module(shared_data / HH_FILE, tmp_path, max_examples=20)
    data.setup("fit")
    train, _ = data.train_val_split()
    encoder = PromptTokenizer(data.tokenizer, data.max_length)
    schema = ControlSchema.from_dict(data.control_schema)
    expected = [row for row in (encoder.tokenize(e, schema) for e in train.examples[:20]) if row is not None]
    assert as_lists(data.train_items) == expected


@pytest.mark.parametrize("change", ["file", "max_length", "tokenizer", "format option", "split"])
def test_a_changed_input_builds_a_new_cache(shared_data, tmp_path, change):
    source = tmp_path / "hh.jsonl.gz"
    source.write_bytes((shared_data / HH_FILE).read_bytes())
    before = hh_module(source, tmp_path / "cache")
    before.setup("fit")
    options: dict = {}
    if change == "file":
        source.write_bytes(gzip.compress(gzip.decompress(source.read_bytes())[:-1000].rsplit(b"\n", 1)[0] + b"\n"))
    elif change == "max_length":
        options = {"max_length": 120}
    elif change == "tokenizer":
        options = {"model_name_or_path": "tiny-debug-other-template"}
    elif change == "format option":
        options = {"preference": "other"}
    else:
        options = {"val_fraction": 0.2}
    if change == "tokenizer":
        after = hh_module(source, tmp_path / "cache")
        after._tokenizer = build_tiny_tokenizer()
        after._tokenizer.chat_template = after._tokenizer.chat_template.replace("assistant", "bot")
    else:
        after = hh_module(source, tmp_path / "cache", **options)
    after.setup("fit")
    assert after.prepared.built and after.prepared.path != before.prepared.path
    again = hh_module(source, tmp_path / "cache", **({} if change == "tokenizer" else options))
    if change == "tokenizer":
        again._tokenizer = after._tokenizer
    assert again.prepared.path == after.prepared.path and not again.prepared.built


def test_num_proc_workers_tokenize_the_same_rows(shared_data, tmp_path):
    alone = hh_module(shared_data / HH_FILE, tmp_path / "a", max_examples=200)
    alone.setup("fit")
    workers = hh_module(shared_data / HH_FILE, tmp_path / "b", max_examples=200, num_proc=2)
    workers.setup("fit")
    assert as_lists(workers.train_items) == as_lists(alone.train_items) and workers.summary == alone.summary


def test_a_bad_row_still_names_file_and_row_and_leaves_no_cache(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(5)]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"prompt": "p", "chosen": 3, "rejected": "r"}\n')
    data = PreferenceDataModule(path=str(path), model_name_or_path="tiny-debug", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"bad\.jsonl:6: field 'chosen' is a number"):
        data.setup("fit")
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]


def test_hub_options_select_a_folder_and_split_of_a_hub_shaped_dataset(hh_hub_folder, tmp_path):
    repo = hh_hub_folder
    harmless = hh_module(repo, tmp_path / "cache", data_dir="harmless-base", max_examples=None)
    harmless.setup("fit")
    assert "300 rows read" in harmless.describe()
    test_split = hh_module(repo, tmp_path / "cache", data_dir="helpful-base", split="test", max_examples=None)
    test_split.setup("fit")
    assert "40 rows read" in test_split.describe()
    both = hh_module(repo, tmp_path / "cache", max_examples=None)  # no data_dir: every folder, as on the hub
    both.setup("fit")
    assert "500 rows read" in both.describe()
    with pytest.raises(DataError, match="--data.data_dir"):
        hh_module(repo, tmp_path / "cache", data_dir="nope").setup("fit")


# -------------------------------------------------------------------------------------------- streaming


def test_streaming_batches_are_length_grouped_and_resume_exactly(shared_data, tmp_path):
    from meet_lightning.data.streaming import StreamedBatches

    tokenizer = build_tiny_tokenizer()
    tokenizer.model_max_length = 1 << 30
    sources = [SourceConfig(path=str(shared_data / HH_FILE), preference="harmless")]
    stream = StreamedBatches(sources, tokenizer, 128, 4, seed=1, val_fraction=0.1, max_val_examples=8, shuffle_buffer=64)
    assert stream.schema == {"harmless": ["good", "bad"]} and len(stream.validation_units()) == 8
    whole = stream.for_rank(0, 1)
    iterator = iter(whole)
    uninterrupted = [next(iterator) for _ in range(30)]
    spans = [max(len(r.input_ids) for r in b) - min(len(r.input_ids) for r in b) for b in uninterrupted[:15]]
    assert sum(spans) / len(spans) < 20  # grouped inside the buffer (random batches of HH rows span ~60 tokens)
    interrupted = stream.for_rank(0, 1)
    first = iter(interrupted)
    head = [next(first) for _ in range(11)]
    resumed = stream.for_rank(0, 1)
    resumed.load_state_dict(interrupted.state_dict())
    tail = iter(resumed)
    assert head + [next(tail) for _ in range(19)] == uninterrupted
    val_prompts = {json.dumps(list(p), sort_keys=True) for p in stream.validation_prompts(100)}
    trained = {json.dumps(list(r.input_ids[: r.response_start])) for b in uninterrupted for r in b}
    assert val_prompts and trained  # held-out prompts never reach training:
    encoder = PromptTokenizer(tokenizer, 128)
    held = {json.dumps(list(encoder.render_prompt(json.loads(p)))) for p in val_prompts}
    assert not held & trained


def test_streaming_needs_max_steps_and_no_workers(shared_data):
    with pytest.raises(ConfigError, match="--data.num_workers 0"):
        PreferenceDataModule(path=str(shared_data / HH_FILE), streaming=True, num_workers=2)


def test_a_cache_build_says_how_far_it_got(shared_data, tmp_path):
    """Building the cache takes minutes at 100k pairs: each split's start and its time are told (issue 32 item 6)."""
    from meet_lightning.data.cache import prepare_tokenized

    data = hh_module(shared_data / HH_FILE, tmp_path / "unused", max_examples=20)
    lines: list[str] = []
    prepared = prepare_tokenized(data.spec, data.tokenizer, tmp_path / "cache", None, log=lines.append)
    assert prepared.built
    assert any(line.startswith("data: tokenizing train: ") for line in lines)
    assert any(line.startswith("data: tokenized train: ") and " s (" in line for line in lines)
    lines.clear()
    assert not prepare_tokenized(data.spec, data.tokenizer, tmp_path / "cache", None, log=lines.append).built
    assert not any("tokeniz" in line for line in lines)  # reused: nothing to tell
