"""The one :class:`PreferenceDataModule` every stage and baseline uses, and its resumable batch sampler.

Tokenization, collation and the train/validation split are core (:mod:`meet_lightning.tokenization`); this
module adds what training needs: Lightning's data hooks, mid-epoch resume and distributed sharding.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Sampler
from typing_extensions import override

from meet_lightning.errors import ConfigError, DataError
from meet_lightning.examples import ControlSchema, Message, ParsedSource, PreferencePair
from meet_lightning.formats import SourceConfig, read_source
from meet_lightning.models import load_tokenizer
from meet_lightning.tokenization import PromptTokenizer, Split, collate_pairs, collate_rows, split_by_prompt


class ResumableBatchSampler(Sampler[list[int]]):
    """Seeded, rank-aware batch sampler whose position can be saved and restored.

    The order of an epoch is a pure function of ``(seed, epoch)``, so a resumed run replays exactly the
    batches an uninterrupted one would have seen. With ``lengths``, batches are grouped by length inside
    windows of 50 batches (less padding), then the batches are shuffled.

    Args:
        num_items: Dataset size.
        batch_size: Items per batch on each rank.
        shuffle: Shuffle every epoch (training) or keep file order (evaluation).
        seed: Seed of the permutation.
        lengths: Optional item lengths for length grouping.
        rank: This process' rank; ``world_size`` processes split every epoch's batches.
        world_size: Number of processes.
        drop_last: Drop the last incomplete batch (training).
        resume: Continue mid-epoch where the last pass stopped (training). Evaluation samplers pass ``False``:
            Lightning's sanity check stops after a few batches, and the next validation must still score all.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        lengths: Sequence[int] | None = None,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        resume: bool = True,
    ) -> None:
        self.num_items, self.batch_size, self.shuffle, self.seed = num_items, batch_size, shuffle, seed
        self.lengths, self.rank, self.world_size, self.drop_last = lengths, rank, world_size, drop_last
        self.resume = resume
        self.epoch = 0
        self.position = 0  # batches of the current epoch already yielded on this rank

    def _epoch_batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        order = list(range(self.num_items))
        if self.shuffle:
            rng.shuffle(order)
        if self.lengths is not None:
            window = self.batch_size * 50
            order = [i for s in range(0, len(order), window) for i in sorted(order[s : s + window], key=self.lengths.__getitem__)]
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle and self.lengths is not None:
            rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.world_size if self.world_size > 1 else len(batches)
        return batches[self.rank : usable : self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        if not self.resume:
            self.epoch, self.position = 0, 0
        batches = self._epoch_batches()
        if batches and self.position >= len(batches):  # Lightning stops at len() without exhausting the generator
            self.epoch, self.position = self.epoch + 1, 0
            batches = self._epoch_batches()
        while self.position < len(batches):
            self.position += 1
            yield batches[self.position - 1]
        self.epoch += 1
        self.position = 0

    def __len__(self) -> int:
        return len(self._epoch_batches())

    def skip(self, batches: int) -> None:
        """Starts ``batches`` batches (all ranks together) into the stream, as if they had been trained on."""
        per_epoch = len(self) * self.world_size
        if per_epoch:
            self.epoch, self.position = divmod(batches, per_epoch)
            self.position //= self.world_size

    def state_dict(self) -> dict[str, int]:
        """Epoch, batches of it already handed out on this rank, and the number of ranks."""
        return {"epoch": self.epoch, "position": self.position, "world_size": self.world_size}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continues from a saved :meth:`state_dict`.

        Ranks take every ``world_size``-th batch of one shared epoch order, so a state saved with another number
        of ranks maps exactly: ``position × old world size`` batches of the epoch were consumed in all.
        """
        saved_world = int(state.get("world_size", self.world_size))
        self.epoch = int(state["epoch"])
        self.position = int(state["position"]) * saved_world // self.world_size


class ResumableDataLoader(DataLoader):
    """A DataLoader that Lightning saves and restores through its batch sampler's position.

    Lightning 2.6 stores ``state_dict()`` of every training loader that has one in the checkpoint
    (``loops.fit_loop.state_dict.combined_loader``) and loads it into the new loader before a resumed epoch
    continues. It does not prefetch from a loader with a length, so the saved position is exactly the number
    of batches trained on. Worker seeds come from the loader's own ``generator`` (seeded by the data module),
    never from the global torch RNG: starting an epoch must not shift the dropout masks of the next steps.
    """

    def state_dict(self) -> dict[str, int]:
        """The batch sampler's state (Lightning stores it in the checkpoint)."""
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restores the batch sampler's state."""
        self.batch_sampler.load_state_dict(state)


class PreferenceDataModule(L.LightningDataModule):
    """Reads preference data, tokenizes it, and serves row or pair batches to every stage and baseline.

    Args:
        path: One data file or hub dataset id (shorthand for a single entry of ``sources``).
        format: Format of ``path`` (``auto`` detects it).
        preference: Preference name for ``path`` (default: the format's own).
        sources: Several sources, each feeding its own preference; not together with ``path``.
        model_name_or_path: Tokenizer to use (linked from the recipe's top-level key).
        max_length: Longest row in text tokens; prompts are truncated from the left to fit.
        batch_size: Training rows per batch (pairs per batch when ``pair_batches``).
        eval_batch_size: Validation pairs/rows per batch (default ``batch_size``).
        val_fraction: Share of prompts held out for validation.
        val_path: A separate validation file (same format options as ``path``); overrides ``val_fraction``.
        pair_batches: Train on paired batches ``[chosen; rejected]`` (DPO); needs pairwise data.
        chosen_only: Train on the chosen response of each pair only (the SFT baseline); rejected responses
            and stand-alone rows are left out of training. Validation keeps its pairs. Not with
            ``pair_batches``.
        group_by_length: Batch rows of similar length together (less padding).
        num_workers: DataLoader worker processes.
        seed: Seed of the validation split and the batch order.
        skip_batches: Training batches of the seeded stream to start after. The two-stage orchestrator sets it
            for stage 2 to the batches stage 1 trained on, so that stage 2 continues the stream instead of
            replaying stage 1's batches (a resumed stage continues from its checkpoint instead).
        on_bad_rows: ``error`` stops at the first bad row; ``skip`` skips bad rows and reports the count.
        predict_path: JSONL with ``prompt`` and optional ``controls`` for ``predict``.
        max_examples: Keep only this many training pairs/rows (after the split), for quick runs.
        max_val_examples: Keep only this many validation pairs/rows.
        trust_remote_code: Allow the tokenizer's own code from the hub.
    """

    def __init__(
        self,
        path: str | None = None,
        format: str = "auto",
        preference: str | None = None,
        sources: list[SourceConfig] | None = None,
        model_name_or_path: str = "",
        max_length: int = 512,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        val_path: str | None = None,
        pair_batches: bool = False,
        chosen_only: bool = False,
        group_by_length: bool = True,
        num_workers: int = 0,
        seed: int = 1234,
        skip_batches: int = 0,
        on_bad_rows: str = "error",
        predict_path: str | None = None,
        max_examples: int | None = None,
        max_val_examples: int | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        problems = _check_data_args(path, sources, max_length, batch_size, eval_batch_size, val_fraction, num_workers)
        problems += [
            f"--data.{name} {value} must be ≥ 1 (or null for all)"
            for name, value in (("max_examples", max_examples), ("max_val_examples", max_val_examples))
            if value is not None and value < 1
        ]
        if skip_batches < 0:
            problems.append(f"--data.skip_batches {skip_batches} must be ≥ 0")
        if pair_batches and chosen_only:
            problems.append("--data.pair_batches and --data.chosen_only were both set — use one (chosen_only for SFT)")
        if problems:
            raise ConfigError("; ".join(problems))
        self.chosen_only = chosen_only
        self.sources = (
            [SourceConfig(path=path, format=format, preference=preference, on_bad_rows=on_bad_rows)]
            if path
            else [_with_on_bad_rows(s, on_bad_rows) for s in (sources or [])]
        )
        self.val_source = (
            SourceConfig(path=val_path, format=format, preference=preference, on_bad_rows=on_bad_rows) if val_path else None
        )
        self.model_name_or_path, self.max_length = model_name_or_path, max_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.val_fraction, self.pair_batches, self.group_by_length = val_fraction, pair_batches, group_by_length
        self.num_workers, self.seed, self.skip_batches, self.predict_path = num_workers, seed, skip_batches, predict_path
        self.max_examples, self.max_val_examples = max_examples, max_val_examples
        self.trust_remote_code = trust_remote_code
        self._parsed: list[ParsedSource] | None = None
        self._tokenizer: Any = None
        self.train_items: list = []
        self.val_items: list = []
        self.summary: Counter = Counter()

    # ----------------------------------------------------------------- reading
    @property
    def parsed(self) -> list[ParsedSource]:
        """Every source read (once) into canonical rows."""
        if self._parsed is None:
            self._parsed = [read_source(s) for s in self.sources]
            if self.val_source is not None:
                self._parsed_val = read_source(self.val_source)
        return self._parsed

    @property
    def control_schema(self) -> dict[str, list[str]]:
        """``{preference: [controls]}`` found in the data, in first-seen order."""
        schema: dict[str, list[str]] = {}
        for source in self.parsed:
            for pref, labels in source.preferences().items():
                known = schema.setdefault(pref, [])
                known.extend(label for label in labels if label not in known)
        return schema

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of ``model_name_or_path`` (right padding, for training)."""
        if self._tokenizer is None:
            if not self.model_name_or_path:
                raise ConfigError("no tokenizer: set --model_name_or_path (or --data.model_name_or_path)")
            self._tokenizer = load_tokenizer(self.model_name_or_path, trust_remote_code=self.trust_remote_code)
            self._tokenizer.model_max_length = 1 << 30  # rows are truncated here, not by the tokenizer's warning
        return self._tokenizer

    def train_val_split(self) -> tuple[Split, Split]:
        """(train, validation): the sources split by prompt, or all of them and ``val_path``'s rows."""
        train, val = split_by_prompt(self.parsed, 0.0 if self.val_source else self.val_fraction, self.seed)
        if self.val_source is not None:
            val = Split(list(self._parsed_val.examples), list(self._parsed_val.pairs))
        return train, val

    def validation_prompts(self, count: int) -> list[list[Message]]:
        """The first ``count`` distinct prompts of the validation split (for sample generations and rewards)."""
        _, val = self.train_val_split()
        seen: dict[str, list[Message]] = {}
        for unit in val.pairs or val.examples:
            seen.setdefault(json.dumps(unit.prompt, sort_keys=True), [dict(m) for m in unit.prompt])
            if len(seen) >= count:
                break
        return list(seen.values())

    # ------------------------------------------------------------ tokenization
    @override
    def setup(self, stage: str | None = None) -> None:
        """Splits and tokenizes the data (once; every Lightning stage reuses it).

        Training uses the sources' rows (or their pairs with ``pair_batches``); validation uses pairs when
        there are any, so the control classifier can score them, else rows.
        """
        if self.train_items or self.val_items:
            return
        schema = ControlSchema.from_dict(self.control_schema)
        train, val = self.train_val_split()
        encoder = PromptTokenizer(self.tokenizer, self.max_length)
        self.summary = Counter()
        train_units = train.pairs if self.pair_batches else train.examples
        if self.chosen_only:  # SFT: the chosen side of each pair, nothing else
            train_units = [pair.examples()[0] for pair in train.pairs]
        val_units = val.pairs or val.examples
        self.train_items = self._tokenize(train_units[: self.max_examples], encoder, schema, "train")
        self.val_items = self._tokenize(val_units[: self.max_val_examples], encoder, schema, "val")
        rank_zero_info(self.describe())
        if not self.train_items:
            raise DataError(
                f"{self.sources[0].path}: no training {'pairs' if self.pair_batches else 'rows'} left after reading and tokenizing"
                " — check --data.path, --data.max_length (and that pair_batches gets pairwise data)"
            )

    def describe(self) -> str:
        """One line per source (rows read, pairs, skipped with reasons) and the tokenization summary."""
        lines = []
        for source in self.parsed:
            skipped = "; ".join(f"{n} {reason}" for reason, n in source.skipped.most_common()) or "none"
            warned = "; ".join(f"{n} {reason}" for reason, n in source.warnings.most_common())
            lines.append(
                f"data: {source.path} ({source.format}): {source.rows_read} rows read → {len(source.examples)} rows,"
                f" {len(source.pairs)} pairs; skipped: {skipped}" + (f"; warnings: {warned}" if warned else "")
            )
        lines.append("data: " + ", ".join(f"{key} {n}" for key, n in sorted(self.summary.items())))
        return "\n".join(lines)

    def _tokenize(self, units: Sequence, encoder: PromptTokenizer, schema: ControlSchema, split: str) -> list:
        """Rows as :class:`TokenizedRow`, pairs as ``(chosen, rejected)`` tuples; too-long ones counted."""
        items: list = []
        for unit in units:
            rows = encoder.tokenize_pair(unit, schema) if isinstance(unit, PreferencePair) else encoder.tokenize(unit, schema)
            if rows is None:
                self.summary[f"{split}: dropped, a response longer than max_length"] += 1
            else:
                items.append(rows)
        self.summary[f"{split}: {'pairs' if units and isinstance(units[0], PreferencePair) else 'rows'}"] += len(items)
        return items

    # ------------------------------------------------------------- dataloaders
    def _loader(self, items: list, batch_size: int, shuffle: bool) -> DataLoader:
        paired = bool(items) and isinstance(items[0], tuple)
        lengths = [len(i[0].input_ids) + len(i[1].input_ids) if paired else len(i.input_ids) for i in items]
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        sampler = ResumableBatchSampler(
            len(items),
            batch_size,
            shuffle=shuffle,
            seed=self.seed,
            rank=rank,
            world_size=world,
            drop_last=False,
            lengths=lengths if self.group_by_length and shuffle else None,
            resume=shuffle,  # only training continues mid-epoch; every evaluation pass starts at its first batch
        )
        pad_id = self.tokenizer.pad_token_id
        collate = (lambda b: collate_pairs(b, pad_id)) if paired else (lambda b: collate_rows(b, pad_id))
        generator = torch.Generator().manual_seed(self.seed)  # not the global RNG: see ResumableDataLoader
        return ResumableDataLoader(
            items, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers, generator=generator
        )

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled, length-grouped training batches (rows, or pairs with ``pair_batches``)."""
        loader = self._loader(self.train_items, self.batch_size, shuffle=True)
        loader.batch_sampler.skip(self.skip_batches)
        return loader

    @override
    def val_dataloader(self) -> DataLoader:
        """Validation pairs (scored by the control classifier) or rows, in file order."""
        return self._loader(self.val_items, self.eval_batch_size, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        """Same as validation: pass a held-out file with ``--data.val_path``."""
        return self.val_dataloader()


def _with_on_bad_rows(source: SourceConfig, on_bad_rows: str) -> SourceConfig:
    if source.on_bad_rows != "error" or on_bad_rows == "error":
        return source
    return SourceConfig(**{**source.__dict__, "on_bad_rows": on_bad_rows})


def _check_data_args(path, sources, max_length, batch_size, eval_batch_size, val_fraction, num_workers) -> list[str]:
    checks = [
        (path and sources, "--data.path and --data.sources were both given — use one (sources for several files)"),
        (not path and not sources, "no data: set --data.path FILE (or --data.sources for several files)"),
        (max_length < 8, f"--data.max_length {max_length} is too small — use at least 8 (e.g. 512)"),
        (batch_size < 1, f"--data.batch_size {batch_size} must be ≥ 1"),
        (eval_batch_size is not None and eval_batch_size < 1, f"--data.eval_batch_size {eval_batch_size} must be ≥ 1"),
        (not 0.0 <= val_fraction < 1.0, f"--data.val_fraction {val_fraction} must be in [0, 1)"),
        (num_workers < 0, f"--data.num_workers {num_workers} must be ≥ 0"),
    ]
    return [message for failed, message in checks if failed]
