"""Validation that is really held out: the split key, exact duplicates, and train/validation overlap.

Three rules, applied wherever a run's train/validation split is made (the tokenized cache, a data module's
:meth:`~meet_lightning.data.datamodule.PreferenceDataModule.train_val_split`, the stream):

* The split key is the conversation's **first user turn** (:func:`split_key`), not the whole prompt: HH-RLHF
  and OpenAssistant hold several conversations that open with the same question and then branch, and a split by
  whole prompt puts one branch in training and its sibling in validation (on the shared HH file, 16 of 180
  validation pairs at seed 1234).
* **Exact duplicates** (same prompt, responses and controls) are dropped, keeping the first, and counted in the
  source's ``skipped`` counts as :data:`DUPLICATES` (the ``data:`` line prints it): twenty copies of one pair are
  one pair, not twenty independent training and validation items.
* A separate validation source (``val_path``) sharing a split key with the training data is refused
  (:class:`~meet_lightning.errors.DataError` naming both files, the count and the fix), or, with
  ``drop_val_overlap``, those validation units are dropped and counted.

Core: no Lightning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections import Counter
from collections.abc import Sequence

from meet_lightning.data.rows import ControlledExample, Message, ParsedSource, PreferencePair
from meet_lightning.data.tokenization import Split
from meet_lightning.errors import DataError

DUPLICATES = "duplicates dropped (same prompt, responses and controls as an earlier record)"
"""The ``skipped`` reason exact duplicates are counted under."""


def split_key(prompt: Sequence[Message]) -> str:
    """What decides a unit's side of the split: its first user turn, whitespace-normalised.

    Conversations that open with the same question share the key, so they land on the same side. A prompt
    without a user turn is keyed by all of it.
    """
    first = next((m["content"] for m in prompt if m.get("role") == "user"), None)
    if first is None:
        return "\x00" + json.dumps([dict(m) for m in prompt], sort_keys=True)
    return " ".join(first.split())


def _digest(*parts: object) -> bytes:
    """A 16-byte digest of ``parts``: duplicates are found by it without keeping a second copy of the text."""
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).digest()


def _pair_key(pair: PreferencePair) -> bytes:
    prompt = [dict(m) for m in pair.prompt]
    return _digest(prompt, pair.chosen, pair.rejected, pair.preference, pair.chosen_control, pair.rejected_control)


def _row_key(example: ControlledExample) -> bytes:
    return _digest([dict(m) for m in example.prompt], example.response, dict(example.controls))


def _row_number(source: str) -> int | str:
    """The row of a ``FILE:ROW`` label (its text when it is not a number)."""
    row = source.rsplit(":", 1)[-1]
    return int(row) if row.isdigit() else row


def drop_duplicates(parsed: ParsedSource) -> ParsedSource:
    """``parsed`` without exact duplicate pairs and rows, the first of each kept, the rest counted as skipped.

    A pair's two rows go with it; a stand-alone row (pointwise, multi-response) is a duplicate when its prompt,
    response and controls equal an earlier stand-alone row's. Order is kept, and without duplicates the same
    object is returned.
    """
    seen: set[bytes] = set()
    pairs, dropped = [], []
    for pair in parsed.pairs:
        key = _pair_key(pair)
        (dropped if key in seen else pairs).append(pair)
        seen.add(key)
    # A pair's rows carry its FILE:ROW, so (content, source) tells a kept pair's rows from a dropped pair's.
    kept_sides = Counter((_row_key(e), e.source) for p in pairs for e in p.examples())
    dropped_sides = Counter((_row_key(e), e.source) for p in dropped for e in p.examples())
    seen.clear()
    examples, rows = [], [p.source for p in dropped]
    for example in parsed.examples:
        side = (_row_key(example), example.source)
        if kept_sides[side] > 0:
            kept_sides[side] -= 1
            examples.append(example)
        elif dropped_sides[side] > 0:  # leaves with its pair, already counted
            dropped_sides[side] -= 1
        elif side[0] in seen:
            rows.append(example.source)
        else:
            seen.add(side[0])
            examples.append(example)
    if not rows:
        return parsed
    skipped, skipped_rows = Counter(parsed.skipped), {k: list(v) for k, v in parsed.skipped_rows.items()}
    skipped[DUPLICATES] += len(rows)
    skipped_rows.setdefault(DUPLICATES, []).extend(_row_number(s) for s in rows)
    return dataclasses.replace(parsed, pairs=pairs, examples=examples, skipped=skipped, skipped_rows=skipped_rows)


def split_by_first_turn(parsed: Sequence[ParsedSource], val_fraction: float, seed: int) -> tuple[Split, Split]:
    """Rows and pairs split into (train, validation) by :func:`split_key`, a seeded ``val_fraction`` of the keys held out.

    Every row and pair of a key, from every source, lands on the same side.
    """
    groups: dict[str, Split] = {}
    for source in parsed:
        for example in source.examples:
            groups.setdefault(split_key(example.prompt), Split()).examples.append(example)
        for pair in source.pairs:
            groups.setdefault(split_key(pair.prompt), Split()).pairs.append(pair)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    num_val = round(len(keys) * val_fraction)
    sides = (keys[num_val:], keys[:num_val])
    train, val = (
        Split([e for k in side for e in groups[k].examples], [p for k in side for p in groups[k].pairs]) for side in sides
    )
    return train, val


def check_overlap(train: Split, val: Split, train_name: str, val_name: str, drop: bool) -> tuple[Split, int]:
    """``(validation without the units whose split key is in training, how many were dropped)``.

    Raises:
        DataError: Some validation units share their first user turn with training, and ``drop`` is off.
    """
    keys = {split_key(u.prompt) for u in (*train.examples, *train.pairs)}
    kept = Split(
        [e for e in val.examples if split_key(e.prompt) not in keys], [p for p in val.pairs if split_key(p.prompt) not in keys]
    )
    units, left = (val.pairs, kept.pairs) if val.pairs else (val.examples, kept.examples)
    overlap = len(units) - len(left)
    if overlap and not drop:
        what = "pairs" if val.pairs else "rows"
        raise DataError(
            f"{val_name}: {overlap} of {len(units)} validation {what} share their first user turn with training data in"
            f" {train_name}, so validation is not held out — use a validation file without those conversations, or"
            " --data.drop_val_overlap true to drop them from validation"
        )
    return kept, overlap


def held_out_split(
    parsed: Sequence[ParsedSource],
    held_out: ParsedSource | None,
    val_fraction: float,
    seed: int,
    drop_val_overlap: bool = False,
) -> tuple[list[ParsedSource], ParsedSource | None, Split, Split, list[str]]:
    """The run's split: duplicates dropped, then by first user turn, or against a separate validation source.

    Args:
        parsed: The training sources as read.
        held_out: The separate validation source (``val_path``) as read, or ``None`` to hold out ``val_fraction``.
        val_fraction: Share of split keys held out (without ``held_out``).
        seed: Seed of the split.
        drop_val_overlap: Drop validation units that share a first user turn with training instead of refusing.

    Returns:
        ``(sources without duplicates, validation source without duplicates, train, validation, notes)``;
        the notes are ``data:`` lines to print (the overlap dropped).

    Raises:
        DataError: ``held_out`` overlaps training and ``drop_val_overlap`` is off.
    """
    parsed = [drop_duplicates(p) for p in parsed]
    train, val = split_by_first_turn(parsed, 0.0 if held_out is not None else val_fraction, seed)
    notes: list[str] = []
    if held_out is not None:
        held_out = drop_duplicates(held_out)
        val = Split(list(held_out.examples), list(held_out.pairs))
        names = ", ".join(p.path for p in parsed)
        val, overlap = check_overlap(train, val, names, held_out.path, drop_val_overlap)
        if overlap:
            notes.append(
                f"data: validation {held_out.path}: {overlap} units whose first user turn is also in training dropped"
                " (--data.drop_val_overlap)"
            )
    return parsed, held_out, train, val, notes
