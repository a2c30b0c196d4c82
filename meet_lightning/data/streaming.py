"""``data.streaming: true``: training batches from a stream (hub datasets, large local JSON Lines), never all in memory.

Records are read lazily (the stdlib line reader for local files, so errors still name ``FILE:ROW``; a
``datasets`` ``IterableDataset`` for hub ids), parsed and tokenized one by one, and collected in a shuffle
buffer of ``shuffle_buffer`` units. A full buffer is shuffled, sorted by length into batches (less padding)
and the batches are shuffled again: length grouping inside the buffer. Several sources are interleaved record
by record. The stream has no end: when the data is exhausted the next epoch starts with the next seed, and the
trainer stops at ``max_steps``.

Resume is exact: a rank's batches are a pure function of ``(seed, rank, world size, data)``, and the position
(batches handed out) is saved in the checkpoint; a resumed run regenerates the stream and skips that many
batches, so it trains on the same batches, in the same order, as an uninterrupted one. The price is reading and
tokenizing the skipped part again (no training on it). It holds as long as the source does not change between
the runs (pin a hub ``revision``).

Train/validation split: a conversation is held out when a seeded hash of its first user turn
(:func:`meet_lightning.data.heldout.split_key`) falls below ``val_fraction`` (no pass over the data is needed to
decide), so conversations that open alike land on the same side, as in the cached split; validation is the first
``max_val_examples`` held-out units (256 when unset), read once, kept in memory. What a stream cannot check
without a pass over all of it, it says in one line (:meth:`StreamedBatches.unchecked`): exact duplicates are not
dropped, and a separate ``val_path`` is not compared with the training stream. Core: torch, no Lightning.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch.utils.data import IterableDataset

from meet_lightning.data.formats import SourceConfig, iter_parsed, iter_rows
from meet_lightning.data.heldout import split_key
from meet_lightning.data.rows import ControlledExample, ControlSchema, PreferencePair
from meet_lightning.data.tokenization import PromptTokenizer
from meet_lightning.errors import DataError
from meet_lightning.names import check_controls

DEFAULT_VAL_UNITS = 256
"""Validation units a stream holds out when ``max_val_examples`` is not set."""

SCHEMA_UNITS = 1000
"""Units read from the start of the stream to find the controls (the schema must be known before training)."""


def held_out(prompt: Sequence[Mapping[str, str]], seed: int, val_fraction: float) -> bool:
    """Whether a prompt belongs to validation: a seeded hash of its first user turn, uniform in [0, 1), below
    ``val_fraction`` (every conversation opening with that turn is on the same side)."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}\x00{split_key(prompt)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def iter_units(source: SourceConfig, units: str) -> Iterator[ControlledExample | PreferencePair]:
    """One source's units as they are read: ``rows``, ``pairs``, ``chosen`` rows of pairs, or ``val`` (pairs, else rows)."""
    for out in iter_parsed(source, iter_rows(source.path, source.hub, streaming=True)):
        if units == "pairs":
            yield from out.pairs
        elif units == "chosen":
            yield from (pair.examples()[0] for pair in out.pairs)
        elif units == "val":  # validation scores pairs where a record has them (the control classifier)
            yield from out.pairs or out.examples
        else:
            yield from out.examples


def interleave(streams: list[Iterator]) -> Iterator:
    """Round robin over several streams until every one is exhausted."""
    active = list(streams)
    while active:
        for stream in list(active):
            try:
                yield next(stream)
            except StopIteration:
                active.remove(stream)


