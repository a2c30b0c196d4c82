"""Tokenize once, reuse everywhere: a run's parsed and tokenized data as an Arrow dataset on disk.

:func:`prepare_tokenized` reads the sources (the stdlib line readers of :mod:`meet_lightning.data.formats`, so a
bad record still names ``FILE:ROW``), splits them by prompt, tokenizes the units with ``datasets.map``
(``num_proc`` workers) and saves the result under a folder named by a fingerprint of everything that changes
it. The next stage, ``validate``, the export and every other DDP rank find the folder and memory-map it: no
re-reading, no re-tokenizing, no Python list of the data in the training process.

The fingerprint covers: the library version and this module's :data:`CACHE_VERSION`; every source's options
and contents (size, modification time and a BLAKE2 hash of a local file or of every file of a dataset
folder; for a hub id its ``datasets`` fingerprint, which follows the downloaded files and the revision);
the tokenizer (class, vocabulary and merges, special tokens, chat template); ``max_length`` and the
truncation rule (:data:`TRUNCATION_RULE`); the split (``val_fraction``, ``seed``, ``val_path``); which units
are tokenized (rows, pairs, chosen rows) and ``max_examples`` / ``max_val_examples``. The control schema is
derived from the data, so it is covered by the sources; it is stored in the folder beside the data.

Where the folders live: ``cache_dir``, by default :func:`default_cache_dir`
(``$HF_DATASETS_CACHE/meet_lightning``, i.e. ``~/.cache/huggingface/datasets/meet_lightning``, beside the
cache ``datasets`` itself keeps). Building happens in a temporary folder renamed into place when complete
(nothing half-written), under a file lock: the first process builds, the others (DDP ranks, a second run)
wait and then load. A lock rather than a ``torch.distributed`` barrier because a stage's data is prepared
while the stage is being built, before Lightning has started its process group.

A folder is checked every time it is loaded, against what its build recorded in ``meet_data.json``: the size
of every Arrow file, the rows of each split and a digest of each split's ``length`` column. A cut file (a full
disk, a copy interrupted) would otherwise load as fewer rows without a word, or fail with a pyarrow traceback
on every run. A folder that fails, or one without ``meet_data.json``, is moved aside and rebuilt under the
lock, with one printed line naming it and why. Temporary ``.building-HOST-PID`` folders left by a killed
build are removed by the next build (under the lock of their own key, or when their process is gone).

:func:`data_identity` is the part of the key that decides what a run trains on (no library version, no
modification times): it goes into each stage's checkpoints and done-marker, so that a resume on edited data is
refused instead of continuing on other rows.

Core: ``datasets`` and ``transformers``, no Lightning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meet_lightning.data.formats import SourceConfig, read_source
from meet_lightning.data.heldout import held_out_split
from meet_lightning.data.rows import ControlledExample, ControlSchema, Message, ParsedSource, PreferencePair
from meet_lightning.data.tokenization import PromptTokenizer, Split, TokenizedRow
from meet_lightning.errors import ConfigError
from meet_lightning.losses import IGNORE_INDEX

CACHE_VERSION = 1
"""Bumped whenever the stored columns or their meaning change: older folders are then never read."""

TRUNCATION_RULE = "prompt cut from the left (oldest turns, then oldest tokens of the first turn), once per pair"
"""The rule :class:`~meet_lightning.data.tokenization.PromptTokenizer` applies; part of the fingerprint."""

UNITS = ("rows", "pairs", "chosen")
"""What a split is tokenized as: single rows, ``(chosen, rejected)`` pairs, or the chosen rows of pairs (SFT)."""

_HASH_CHUNK = 1 << 20
BUILDING = ".building-"
"""Infix of a build's temporary folder: ``KEY.building-HOST-PID`` (who owns it, to tell a live build from a killed one)."""
META = "meet_data.json"
_digests: dict[tuple[str, int, int], str] = {}
"""BLAKE2 digests of the files already hashed in this process, by ``(path, size, mtime_ns)``: the cache key and
the data identity of a stage read each file once."""


class CacheDamaged(Exception):
    """A cache folder that does not hold what its build recorded (internal: the folder is rebuilt)."""


def default_cache_dir() -> Path:
    """``$HF_DATASETS_CACHE/meet_lightning``: where a Hugging Face user finds every other processed dataset."""
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "meet_lightning"


