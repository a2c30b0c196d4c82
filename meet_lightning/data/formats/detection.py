"""Which format a file holds (``auto``): the library's formats, registered with their detectors in the order
``auto`` tries them, and :func:`detect_format`, which names the first that fits a record.

A new built-in format is added to the list below; a format of your own joins with
:func:`~meet_lightning.data.formats.base.register_format` (tried first by default).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from meet_lightning.data.formats.base import _DETECTORS, FORMATS, register_format
from meet_lightning.data.formats.feedback import MessagesFeedback, Unpaired
from meet_lightning.data.formats.pairs import HHRLHF, MultiResponse, Pairwise, PairwiseVotes, ShareGPT
from meet_lightning.data.formats.ranked import Ranked
from meet_lightning.data.formats.records import _keys, _kind, _one_line
from meet_lightning.data.formats.scores import Pointwise
from meet_lightning.errors import DataError


def _is_ranked(rec: Mapping[str, Any]) -> bool:
    return isinstance(rec.get("prompt"), Mapping)


def _is_pairwise(rec: Mapping[str, Any]) -> bool:
    both = "chosen" in rec and "rejected" in rec
    return both and ("prompt" in rec or isinstance(rec["chosen"], list) or (isinstance(rec["chosen"], str) and not _is_hh(rec)))


_HH_MARKERS = re.compile(r"(?:^|\n)(?:Human|Assistant):")


def _is_hh(rec: Mapping[str, Any]) -> bool:
    """Transcripts with ``Human:`` / ``Assistant:`` turns; plain strings without them are TRL implicit-prompt pairs."""
    chosen = rec.get("chosen")
    return "rejected" in rec and isinstance(chosen, str) and _HH_MARKERS.search(chosen) is not None


def _is_multi_response(rec: Mapping[str, Any]) -> bool:
    others = [k for k, v in rec.items() if k != "prompt" and isinstance(v, str)]
    return "prompt" in rec and len(others) >= 2


for _parser, _detector in (  # the order auto tries them: the more specific keys first
    (MessagesFeedback, MessagesFeedback.detect),
    (Ranked, _is_ranked),
    (ShareGPT, lambda rec: "conversations" in rec),
    (Unpaired, lambda rec: "completion" in rec and "label" in rec),
    (PairwiseVotes, lambda rec: "response1" in rec and "response2" in rec),
    (Pointwise, lambda rec: "score" in rec or "scores" in rec),
    (Pairwise, _is_pairwise),
    (HHRLHF, _is_hh),
    (MultiResponse, _is_multi_response),
):
    register_format(_parser.name, _parser, _detector, detect_first=False)


def _guess_format(record: Any) -> str | None:
    if not isinstance(record, Mapping):
        return None
    return next((name for name, fits in _DETECTORS if fits(record)), None)


def detect_format(record: Mapping, where: str) -> str:
    """The format whose keys one record has (``auto``).

    Args:
        record: One record, with ``columns`` already applied.
        where: ``FILE:ROW`` for the error message.

    Raises:
        DataError: No format fits; the message lists the formats and the keys each one reads.
    """
    found = _guess_format(record)
    if found is not None:
        return found
    keys = _keys(record) if isinstance(record, Mapping) else _kind(record)
    options = "; ".join(f"{name} ({parser.summary})" for name, parser in FORMATS.items())
    raise DataError(
        _one_line(
            f"{where}: cannot tell the data format from the keys [{keys}] — set --data.format to one of: "
            f"{options}; rename columns with --data.columns (a CSV's first line must be its header)"
        )
    )