class StreamedBatches:
    """The sources of a streamed run: their control schema, validation units and per-rank batch streams.

    Args:
        sources: The training sources.
        tokenizer: The run's tokenizer.
        max_length: Longest row in text tokens.
        batch_size: Units per batch on each rank.
        units: ``rows``, ``pairs`` or ``chosen``.
        seed: Seed of the split and the shuffle.
        val_fraction: Share of prompts held out (by hash) for validation.
        max_val_examples: Validation units to keep (default :data:`DEFAULT_VAL_UNITS`).
        shuffle_buffer: Units shuffled and length-grouped together.
        group_by_length: Sort each buffer by length before cutting it into batches.
    """

    def __init__(
        self,
        sources: Sequence[SourceConfig],
        tokenizer: Any,
        max_length: int,
        batch_size: int,
        units: str = "rows",
        seed: int = 1234,
        val_fraction: float = 0.0,
        max_val_examples: int | None = None,
        shuffle_buffer: int = 1000,
        group_by_length: bool = True,
    ) -> None:
        self.sources, self.tokenizer, self.max_length, self.batch_size = list(sources), tokenizer, max_length, batch_size
        self.units, self.seed, self.val_fraction = units, seed, val_fraction
        self.max_val_examples = max_val_examples or DEFAULT_VAL_UNITS
        self.shuffle_buffer, self.group_by_length = shuffle_buffer, group_by_length
        self.paired = units == "pairs"
        self._schema: dict[str, list[str]] | None = None
        self._val: list | None = None
        self._val_prompts: list[list[dict[str, str]]] = []

    def units_stream(self, validation: bool = False) -> Iterator[ControlledExample | PreferencePair]:
        """Training units (``validation=False``) or held-out ones, sources interleaved, in stream order."""
        for unit in interleave([iter_units(source, self.units if not validation else "val") for source in self.sources]):
            if held_out(unit.prompt, self.seed, self.val_fraction) == validation:
                yield unit

    @property
    def schema(self) -> dict[str, list[str]]:
        """``{preference: [controls]}`` of the first :data:`SCHEMA_UNITS` units of the stream."""
        if self._schema is None:
            schema: dict[str, list[str]] = {}
            stream = interleave([iter_units(source, "rows") for source in self.sources])
            for count, example in enumerate(stream):
                check_controls(example.controls, example.source)  # one rule for names (meet_lightning.names)
                for preference, control in example.controls.items():
                    known = schema.setdefault(preference, [])
                    if control not in known:
                        known.append(control)
                if count + 1 >= SCHEMA_UNITS:
                    break
            self._schema = schema
        return self._schema

    def encode(self, unit: ControlledExample | PreferencePair, encoder: PromptTokenizer, schema: ControlSchema) -> Any:
        """A tokenized item (row, or ``(chosen, rejected)``), ``None`` when too long; a control found late is an error."""
        try:
            if isinstance(unit, PreferencePair):
                return encoder.tokenize_pair(unit, schema)
            return encoder.tokenize(unit, schema)
        except ValueError as err:  # a control that the first units of the stream did not show
            raise DataError(
                f"{unit.source}: {err} — streaming takes the controls from the first {SCHEMA_UNITS} units; put a row of"
                " every control near the start of the data, or turn streaming off"
            ) from None

    def unchecked(self, val_path: str | None = None) -> str:
        """The ``data:`` line saying what a stream does not check (it never holds all of its data at once)."""
        line = "data: streaming does not drop exact duplicate records of the training stream"
        if val_path is not None:
            line += (
                f", nor check {val_path} against it for shared first user turns (validation may not be held out) —"
                " turn streaming off to have both checked"
            )
        return line + ("" if val_path is not None else " (the split by first user turn still holds)")

    def validation_units(self) -> list:
        """The first ``max_val_examples`` held-out units, tokenized (pairs when the source has pairs)."""
        if self._val is None:
            encoder, schema = PromptTokenizer(self.tokenizer, self.max_length), ControlSchema.from_dict(self.schema)
            items, prompts = [], {}
            for unit in self.units_stream(validation=True):
                item = self.encode(unit, encoder, schema)
                if item is not None and (not items or isinstance(item, tuple) == isinstance(items[0], tuple)):
                    items.append(item)
                    prompts.setdefault(json.dumps(list(unit.prompt), sort_keys=True), [dict(m) for m in unit.prompt])
                if len(items) >= self.max_val_examples:
                    break
            self._val, self._val_prompts = items, list(prompts.values())
        return self._val

    def validation_prompts(self, count: int) -> list[list[dict[str, str]]]:
        """The first ``count`` distinct prompts of the validation units."""
        self.validation_units()
        return self._val_prompts[:count]

    def for_rank(self, rank: int, world_size: int) -> StreamedDataset:
        """The batch stream of one rank (ranks take every ``world_size``-th unit)."""
        return StreamedDataset(self, rank, world_size)

    def batches(self, rank: int, world_size: int, epoch: int) -> Iterator[list]:
        """One epoch of a rank's batches: shuffle buffers, length-grouped, from that rank's share of the units."""
        rng = random.Random((self.seed * 1_000_003 + epoch) * 1_009 + rank)
        encoder, schema = PromptTokenizer(self.tokenizer, self.max_length), ControlSchema.from_dict(self.schema)
        buffer: list = []
        for index, unit in enumerate(self.units_stream()):
            if index % world_size != rank:
                continue
            item = self.encode(unit, encoder, schema)
            if item is not None:
                buffer.append(item)
            if len(buffer) >= self.shuffle_buffer:
                yield from self._flush(buffer, rng)
                buffer = []
        yield from self._flush(buffer, rng)

    def _flush(self, buffer: list, rng: random.Random) -> Iterator[list]:
        rng.shuffle(buffer)
        if self.group_by_length:
            buffer.sort(key=self._length)  # stable: equal lengths keep their shuffled order
        batches = [buffer[s : s + self.batch_size] for s in range(0, len(buffer), self.batch_size)]
        rng.shuffle(batches)
        yield from batches

    def _length(self, item: Any) -> int:
        return len(item[0].input_ids) + len(item[1].input_ids) if self.paired else len(item.input_ids)