@dataclass(frozen=True)
class DataSpec:
    """Everything that decides a run's tokenized data (the cache key, with the tokenizer).

    Attributes:
        sources: The training sources.
        val_source: A separate validation source, or ``None`` to hold out ``val_fraction`` of the prompts.
        max_length: Longest row in text tokens.
        val_fraction: Share of prompts held out for validation (without ``val_source``).
        seed: Seed of the split.
        train_units: ``rows``, ``pairs`` or ``chosen`` (see :data:`UNITS`).
        max_examples: Keep only this many training units (before tokenizing).
        max_val_examples: Keep only this many validation units.
        full_lengths: Also store every row's untruncated length, and keep too-long rows as empty rows (length
            0) so that their length counts too (``inspect-data``; never for training).
        held_out_only: No split and no training units: every unit of ``sources`` is validation data, in source
            order (``evaluate``: its first ``max_val_examples`` pairs are the file's first pairs).
        drop_val_overlap: Drop ``val_source`` units whose first user turn is in training instead of refusing
            them (:func:`meet_lightning.data.heldout.held_out_split`).
    """

    sources: tuple[SourceConfig, ...]
    val_source: SourceConfig | None = None
    max_length: int = 512
    val_fraction: float = 0.1
    seed: int = 1234
    train_units: str = "rows"
    max_examples: int | None = None
    max_val_examples: int | None = None
    full_lengths: bool = False
    held_out_only: bool = False
    drop_val_overlap: bool = False

    def __post_init__(self) -> None:
        if self.train_units not in UNITS:
            raise ConfigError(f"train_units {self.train_units!r} is unknown — use one of {', '.join(UNITS)}")


@dataclass
class TokenizedData:
    """A prepared (built or reused) cache folder, memory-mapped.

    Attributes:
        path: The folder.
        train: Training units.
        val: Validation units (pairs when there are any, else rows).
        schema: ``{preference: [controls]}`` found in the data, in first-seen order.
        summary: ``{what: count}`` of tokenized and dropped units.
        source_lines: One line per source: rows read, pairs, skipped with reasons.
        built: Whether this call built the folder (else it was reused).
        seconds: How long building or loading took.
    """

    path: Path
    train: TokenizedItems
    val: TokenizedItems
    schema: dict[str, list[str]]
    summary: Counter
    source_lines: list[str]
    built: bool
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)

    def describe_cache(self) -> str:
        """``data: cache PATH (built in 1.2 s | reused, loaded in 0.1 s)``."""
        how = f"built in {self.seconds:.1f} s" if self.built else f"reused, loaded in {self.seconds:.2f} s"
        return f"data: cache {self.path} ({how}; {len(self.train)} train / {len(self.val)} validation units)"


class TokenizedItems(Sequence):
    """A memory-mapped split served as :class:`TokenizedRow` (rows) or ``(chosen, rejected)`` tuples (pairs).

    ``__getitems__`` reads a whole batch with one Arrow slice per column (the DataLoader calls it with the
    batch sampler's indices); nothing is held in Python lists but the per-item ``lengths`` for the sampler.
    """

    def __init__(self, dataset: Any, kind: str) -> None:
        self.dataset, self.kind = dataset, kind

    @property
    def paired(self) -> bool:
        """Whether items are ``(chosen, rejected)`` pairs."""
        return self.kind == "pairs"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:  # type: ignore[override]
        if isinstance(index, slice):
            return self.__getitems__(list(range(len(self)))[index])
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list:
        columns = self.dataset[list(indices)]  # one dict of columns for the whole batch
        if not self.paired:
            return [_row(columns, "", i) for i in range(len(indices))]
        return [(_row(columns, "chosen_", i), _row(columns, "rejected_", i)) for i in range(len(indices))]

    def lengths(self) -> list[int]:
        """Tokens per item (both sides for pairs): the length-grouping key."""
        return self.dataset.data.column("length").to_pylist()

    def column(self, name: str) -> list:
        """One stored column as a list (``prompt`` on validation splits, ``full_length`` for inspect-data)."""
        return self.dataset.data.column(name).to_pylist() if name in self.dataset.column_names else []


