"""The one :class:`PreferenceDataModule` every stage and baseline uses, and its resumable batch sampler.

Tokenization, collation and the train/validation split are core (:mod:`meet_lightning.data.tokenization`), and so
is the tokenized cache they are stored in (:mod:`meet_lightning.data.cache`) and the streamed dataset
(:mod:`meet_lightning.data.streaming`); this module adds what training needs: Lightning's data hooks, mid-epoch
resume and distributed sharding.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Sampler
from typing_extensions import override

from meet_lightning.data.cache import DataSpec, TokenizedData, iter_val_prompts, prepare_tokenized
from meet_lightning.data.formats import SourceConfig, read_source
from meet_lightning.data.heldout import held_out_split
from meet_lightning.data.rows import Message, ParsedSource
from meet_lightning.data.streaming import StreamedBatches
from meet_lightning.data.tokenization import Split, collate_pairs, collate_rows
from meet_lightning.errors import ConfigError, DataError, failed_checks
from meet_lightning.models import load_tokenizer


class ResumableBatchSampler(Sampler[list[int]]):
    """Seeded, rank-aware batch sampler whose position can be saved and restored.

    The order of an epoch is a pure function of ``(seed, epoch)``, so a resumed run replays exactly the
    batches an uninterrupted one would have seen. With ``lengths``, batches are grouped by length inside
    windows of 50 batches (less padding), then the batches are shuffled. With ``labels`` too, rows are sorted
    by their length *rank within their own label* instead of by raw length, so each batch keeps the window's
    label mix: sorting by raw length made length-task batches nearly single-label (verbose rows are long,
    concise rows short), and each step then pulled the controls one way at a time.

    Args:
        num_items: Dataset size.
        batch_size: Items per batch on each rank.
        shuffle: Shuffle every epoch (training) or keep file order (evaluation).
        seed: Seed of the permutation.
        lengths: Optional item lengths for length grouping.
        labels: Optional item labels (e.g. control ids) whose mix every length-grouped batch keeps.
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
        labels: Sequence[Hashable] | None = None,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        resume: bool = True,
    ) -> None:
        self.num_items, self.batch_size, self.shuffle, self.seed = num_items, batch_size, shuffle, seed
        self.lengths, self.rank, self.world_size, self.drop_last = lengths, rank, world_size, drop_last
        self.labels = labels
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
            order = [i for s in range(0, len(order), window) for i in self._grouped(order[s : s + window])]
        batches = [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle and self.lengths is not None:
            rng.shuffle(batches)
        usable = len(batches) - len(batches) % self.world_size if self.world_size > 1 else len(batches)
        return batches[self.rank : usable : self.world_size]

    def _grouped(self, window: list[int]) -> list[int]:
        """``window`` sorted by length, or by length quantile within each label when ``labels`` are given."""
        if self.labels is None:
            return sorted(window, key=self.lengths.__getitem__)
        by_label: dict[Hashable, list[int]] = {}
        for i in window:
            by_label.setdefault(self.labels[i], []).append(i)
        quantile: dict[int, float] = {}
        for members in by_label.values():
            for rank, i in enumerate(sorted(members, key=self.lengths.__getitem__)):
                quantile[i] = (rank + 0.5) / len(members)  # the shortest of every label first, the longest last
        return sorted(window, key=lambda i: (quantile[i], self.lengths[i]))

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
        """The batch sampler's state, or a streamed dataset's (Lightning stores it in the checkpoint)."""
        return (self.batch_sampler or self.dataset).state_dict()

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Restores the batch sampler's (or streamed dataset's) state."""
        (self.batch_sampler or self.dataset).load_state_dict(state)


class PreferenceDataModule(L.LightningDataModule):
    """Reads preference data, tokenizes it, and serves row or pair batches to every stage and baseline.

    Args:
        path: One data file, dataset folder or hub dataset id (shorthand for a single entry of ``sources``).
        format: Format of ``path`` (``auto`` detects it).
        preference: Preference name for ``path`` (default: the format's own).
        columns: ``{field the format reads: column of your file}`` for ``path`` (and ``val_path``), e.g.
            ``--data.columns '{prompt: question, chosen: good_answer, rejected: bad_answer}'`` (YAML or JSON).
            Each entry of ``sources`` sets its own ``columns``.
        subset: Hub datasets and folders: the configuration name of ``path`` (and ``val_path``).
        data_dir: Hub datasets and folders: the folder of the repository to read, e.g. ``harmless-base``.
        split: Hub datasets and folders: the split of ``path`` to read.
        revision: Hub datasets: branch, tag or commit, so that a rerun reads the same data.
        sources: Several sources, each feeding its own preference; not together with ``path``.
        model_name_or_path: Tokenizer to use (linked from the recipe's top-level key).
        max_length: Longest row in text tokens; prompts are truncated from the left to fit.
        batch_size: Training rows per batch (pairs per batch when ``pair_batches``).
        eval_batch_size: Validation pairs/rows per batch (default ``batch_size``).
        val_fraction: Share of conversations held out for validation, grouped by their first user turn (those
            that open alike land on the same side). Exact duplicate pairs and rows are dropped first, and counted.
        val_path: A separate validation file (same format and hub options as ``path``; the ``test`` split when it
            is the same hub dataset as ``path``); overrides ``val_fraction``. Validation units whose first user
            turn is also in the training data are refused (an error naming the count), see ``drop_val_overlap``.
        drop_val_overlap: With ``val_path``: drop the validation units whose first user turn is also in the
            training data, and print how many, instead of refusing the files.
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
        cache_dir: Where the tokenized data is kept and found again (default
            ``$HF_DATASETS_CACHE/meet_lightning``, i.e. ``~/.cache/huggingface/datasets/meet_lightning``):
            one folder per fingerprint of the sources' contents, the options and the tokenizer, shared by
            both stages, ``validate``, the export and every DDP rank. Printed when a stage starts.
        num_proc: Worker processes ``datasets.map`` tokenizes with when the cache is built (null: this process).
        streaming: Read the training data as a stream (hub datasets, large local JSON Lines): nothing is
            cached, batches are length-grouped inside a shuffle buffer, and the trainer needs ``max_steps``.
            Validation is ``val_path`` (cached as usual), or else the first ``max_val_examples`` units of the
            prompts the seeded split holds out.
        shuffle_buffer: Streaming: units shuffled (and length-grouped) together.
    """

    def __init__(
        self,
        path: str | None = None,
        format: str = "auto",
        preference: str | None = None,
        columns: dict[str, str] | None = None,
        subset: str | None = None,
        data_dir: str | None = None,
        split: str = "train",
        revision: str | None = None,
        sources: list[SourceConfig] | None = None,
        model_name_or_path: str = "",
        max_length: int = 512,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        val_path: str | None = None,
        drop_val_overlap: bool = False,
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
        cache_dir: str | None = None,
        num_proc: int | None = None,
        streaming: bool = False,
        shuffle_buffer: int = 1000,
    ) -> None:
        super().__init__()
        problems = _check_data_args(path, sources, max_length, batch_size, eval_batch_size, val_fraction, num_workers)
        problems += _check_scale_args(num_proc, streaming, shuffle_buffer, num_workers)
        problems += [
            f"--data.{name} {value} must be ≥ 1 (or null for all)"
            for name, value in (("max_examples", max_examples), ("max_val_examples", max_val_examples))
            if value is not None and value < 1
        ]
        if skip_batches < 0:
            problems.append(f"--data.skip_batches {skip_batches} must be ≥ 0")
        if columns and sources:
            problems.append("--data.columns applies to --data.path — set columns on each entry of --data.sources instead")
        if pair_batches and chosen_only:
            problems.append("--data.pair_batches and --data.chosen_only were both set — use one (chosen_only for SFT)")
        if problems:
            raise ConfigError("; ".join(problems))
        self.chosen_only = chosen_only
        hub = {"subset": subset, "data_dir": data_dir, "split": split, "revision": revision}
        mapping = {"format": format, "preference": preference, "columns": dict(columns or {}), "on_bad_rows": on_bad_rows}
        self.sources = (
            [SourceConfig(path=path, **mapping, **hub)] if path else [_with_on_bad_rows(s, on_bad_rows) for s in (sources or [])]
        )
        val_hub = {**hub, "split": "test" if val_path == path else "train"}  # the same hub dataset: its test split
        self.val_source = SourceConfig(path=val_path, **mapping, **val_hub) if val_path else None
        self.cache_dir, self.num_proc, self.streaming, self.shuffle_buffer = cache_dir, num_proc, streaming, shuffle_buffer
        self.model_name_or_path, self.max_length = model_name_or_path, max_length
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.val_fraction, self.pair_batches, self.group_by_length = val_fraction, pair_batches, group_by_length
        self.num_workers, self.seed, self.skip_batches, self.predict_path = num_workers, seed, skip_batches, predict_path
        self.max_examples, self.max_val_examples = max_examples, max_val_examples
        self.drop_val_overlap = drop_val_overlap
        self.trust_remote_code = trust_remote_code
        self._parsed: list[ParsedSource] | None = None
        self._tokenizer: Any = None
        self._prepared: TokenizedData | None = None
        self._stream: StreamedBatches | None = None
        self.train_items: Sequence = []
        self.val_items: Sequence = []
        self.summary: Counter = Counter()

    # ----------------------------------------------------------------- reading
    @property
    def parsed(self) -> list[ParsedSource]:
        """Every source read (once) into canonical rows, in Python lists (training reads the cache instead)."""
        if self._parsed is None:
            self._parsed = [read_source(s) for s in self.sources]
            if self.val_source is not None:
                self._parsed_val = read_source(self.val_source)
        return self._parsed

    @property
    def control_schema(self) -> dict[str, list[str]]:
        """``{preference: [controls]}`` found in the data, in first-seen order (stored with the cached data)."""
        if self.streaming:
            return self.stream.schema
        return self.prepared.schema

    @property
    def spec(self) -> DataSpec:
        """What decides the tokenized data (with the tokenizer, the cache key)."""
        units = "pairs" if self.pair_batches else "chosen" if self.chosen_only else "rows"
        return DataSpec(
            tuple(self.sources),
            self.val_source,
            self.max_length,
            self.val_fraction,
            self.seed,
            units,
            self.max_examples,
            self.max_val_examples,
            drop_val_overlap=self.drop_val_overlap,
        )

    @property
    def prepared(self) -> TokenizedData:
        """The run's tokenized data, memory-mapped from the cache (built there first if it is not yet)."""
        if self._prepared is None:
            self._prepared = prepare_tokenized(self.spec, self.tokenizer, self.cache_dir, self.num_proc, log=rank_zero_info)
            rank_zero_info(self._prepared.describe_cache())
        return self._prepared

    @property
    def stream(self) -> StreamedBatches:
        """``streaming: true``: the training stream and its validation units."""
        if self._stream is None:
            self._stream = StreamedBatches(
                self.sources,
                self.tokenizer,
                self.max_length,
                self.batch_size,
                units=self.spec.train_units,
                seed=self.seed,
                val_fraction=0.0 if self.val_source else self.val_fraction,
                max_val_examples=self.max_val_examples,
                shuffle_buffer=self.shuffle_buffer,
                group_by_length=self.group_by_length,
            )
        return self._stream

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
        """(train, validation) as the cache builds them: duplicates dropped, split by first user turn, or all of
        the sources and ``val_path``'s rows (its overlap with training refused or dropped, see ``drop_val_overlap``).
        """
        parsed = self.parsed  # reads val_path too
        held_out = self._parsed_val if self.val_source is not None else None
        _, _, train, val, _ = held_out_split(parsed, held_out, self.val_fraction, self.seed, self.drop_val_overlap)
        return train, val

    def validation_prompts(self, count: int) -> list[list[Message]]:
        """The first ``count`` distinct prompts of the validation split (for sample generations and rewards)."""
        if self.streaming and self.val_source is None:
            return self.stream.validation_prompts(count)
        return list(iter_val_prompts(self.prepared.val, count))

    # ------------------------------------------------------------ tokenization
    @override
    def setup(self, stage: str | None = None) -> None:
        """Finds (or builds) the tokenized data in the cache and memory-maps it (every Lightning stage reuses it).

        Training uses the sources' rows (or their pairs with ``pair_batches``); validation uses pairs when
        there are any, so the control classifier can score them, else rows.
        """
        if self.train_items or self.val_items:
            return
        if self.streaming:
            self._setup_streaming()
            return
        prepared = self.prepared
        self.train_items, self.val_items, self.summary = prepared.train, prepared.val, Counter(prepared.summary)
        rank_zero_info(self.describe())
        if not self.train_items:
            raise DataError(
                f"{self.sources[0].path}: no training {'pairs' if self.pair_batches else 'rows'} left after reading and tokenizing"
                " — check --data.path, --data.max_length (and that pair_batches gets pairwise data)"
            )

    def _setup_streaming(self) -> None:
        if self.val_source is not None:
            self.val_items = prepare_tokenized(
                DataSpec((self.val_source,), None, self.max_length, 0.0, self.seed, "rows", None, self.max_val_examples),
                self.tokenizer,
                self.cache_dir,
                self.num_proc,
            ).train
        else:
            self.val_items = self.stream.validation_units()
        self.train_items = self.stream  # the stream stands in for the items: setup ran
        self.summary = Counter({"val: units": len(self.val_items)})
        rank_zero_info(f"data: streaming {', '.join(s.path for s in self.sources)}; {len(self.val_items)} validation units")
        rank_zero_info(self.stream.unchecked(self.val_source.path if self.val_source is not None else None))

    def describe(self) -> str:
        """One line per source (rows read, pairs, skipped with reasons) and the tokenization summary."""
        lines = list(self.prepared.source_lines) if not self.streaming else []
        # keys are "split: what" ("train: pairs", "val: dropped, a response longer than max_length")
        counts = (f"{key.replace(': ', f': {n} ', 1)}" for key, n in sorted(self.summary.items()))
        lines.append("data: " + "; ".join(counts))
        return "\n".join(lines)

    # ------------------------------------------------------------- dataloaders
    def _loader(self, items: Sequence, batch_size: int, shuffle: bool) -> DataLoader:
        paired = items.paired if hasattr(items, "paired") else bool(items) and isinstance(items[0], tuple)
        if hasattr(items, "lengths"):  # memory-mapped: one Arrow column, not a pass over the rows
            lengths = items.lengths()
        else:
            lengths = [len(i[0].input_ids) + len(i[1].input_ids) if paired else len(i.input_ids) for i in items]
        labels = None if paired else self._row_labels(items)  # a pair holds both labels already
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
            labels=labels,
            resume=shuffle,  # only training continues mid-epoch; every evaluation pass starts at its first batch
        )
        pad_id = self.tokenizer.pad_token_id
        collate = (lambda b: collate_pairs(b, pad_id)) if paired else (lambda b: collate_rows(b, pad_id))
        generator = torch.Generator().manual_seed(self.seed)  # not the global RNG: see ResumableDataLoader
        return ResumableDataLoader(
            items, batch_sampler=sampler, collate_fn=collate, num_workers=self.num_workers, generator=generator
        )

    @staticmethod
    def _row_labels(items: Sequence) -> list[tuple[int, ...]]:
        """Each row's control ids: the label mix length grouping keeps (see :class:`ResumableBatchSampler`)."""
        if hasattr(items, "column"):  # memory-mapped: one Arrow column
            return [tuple(ids) for ids in items.column("control_ids")]
        return [tuple(i.control_ids) for i in items]

    @override
    def train_dataloader(self) -> DataLoader:
        """Shuffled, length-grouped training batches (rows, or pairs with ``pair_batches``)."""
        if self.streaming:
            return self._stream_loader()
        loader = self._loader(self.train_items, self.batch_size, shuffle=True)
        loader.batch_sampler.skip(self.skip_batches)
        return loader

    def _stream_loader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer else 0
        world = self.trainer.world_size if self.trainer else 1
        if self.trainer is not None and self.trainer.max_steps in (None, -1):
            raise ConfigError(
                "--data.streaming true has no length to count epochs by — set --stage1.trainer.max_steps"
                " (and --stage2.trainer.max_steps)"
            )
        dataset = self.stream.for_rank(rank, world)
        dataset.skip(self.skip_batches)
        trainer = self.trainer
        if trainer is not None:  # checkpoints are written at optimizer-step boundaries: steps × accumulation = batches
            dataset.consumed = lambda: trainer.global_step * trainer.accumulate_grad_batches
        pad_id = self.tokenizer.pad_token_id
        paired = self.stream.paired
        collate = (lambda b: collate_pairs(b, pad_id)) if paired else (lambda b: collate_rows(b, pad_id))
        return ResumableDataLoader(dataset, batch_size=None, collate_fn=collate, num_workers=0)

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


def _check_scale_args(num_proc, streaming, shuffle_buffer, num_workers) -> list[str]:
    checks = [
        (num_proc is not None and num_proc < 1, f"--data.num_proc {num_proc} must be ≥ 1 (or null for this process)"),
        (shuffle_buffer < 1, f"--data.shuffle_buffer {shuffle_buffer} must be ≥ 1"),
        (
            streaming and num_workers > 0,
            f"--data.streaming true tokenizes in the training process, so that a resumed stream is exact — set"
            f" --data.num_workers 0 (got {num_workers})",
        ),
    ]
    return failed_checks(checks)


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
    return failed_checks(checks)
