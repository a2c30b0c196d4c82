"""Raw preference data → :class:`ControlledExample` rows and :class:`PreferencePair` comparisons.

One entry point, :func:`read_source`, reads one :class:`SourceConfig`: a local ``.json`` / ``.jsonl`` /
``.csv`` file (each optionally ``.gz``), a ``.parquet`` file, or a hub dataset id. Local JSON and CSV files
are read line by line with the standard library so every problem names ``FILE:ROW``; parquet and hub ids go
through ``datasets``. Each format is a small :class:`DataFormat` subclass picked from :data:`FORMATS` by
name; :func:`register_format` adds one of your own without editing this package (the library's formats are
registered the same way, in ``detection``).

Rows are 1-based: the line number for JSON Lines and CSV (the CSV header is line 1, so the first record is
row 2, as a spreadsheet shows it), the element number for a JSON array, the record number for parquet and
hub datasets. A dataset folder whose split holds JSON/JSONL/CSV files is read file by file with the same line
readers (``datasets`` only says which files make up the split), so a bad record names ``FILE:ROW`` of its own
file instead of a ``DatasetGenerationError`` about the whole folder.

Bad data never gives a traceback: it raises :class:`~meet_lightning.errors.DataError` with one line
``FILE:ROW: what is wrong — how to fix it``. With ``on_bad_rows: skip`` a bad record is skipped instead and
counted in ``ParsedSource.skipped`` under its reason (the message without the row), its row listed in
``ParsedSource.skipped_rows``. Problems with the file itself (missing, a directory, empty, truncated gzip,
a broken JSON array) always stop the read.

Choices made for every format:

* A comparison whose two responses are identical (after stripping whitespace) carries no preference: it is
  dropped and counted in ``skipped`` and ``warnings`` (for ``multi_response``, whose row still gives its
  examples, and for ranked siblings, only in ``warnings``).
* A blank prompt is a bad row. A blank response is a bad row where nothing is compared with it
  (``pointwise``, ``multi_response``); as one side of a comparison it is kept and counted in ``warnings``:
  saying nothing is a real answer that raters judged (3 HH-RLHF and 54 PandaLM rows of the shared files).
* A JSON boolean where a response is expected is read as ``True`` / ``False`` and counted in ``warnings``
  (PandaLM stores the answer "True" as JSON ``true``); a number there is a bad row (almost always a wrong
  column).
* ``system_prompt`` is prepended to every prompt that does not already start with a system turn of its own.

The modules, each one job: ``reading`` (files, folders and hub datasets → rows), ``records`` (what one record
gives, :class:`ParsedRecord`; what makes it unusable, :class:`BadRow`), ``base`` (:class:`SourceConfig`,
:class:`DataFormat` and the registry of format names), the formats by kind (``pairs``, ``scores``, ``feedback``,
``ranked``), ``detection`` (the library's formats in the order ``auto`` tries them) and ``source`` (the entry
point, :func:`read_source`). Everything is imported from here, as before the module became a package.
"""

from __future__ import annotations

from meet_lightning.data.formats.base import (
    BAD_ROW_POLICIES,
    DEFAULT_PREFERENCE,
    FORMATS,
    PAIRINGS,
    TIE_CONTROL,
    TIES,
    DataFormat,
    SourceConfig,
    default_score_labels,
    format_names,
    get_format,
    register_format,
    unregister_format,
)
from meet_lightning.data.formats.detection import _guess_format as _guess_format
from meet_lightning.data.formats.detection import detect_format
from meet_lightning.data.formats.feedback import MessagesFeedback, Unpaired
from meet_lightning.data.formats.pairs import HHRLHF, MultiResponse, Pairwise, PairwiseVotes, ShareGPT, split_shared_prefix
from meet_lightning.data.formats.ranked import Ranked
from meet_lightning.data.formats.reading import (
    FileRow,
    HubOptions,
    Row,
    is_local_file,
    iter_records,
    iter_rows,
    raise_csv_field_limit,
    where,
)
from meet_lightning.data.formats.records import BadRow, ParsedRecord
from meet_lightning.data.formats.scores import Pointwise, quantile_cuts, score_cuts, score_labels
from meet_lightning.data.formats.source import iter_parsed, parse_records, read_source

__all__ = [
    "BAD_ROW_POLICIES",
    "BadRow",
    "DEFAULT_PREFERENCE",
    "DataFormat",
    "FORMATS",
    "FileRow",
    "HHRLHF",
    "HubOptions",
    "MessagesFeedback",
    "MultiResponse",
    "PAIRINGS",
    "Pairwise",
    "PairwiseVotes",
    "ParsedRecord",
    "Pointwise",
    "Ranked",
    "Row",
    "ShareGPT",
    "SourceConfig",
    "TIES",
    "TIE_CONTROL",
    "Unpaired",
    "default_score_labels",
    "detect_format",
    "format_names",
    "get_format",
    "is_local_file",
    "iter_parsed",
    "iter_records",
    "iter_rows",
    "parse_records",
    "quantile_cuts",
    "raise_csv_field_limit",
    "read_source",
    "register_format",
    "score_cuts",
    "score_labels",
    "split_shared_prefix",
    "unregister_format",
    "where",
]

_Format = DataFormat
"""Old name of :class:`DataFormat`, kept for one release."""
_Out = ParsedRecord
"""Old name of :class:`ParsedRecord`, kept for one release."""
_BadRow = BadRow
"""Old name of :class:`BadRow`, kept for one release."""