def _row(columns: Mapping[str, list], prefix: str, i: int) -> TokenizedRow:
    ids = tuple(columns[f"{prefix}input_ids"][i])
    start = int(columns[f"{prefix}response_start"][i])
    return TokenizedRow(
        input_ids=ids,
        labels=(IGNORE_INDEX,) * start + ids[start:],  # exactly what PromptTokenizer writes: response tokens only
        prefix_pos=int(columns[f"{prefix}prefix_pos"][i]),
        response_start=start,
        control_ids=tuple(columns[f"{prefix}control_ids"][i]),
    )


# ------------------------------------------------------------------------------------------- fingerprint


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size, modification time and BLAKE2 digest of a file (the digest keeps a copied file a hit)."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _digests:
        digest = hashlib.blake2b(digest_size=16)
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
                digest.update(chunk)
        _digests[memo] = digest.hexdigest()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "blake2b": _digests[memo]}


def source_fingerprint(source: SourceConfig, hub_contents: bool = True) -> dict[str, Any]:
    """A source's options and the identity of its contents.

    Args:
        source: The source.
        hub_contents: For a hub id, load it to take its ``datasets`` fingerprint; ``False`` keeps its options
            only (a streamed hub dataset is never downloaded whole; its ``revision`` pins it).
    """
    options = dataclasses.asdict(source)
    local = Path(source.path)
    if local.is_file():
        return {"options": options, "file": file_fingerprint(local)}
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file() and ".cache" not in p.parts)
        return {"options": options, "files": {str(p.relative_to(local)): file_fingerprint(p) for p in files}}
    return {"options": options, "hub": hub_fingerprint(source) if hub_contents else None}


def hub_fingerprint(source: SourceConfig) -> str:
    """The ``datasets`` fingerprint of a hub dataset as loaded (follows its downloaded files and revision)."""
    import datasets

    from meet_lightning.data.formats import iter_rows

    try:
        return datasets.load_dataset(source.path, **source.hub.load_kwargs())._fingerprint
    except Exception:  # noqa: BLE001 - the reader turns the same failure into its one-line DataError
        iter_rows(source.path, source.hub)
        raise


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of what decides token ids: class, vocabulary and merges, special tokens, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [
        type(tokenizer).__name__,
        vocabulary,
        json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str),
        str(getattr(tokenizer, "chat_template", None)),
        str(getattr(tokenizer, "add_bos_token", None)),
    ]
    return hashlib.blake2b("\x00".join(parts).encode(), digest_size=16).hexdigest()


def _data_key(spec: DataSpec, tokenizer: Any, hub_contents: bool = True) -> dict[str, Any]:
    return {
        "truncation": TRUNCATION_RULE,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "sources": [source_fingerprint(s, hub_contents) for s in spec.sources],
        "val_source": source_fingerprint(spec.val_source, hub_contents) if spec.val_source else None,
        "spec": {k: v for k, v in dataclasses.asdict(spec).items() if k not in ("sources", "val_source")},
    }


def _digest(key: Any) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def fingerprint(spec: DataSpec, tokenizer: Any) -> str:
    """The cache key of ``spec`` tokenized with ``tokenizer`` (hex)."""
    from meet_lightning import __version__

    return _digest({"library": __version__, "cache_version": CACHE_VERSION, **_data_key(spec, tokenizer)})