class StreamedDataset(IterableDataset):
    """An endless, resumable stream of one rank's batches (each item is a list of units; the loader collates it).

    ``state_dict`` is the number of batches trained on; Lightning saves it in the checkpoint and a resumed run
    continues after them (see the module docstring for how exact that is). Lightning fetches one batch ahead
    of training from a loader without a length, so the batches handed out overcount by one: ``consumed``, when
    set (the data module sets it from the trainer), says how many batches training has used.
    """

    def __init__(self, batches: StreamedBatches, rank: int, world_size: int, consumed: Callable[[], int] | None = None) -> None:
        self.source, self.rank, self.world_size, self.consumed = batches, rank, world_size, consumed
        self.start = 0  # batches skipped before this loader's first (a previous stage's share of the stream)
        self.position = 0  # batches handed out on this rank, over all epochs

    def skip(self, batches: int) -> None:
        """Starts ``batches`` batches (all ranks together) into the stream, as if they had been trained on."""
        self.start = self.position = batches // self.world_size

    def __iter__(self) -> Iterator[list]:
        epoch, handed = 0, 0
        while True:
            yielded = False
            for batch in self.source.batches(self.rank, self.world_size, epoch):
                yielded = True
                handed += 1
                if handed > self.position:
                    self.position = handed
                    yield batch
            if not yielded:
                raise DataError(
                    f"{self.source.sources[0].path}: the stream holds no training units for rank {self.rank} after"
                    " reading, splitting and tokenizing — check --data.path, --data.max_length and --data.val_fraction"
                )
            epoch += 1

    def state_dict(self) -> dict[str, int]:
        """Batches of the stream behind this rank (skipped and trained on), and the number of ranks."""
        position = self.start + self.consumed() if self.consumed is not None else self.position
        return {"position": position, "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continues after a saved :meth:`state_dict` (rescaled when the number of ranks changed)."""
        self.position = int(state["position"]) * int(state.get("world_size", self.world_size)) // self.world_size