def data_identity(spec: DataSpec, tokenizer: Any, hub_contents: bool = True) -> str:
    """What a run trains on (hex): the sources' contents (size and BLAKE2 digest), options and tokenizer.

    The cache key without what cannot change the rows: the library version (an upgrade must not refuse a
    resume) and the files' modification times (a copied or touched file is the same data). A stage records it
    in its checkpoints and done-marker; a resume compares it.

    Args:
        spec: Sources and options.
        tokenizer: The run's tokenizer.
        hub_contents: ``False`` for streamed data: a hub id is identified by its options (revision) only.
    """

    def without_mtime(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {k: without_mtime(v) for k, v in value.items() if k != "mtime_ns"}
        return [without_mtime(v) for v in value] if isinstance(value, list) else value

    return _digest(without_mtime(_data_key(spec, tokenizer, hub_contents)))


# ------------------------------------------------------------------------------------------------- build


def data_schema(parsed: Sequence[ParsedSource]) -> dict[str, list[str]]:
    """``{preference: [controls]}`` over every source, in first-seen order."""
    schema: dict[str, list[str]] = {}
    for source in parsed:
        for pref, labels in source.preferences().items():
            known = schema.setdefault(pref, [])
            known.extend(label for label in labels if label not in known)
    return schema


def source_line(source: ParsedSource) -> str:
    """``data: FILE (format): N rows read → rows, pairs; skipped: …`` for one source."""
    skipped = "; ".join(f"{n} {reason}" for reason, n in source.skipped.most_common()) or "none"
    warned = "; ".join(f"{n} {reason}" for reason, n in source.warnings.most_common())
    return (
        f"data: {source.path} ({source.format}): {source.rows_read} rows read → {len(source.examples)} rows,"
        f" {len(source.pairs)} pairs; skipped: {skipped}" + (f"; warnings: {warned}" if warned else "")
    )


def select_units(spec: DataSpec, train: Split, val: Split) -> tuple[tuple[str, list], tuple[str, list]]:
    """``((kind, training units), (kind, validation units))`` as the spec asks, cut to the ``max_*`` counts."""
    if spec.train_units == "pairs":
        train_kind, train_units = "pairs", train.pairs
    elif spec.train_units == "chosen":  # SFT: the chosen side of each pair, nothing else
        train_kind, train_units = "rows", [pair.examples()[0] for pair in train.pairs]
    else:
        train_kind, train_units = "rows", train.examples
    val_kind, val_units = ("pairs", val.pairs) if val.pairs else ("rows", val.examples)
    return (train_kind, train_units[: spec.max_examples]), (val_kind, val_units[: spec.max_val_examples])


def unit_record(unit: ControlledExample | PreferencePair) -> dict[str, str]:
    """One unit as plain strings for Arrow (prompt and controls as JSON)."""
    if isinstance(unit, PreferencePair):
        return {
            "prompt": json.dumps([dict(m) for m in unit.prompt]),
            "chosen": unit.chosen,
            "rejected": unit.rejected,
            "preference": unit.preference,
            "chosen_control": unit.chosen_control,
            "rejected_control": unit.rejected_control,
        }
    return {
        "prompt": json.dumps([dict(m) for m in unit.prompt]),
        "response": unit.response,
        "controls": json.dumps(dict(unit.controls)),
    }


def features(kind: str, with_prompt: bool, full_lengths: bool) -> Any:
    """The Arrow columns of a tokenized split: int32 ids (labels are derived from ``response_start``)."""
    from datasets import Features, Sequence, Value

    def side(prefix: str) -> dict[str, Any]:
        return {
            f"{prefix}input_ids": Sequence(Value("int32")),
            f"{prefix}response_start": Value("int32"),
            f"{prefix}prefix_pos": Value("int32"),
            f"{prefix}control_ids": Sequence(Value("int32")),
        }

    columns = {**side("chosen_"), **side("rejected_")} if kind == "pairs" else side("")
    columns["length"] = Value("int32")
    if full_lengths:
        columns["full_length"] = Value("int32")
    if with_prompt:
        columns["prompt"] = Value("string")
    return Features(columns)


class BatchEncoder:
    """The ``datasets.map`` function: a batch of unit records → tokenized columns, too-long units left out.

    A class, not a closure, so ``num_proc`` workers receive it pickled and ``datasets`` need not hash it.
    """

    def __init__(self, tokenizer: Any, max_length: int, schema: dict[str, list[str]], kind: str, with_prompt: bool, full: bool):
        self.tokenizer, self.max_length, self.schema = tokenizer, max_length, schema
        self.kind, self.with_prompt, self.full = kind, with_prompt, full

    def __call__(self, batch: Mapping[str, list]) -> dict[str, list]:
        encoder = PromptTokenizer(self.tokenizer, self.max_length)
        untruncated = PromptTokenizer(self.tokenizer, 1 << 30) if self.full else None
        schema = ControlSchema.from_dict(self.schema)
        out: dict[str, list] = {}
        for i in range(len(batch["prompt"])):
            prompt = tuple(json.loads(batch["prompt"][i]))
            examples = self._examples(batch, i, prompt)
            rows = encoder.tokenize_same_prompt(examples, schema)
            if rows is None and not self.full:
                continue
            if rows is None:  # inspect-data: an empty row that still reports its untruncated length
                rows = [TokenizedRow((), (), 0, 0, ()) for _ in examples]
            prefixes = ("chosen_", "rejected_") if self.kind == "pairs" else ("",)
            for prefix, row in zip(prefixes, rows, strict=True):
                for name, value in _row_columns(row).items():
                    out.setdefault(prefix + name, []).append(value)
            out.setdefault("length", []).append(sum(len(r.input_ids) for r in rows))
            if untruncated is not None:
                out.setdefault("full_length", []).append(len(untruncated.tokenize_same_prompt(examples, schema)[0].input_ids))
            if self.with_prompt:
                out.setdefault("prompt", []).append(batch["prompt"][i])
        return out

    def _examples(self, batch: Mapping[str, list], i: int, prompt: tuple[Message, ...]) -> list[ControlledExample]:
        if self.kind == "pairs":
            pair = PreferencePair(
                prompt,
                batch["chosen"][i],
                batch["rejected"][i],
                batch["preference"][i],
                batch["chosen_control"][i],
                batch["rejected_control"][i],
            )
            return list(pair.examples())
        return [ControlledExample(prompt, batch["response"][i], json.loads(batch["controls"][i]))]


def _row_columns(row: TokenizedRow) -> dict[str, Any]:
    return {
        "input_ids": list(row.input_ids),
        "response_start": row.response_start,
        "prefix_pos": row.prefix_pos,
        "control_ids": list(row.control_ids),
    }


def _tokenize_split(
    units: list, kind: str, encoder: BatchEncoder, work: Path, name: str, num_proc: int | None
) -> tuple[Any, int]:
    """``(tokenized dataset, units dropped as too long)`` of one split."""
    import datasets

    feats = features(kind, encoder.with_prompt, encoder.full)
    if not units:
        return datasets.Dataset.from_dict({k: [] for k in feats}, features=feats), 0
    raw = datasets.Dataset.from_list([unit_record(u) for u in units])
    tokenized = raw.map(
        encoder,
        batched=True,
        batch_size=256,
        num_proc=num_proc if num_proc and num_proc > 1 and len(raw) >= 2 * num_proc else None,
        remove_columns=raw.column_names,
        features=feats,
        cache_file_name=str(work / f"{name}.arrow"),
        new_fingerprint=f"meet-{name}-{time.time_ns()}",  # the folder's own key decides reuse, not datasets'
        load_from_cache_file=False,
        desc=f"tokenizing {name}",
    )
    return tokenized, len(raw) - len(tokenized)


def build(spec: DataSpec, tokenizer: Any, target: Path, num_proc: int | None, log: Callable[[str], None] | None = None) -> None:
    """Reads, splits and tokenizes ``spec`` into the folder ``target`` (written elsewhere, renamed into place);
    ``log`` is told when each split starts and how long it took (a large build takes minutes)."""
    import datasets

    parsed = [read_source(s) for s in spec.sources]
    held_out, notes = read_source(spec.val_source) if spec.val_source is not None else None, []
    if spec.held_out_only:  # no shuffle: the order of the sources is kept
        train = Split()
        val = Split([e for p in parsed for e in p.examples], [pair for p in parsed for pair in p.pairs])
    else:  # duplicates dropped, split by first user turn, val_source's overlap refused (meet_lightning.data.heldout)
        parsed, held_out, train, val, notes = held_out_split(
            parsed, held_out, spec.val_fraction, spec.seed, spec.drop_val_overlap
        )
    lines = [source_line(p) for p in parsed]
    if held_out is not None:
        lines.append(source_line(held_out).replace("data: ", "data: validation ", 1))
    lines += notes
    schema = data_schema(parsed)
    (train_kind, train_units), (val_kind, val_units) = select_units(spec, train, val)
    del parsed, train, val  # the units hold what is still needed
    work = target.parent / f"{target.name}{BUILDING}{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        summary: Counter = Counter()
        splits = {}
        for name, kind, units in (("train", train_kind, train_units), ("val", val_kind, val_units)):
            encoder = BatchEncoder(tokenizer, spec.max_length, schema, kind, with_prompt=name == "val", full=spec.full_lengths)
            began = time.perf_counter()
            if log is not None and units:
                log(f"data: tokenizing {name}: {len(units):,} {kind}…")
            splits[name], dropped = _tokenize_split(units, kind, encoder, work, name, num_proc)
            if log is not None and units:
                seconds = time.perf_counter() - began
                log(
                    f"data: tokenized {name}: {len(units):,} {kind} in {seconds:.1f} s ({len(units) / max(seconds, 1e-9):,.0f}/s)"
                )
            if dropped:
                summary[f"{name}: dropped, a response longer than max_length"] += dropped
            summary[f"{name}: {kind}"] += len(splits[name])
        final = work / "data"
        # datasets cannot load back a saved split of zero rows: an empty split is recorded, not saved
        datasets.DatasetDict({k: v for k, v in splits.items() if len(v)}).save_to_disk(str(final))
        meta = {
            "cache_version": CACHE_VERSION,
            "kinds": {"train": train_kind, "val": val_kind},
            "empty": [name for name, split in splits.items() if not len(split)],
            "full_lengths": spec.full_lengths,
            "schema": schema,
            "summary": dict(summary),
            "source_lines": lines,
            "checks": folder_checks(final, splits),
        }
        (final / META).write_text(json.dumps(meta, indent=2))
        os.replace(final, target)  # complete or absent: a killed build leaves only its .building folder
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_quietly(
    spec: DataSpec, tokenizer: Any, target: Path, num_proc: int | None, log: Callable[[str], None] | None = None
) -> None:
    """:func:`build` without ``datasets``' progress bars (restored afterwards): its own lines say how far it got."""
    from datasets.utils import logging as datasets_logging

    was_enabled = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()
    try:
        build(spec, tokenizer, target, num_proc, log)
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


def lengths_digest(split: Any) -> str:
    """BLAKE2 digest of a split's ``length`` column (int32 bytes): a cheap check that the rows are the built ones."""
    import numpy as np

    lengths = split.data.column("length").to_numpy() if len(split) else np.zeros(0)
    return hashlib.blake2b(np.ascontiguousarray(lengths, dtype=np.int32).tobytes(), digest_size=16).hexdigest()


def folder_checks(folder: Path, splits: Mapping[str, Any]) -> dict[str, Any]:
    """What :func:`load` checks: every Arrow file's size, each split's rows and ``length`` digest."""
    return {
        "files": {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*.arrow"))},
        "rows": {name: len(split) for name, split in splits.items()},
        "lengths": {name: lengths_digest(split) for name, split in splits.items()},
    }


def verified_splits(folder: Path, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The saved splits of ``folder``, memory-mapped; CacheDamaged when they are not what the build recorded."""
    import datasets
    import pyarrow

    checks = meta.get("checks")
    if not isinstance(checks, Mapping):
        raise CacheDamaged(f"{META} records no load checks (built by an older meet_lightning)")
    for name, size in checks["files"].items():
        path = folder / name
        found = path.stat().st_size if path.is_file() else None
        if found != size:
            raise CacheDamaged(f"{name} is {'missing' if found is None else f'{found} bytes'}, {size} recorded")
    try:
        splits = dict(datasets.load_from_disk(str(folder))) if len(meta["empty"]) < len(meta["kinds"]) else {}
    except (OSError, ValueError, KeyError, pyarrow.ArrowException) as error:
        reason = " ".join(str(error).split())[:200]
        raise CacheDamaged(f"unreadable: {type(error).__name__}: {reason}") from None
    for name, rows in checks["rows"].items():
        found = len(splits[name]) if name in splits else 0
        if found != rows:
            raise CacheDamaged(f"{name} holds {found} rows, {rows} recorded")
        if name in splits and lengths_digest(splits[name]) != checks["lengths"][name]:
            raise CacheDamaged(f"{name}: its rows' lengths differ from the recorded ones")
    return splits


def read_meta(folder: Path) -> dict[str, Any]:
    """``meet_data.json`` of a cache folder; CacheDamaged when it cannot be read."""
    try:
        meta = json.loads((folder / META).read_text())
        if not isinstance(meta, dict) or not {"kinds", "empty", "schema", "summary", "source_lines"} <= meta.keys():
            raise ValueError("fields are missing")
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise CacheDamaged(f"{META} is unreadable ({type(error).__name__})") from None
    return meta


def load(folder: Path, built: bool, seconds_so_far: float = 0.0) -> TokenizedData:
    """Memory-maps a finished cache folder, checked against its build's record (CacheDamaged if it fails)."""
    import datasets

    start = time.perf_counter()
    meta = read_meta(folder)
    kinds = meta["kinds"]
    splits = verified_splits(folder, meta)
    for name in meta["empty"]:
        feats = features(kinds[name], name == "val", meta["full_lengths"])
        splits[name] = datasets.Dataset.from_dict({k: [] for k in feats}, features=feats)
    return TokenizedData(
        path=folder,
        train=TokenizedItems(splits["train"], kinds["train"]),
        val=TokenizedItems(splits["val"], kinds["val"]),
        schema=meta["schema"],
        summary=Counter(meta["summary"]),
        source_lines=list(meta["source_lines"]),
        built=built,
        seconds=seconds_so_far + time.perf_counter() - start,
        meta=meta,
    )


def prepare_tokenized(
    spec: DataSpec,
    tokenizer: Any,
    cache_dir: str | Path | None = None,
    num_proc: int | None = None,
    log: Callable[[str], None] | None = None,
) -> TokenizedData:
    """The tokenized data of ``spec``: reused from ``cache_dir`` when its fingerprint is there, else built.

    Args:
        spec: Sources and options.
        tokenizer: The run's tokenizer (prepared by ``models.load_tokenizer``).
        cache_dir: Parent folder of the cache folders (default :func:`default_cache_dir`).
        num_proc: ``datasets.map`` worker processes for tokenizing (``None``/1: in this process).
        log: Told, before a build starts, where it goes (``datasets``' progress bars stay off: an error
            that stops the build must remain one line).

    Raises:
        DataError: A source cannot be read (``FILE:ROW: …``); nothing is left behind.
    """
    from filelock import FileLock

    start = time.perf_counter()
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"--data.cache_dir {root}: cannot create it ({err.strerror}) — pass a writable folder") from None
    target = root / fingerprint(spec, tokenizer)
    if (target / META).is_file():
        try:
            return load(target, built=False, seconds_so_far=time.perf_counter() - start)
        except CacheDamaged:
            pass  # checked again under the lock: another process may be rebuilding it right now
    say = log if log is not None else print
    with FileLock(str(target) + ".lock"):
        remove_stale_builds(target)
        if (target / META).is_file():  # built by another process while we waited, or damaged
            try:
                return load(target, built=False, seconds_so_far=time.perf_counter() - start)
            except CacheDamaged as damage:
                say(f"data: cache {target} is damaged ({damage}) — moved aside and rebuilt")
                move_aside(target)
        elif target.exists():
            say(f"data: cache {target} is incomplete (no {META}) — moved aside and rebuilt")
            move_aside(target)
        elif log is not None:
            log(f"data: tokenizing into {target} (first use of this data; later runs reuse it)")
        build_quietly(spec, tokenizer, target, num_proc, log)
        return load(target, built=True, seconds_so_far=time.perf_counter() - start)


def move_aside(folder: Path) -> None:
    """Renames ``folder`` out of the way (atomic: its name is free at once), then deletes it.

    A process that memory-mapped its files keeps reading them: an unlinked file lives until it is unmapped.
    """
    aside = folder.with_name(f"{folder.name}.damaged-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    if folder.is_dir():
        os.replace(folder, aside)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        folder.unlink()


def build_owner(folder: Path) -> tuple[str, int] | None:
    """``(host, pid)`` of a ``KEY.building-HOST-PID`` folder (``None`` for another name)."""
    _, sep, owner = folder.name.partition(BUILDING)
    host, _, pid = owner.rpartition("-")
    return (host, int(pid)) if sep and pid.isdigit() else None


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (``os.kill(pid, 0)``; one we may not signal is alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_builds(target: Path) -> list[Path]:
    """Deletes the temporary folders of killed builds beside ``target``; returns them. Call under ``target``'s lock.

    Every ``TARGET.building-*`` folder is stale (its builder would hold the lock we hold); those of other keys
    are removed when their process is gone from this machine (a folder of another host is left to that host).
    """
    host = socket.gethostname()
    stale = []
    for folder in target.parent.glob(f"*{BUILDING}*"):
        owner = build_owner(folder)
        ours = folder.name.startswith(target.name + BUILDING)
        if ours or (owner is not None and owner[0] == host and not process_alive(owner[1])):
            shutil.rmtree(folder, ignore_errors=True)
            stale.append(folder)
    return stale


def iter_val_prompts(items: TokenizedItems, count: int) -> Iterator[list[dict[str, str]]]:
    """The first ``count`` distinct prompts of a validation split, as chat messages."""
    seen: set[str] = set()
    for text in items.column("prompt"):
        if text not in seen:
            seen.add(text)
            yield json.loads(text)
            if len(seen) >= count:
                return
