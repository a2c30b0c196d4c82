"""Raw preference data → :class:`ControlledExample` rows and :class:`PreferencePair` comparisons.

One entry point, :func:`read_source`, reads one :class:`SourceConfig`: a local ``.json`` / ``.jsonl`` /
``.csv`` file (each optionally ``.gz``), a ``.parquet`` file, or a hub dataset id. Local JSON and CSV files
are read line by line with the standard library so every problem names ``FILE:ROW``; parquet and hub ids go
through ``datasets``. Each format is a small :class:`DataFormat` subclass picked from :data:`FORMATS` by
name; :func:`register_format` adds one of your own without editing this module (the library's formats are
registered the same way, at its end).

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
"""

from __future__ import annotations

import abc
import bisect
import csv
import difflib
import gzip
import importlib
import json
import math
import re
import string
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from meet_lightning.data.rows import ControlledExample, ParsedSource, PreferencePair
from meet_lightning.errors import ConfigError, DataError

DEFAULT_PREFERENCE = "preference"
"""Preference name used when a source sets none."""

PAIRINGS = ("all_pairs", "best_vs_rest")
TIES = ("skip", "tie")
BAD_ROW_POLICIES = ("error", "skip")
TIE_CONTROL = "tie"
"""Control both responses of a tied ``pairwise_votes`` comparison train under with ``ties: tie``."""

_DEFAULT_LABELS: dict[int, tuple[str, ...]] = {2: ("bad", "good"), 3: ("low", "mid", "high")}


def default_score_labels(bins: int) -> list[str]:
    """Labels for ``bins`` score bins, lowest first.

    ``bad, good`` for 2 (the controls pairwise data uses, so pointwise and pairwise sources can feed one
    preference), ``low, mid, high`` for 3, else ``bin1 … binN``.
    """
    return list(_DEFAULT_LABELS.get(bins, [f"bin{i + 1}" for i in range(bins)]))


# --------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class HubOptions:
    """What selects the records of a hub dataset or a dataset folder (ignored for a single local file).

    Attributes:
        subset: Configuration name (``load_dataset(path, name)``).
        data_dir: Folder of the repository to read (``Anthropic/hh-rlhf`` keeps ``harmless-base`` and
            ``helpful-base`` apart this way).
        split: Split to read.
        revision: Branch, tag or commit of a hub repository.
    """

    subset: str | None = None
    data_dir: str | None = None
    split: str = "train"
    revision: str | None = None

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``datasets.load_dataset`` (unset options left out)."""
        named = {"name": self.subset, "data_dir": self.data_dir, "revision": self.revision}
        return {"split": self.split, **{key: value for key, value in named.items() if value is not None}}


@dataclass
class SourceConfig:
    """One data source and how to turn its records into training rows.

    Attributes:
        path: A local ``.json`` / ``.jsonl`` / ``.csv`` file (optionally ``.gz``), a ``.parquet`` file, or a
            hub dataset id ``owner/name``.
        format: ``auto`` (detected from the first record's keys) or one of ``hh_rlhf``, ``pairwise``,
            ``sharegpt``, ``multi_response``, ``pointwise``, ``pairwise_votes``, ``ranked``, ``unpaired``,
            ``messages_feedback``, a format registered with :func:`register_format`, or the class path of a
            :class:`DataFormat` subclass of your own (``my_package.formats.MyFormat``, imported).
        preference: Preference the labels belong to; ``None`` means ``preference``. For pointwise
            ``scores`` dicts each attribute is its own preference, named after the attribute
            (``overall``), or ``<preference>_<attribute>`` when this is set (``usr_overall``).
        columns: ``{canonical field: column in the file}``, e.g. ``{prompt: instruction, chosen: better}``.
        prompt_template: Builds the prompt from several columns, e.g. ``"{context}\\n\\n{source}"``
            (formats with a prompt column: pairwise, multi_response, pointwise, pairwise_votes).
        system_prompt: A system turn put before every prompt that has none.
        chosen_control: Control the preferred response trains under.
        rejected_control: Control the other response trains under.
        controls: ``multi_response``: the columns that each hold one control's response (default: every
            string column of the first record except the prompt columns).
        score_thresholds: ``pointwise`` and ``messages_feedback`` scores: ascending cut points; ``score < t0`` gets the first label,
            ``t0 <= score < t1`` the second, and so on.
        score_labels: ``pointwise`` labels, lowest first, one more than the thresholds (or one per quantile
            bin). Default: ``bad, good`` for two bins, ``low, mid, high`` for three, else ``bin1 … binN``.
        quantile_bins: ``pointwise``: near-equal-count bins computed over the whole file, per attribute.
            With neither thresholds nor bins, a median split (``quantile_bins: 2``, labels ``bad, good``).
        attributes: ``pointwise`` ``scores`` dicts: the attributes to use (default: all).
        pairing: ``ranked``: ``all_pairs`` (every two ranked siblings) or ``best_vs_rest`` (the best-ranked
            reply against each other ranked sibling).
        ties: ``pairwise_votes``: ``skip`` (counted) or ``tie`` (both responses train under control ``tie``).
        subset: Hub datasets and dataset folders only: the configuration name (``load_dataset``'s ``name``).
        data_dir: Hub datasets and dataset folders only: the folder of the repository to read, e.g.
            ``harmless-base`` of ``Anthropic/hh-rlhf``.
        split: Hub datasets and dataset folders only: the split to read.
        revision: Hub datasets only: a branch, tag or commit, so a run reads the same data again.
        on_bad_rows: ``error`` stops at the first bad record; ``skip`` skips it and counts it by reason.
    """

    path: str
    format: str = "auto"
    preference: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    prompt_template: str | None = None
    system_prompt: str | None = None
    chosen_control: str = "good"
    rejected_control: str = "bad"
    controls: list[str] | None = None
    score_thresholds: list[float] | None = None
    score_labels: list[str] | None = None
    quantile_bins: int | None = None
    attributes: list[str] | None = None
    pairing: str = "all_pairs"
    ties: str = "skip"
    subset: str | None = None
    data_dir: str | None = None
    split: str = "train"
    revision: str | None = None
    on_bad_rows: str = "error"

    @property
    def hub(self) -> HubOptions:
        """The options ``datasets.load_dataset`` takes for a hub id or a dataset folder."""
        return HubOptions(self.subset, self.data_dir, self.split, self.revision)

    def __post_init__(self) -> None:
        problems = [problem for check in _CONFIG_CHECKS for problem in check(self)]
        if problems:
            raise ConfigError(f"data source {self.path!r}: " + "; ".join(problems))


def _check_choices(cfg: SourceConfig) -> list[str]:
    choices = {
        "pairing": PAIRINGS,
        "ties": TIES,
        "on_bad_rows": BAD_ROW_POLICIES,
    }
    problems = []
    if cfg.format != "auto":
        try:
            get_format(cfg.format)
        except ConfigError as err:
            problems.append(str(err))
    for name, allowed in choices.items():
        value = getattr(cfg, name)
        if value not in allowed:
            close = difflib.get_close_matches(str(value), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            fix = f"set --data.{name} to one of {', '.join(allowed)}"
            problems.append(f"{name} {value!r} is unknown{hint} — {fix}")
    return problems


def _check_names(cfg: SourceConfig) -> list[str]:
    problems = []
    if not isinstance(cfg.path, str) or not cfg.path.strip():
        problems.append("path is empty — set --data.path FILE")
    if cfg.chosen_control == cfg.rejected_control:
        problems.append(f"chosen_control and rejected_control are both {cfg.chosen_control!r} — give them different names")
    if not isinstance(cfg.columns, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in cfg.columns.items()
    ):
        problems.append("columns must map field names to column names — e.g. --data.columns '{prompt: q}'")
    if cfg.controls is not None and (not cfg.controls or len(set(cfg.controls)) != len(cfg.controls)):
        problems.append("controls must name distinct columns — e.g. --data.controls '[concise, verbose]'")
    return problems


def _check_template(cfg: SourceConfig) -> list[str]:
    if cfg.prompt_template is None:
        return []
    fix = "write columns as {name}, e.g. --data.prompt_template '{context}\\n\\n{source}'"
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(cfg.prompt_template) if name is not None]
    except ValueError as err:
        return [f"prompt_template is not a valid template ({err}) — {fix}"]
    if not names:
        return [f"prompt_template names no column — {fix}"]
    if not all(name.isidentifier() for name in names):
        return [f"prompt_template fields must be plain column names, got {names} — {fix}"]
    parser = FORMATS.get(cfg.format)  # an unknown one is _check_choices' problem
    if parser is not None and not parser.uses_template:
        return [_no_template(cfg.format)]
    return []


def _no_template(name: str) -> str:
    return (
        f"prompt_template does not apply to format {name} (its prompt comes from the conversation) — "
        "remove --data.prompt_template"
    )


def _check_scores(cfg: SourceConfig) -> list[str]:
    problems = []
    thresholds, bins, labels = cfg.score_thresholds, cfg.quantile_bins, cfg.score_labels
    if thresholds is not None and bins is not None:
        problems.append("score_thresholds and quantile_bins are both set — keep one of them")
    if thresholds is not None:
        if not thresholds or not all(isinstance(t, (int, float)) and math.isfinite(t) for t in thresholds):
            problems.append("score_thresholds must be finite numbers — e.g. --data.score_thresholds '[3.0]'")
        elif any(a >= b for a, b in zip(thresholds, thresholds[1:], strict=False)):
            problems.append(f"score_thresholds {thresholds} are not ascending — list the cut points, lowest first")
    if bins is not None and (not isinstance(bins, int) or bins < 2):
        problems.append(f"quantile_bins {bins!r} must be an integer >= 2 — e.g. --data.quantile_bins 2")
    if labels is not None:
        expected = len(thresholds) + 1 if thresholds else bins if isinstance(bins, int) else 2
        if len(labels) != expected or len(set(labels)) != len(labels):
            problems.append(f"score_labels needs {expected} distinct labels, got {labels} — give one label per bin, lowest first")
    return problems


_CONFIG_CHECKS: tuple[Callable[[SourceConfig], list[str]], ...] = (
    _check_choices,
    _check_names,
    _check_template,
    _check_scores,
)


# ------------------------------------------------------------------------------------------- bad records


class BadRow(DataError):
    """One unusable record, raised by :meth:`DataFormat.parse`; the reader adds ``FILE:ROW``.

    Args:
        reason: What is wrong, without the row (``"empty response"``); also the key the record is counted
            under when ``on_bad_rows: skip`` skips it.
        fix: How to fix it (``"fill it in or drop the row"``).
        kind: ``missing`` (a field is absent), ``type`` (a field has the wrong type) or ``value``: a missing
            or mistyped field in a row that looks like another format is reported as such.
        detail: Row-specific text appended to the message but not to the counted reason.
    """

    def __init__(self, reason: str, fix: str, kind: str = "value", detail: str = "") -> None:
        super().__init__(f"{reason}{detail} — {fix}")
        self.reason, self.fix, self.kind = reason, fix, kind


class _Missing(BadRow):
    """Required fields absent; :func:`read_source` adds the format and the keys the row does have."""

    def __init__(self, fields: list[str], columns: Mapping[str, str], note: str = "") -> None:
        names = ", ".join(_field_label(f, columns) for f in fields)
        mapping = ", ".join(f"{name}: YOUR_COLUMN" for name in fields)
        fix = f"map your columns with --data.columns '{{{mapping}}}'"
        super().__init__(f"missing field {names}{note}", fix, kind="missing")
        self.fields = fields


def _field_label(name: str, columns: Mapping[str, str]) -> str:
    column = columns.get(name, name)
    return repr(name) if column == name else f"{column!r} (mapped to {name} by --data.columns)"


_JSON_KINDS = {bool: "a boolean", int: "a number", float: "a number", str: "a string", type(None): "null"}


def _kind(value: Any) -> str:
    """JSON-style name of a value's type for messages."""
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _one_line(text: object) -> str:
    return re.sub(r"[\r\n]+", " ", str(text))


def _keys(record: Mapping[str, Any]) -> str:
    """The first dozen keys of a record, for messages."""
    return ", ".join(_short(key, 30) for key in list(record)[:12])


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------- reading

_TEXT_SUFFIXES = (".json", ".jsonl", ".csv")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)
_UNDECODABLE = ("undecodable bytes (not UTF-8)", "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
_NOT_OBJECT_FIX = 'write each record as a JSON object with named fields, e.g. {"prompt": ..., "chosen": ...}'

Row = tuple[int, Any]


class FileRow(int):
    """A row number inside one file of a dataset folder: the number, and the file it belongs to."""

    file: str

    def __new__(cls, row: int, file: str) -> FileRow:
        self = super().__new__(cls, row)
        self.file = file
        return self


def where(path: str, row: int) -> str:
    """``FILE:ROW`` of a record: ``path``'s, or for a dataset folder the file the row belongs to."""
    return f"{row.file}:{int(row)}" if isinstance(row, FileRow) else f"{path}:{row}"


def iter_records(
    path: str, subset: str | None = None, split: str = "train", data_dir: str | None = None, revision: str | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield ``(row, record)`` for every record of a local file, parquet file, dataset folder or hub dataset.

    Args:
        path: Local ``.json`` / ``.jsonl`` / ``.csv`` (optionally ``.gz``) or ``.parquet`` file, a folder laid
            out like a hub dataset repository, or a hub id.
        subset: Hub datasets and folders only: the configuration name.
        split: Hub datasets and folders only: the split.
        data_dir: Hub datasets and folders only: the folder of the repository to read.
        revision: Hub datasets only: branch, tag or commit.

    Raises:
        DataError: ``FILE:ROW: …`` for the first unreadable record or an unreadable file.
    """
    for row, value in iter_rows(path, HubOptions(subset, data_dir, split, revision)):
        if isinstance(value, BadRow):
            raise DataError(_one_line(f"{where(path, row)}: {value}"))
        if not isinstance(value, Mapping):
            raise DataError(_one_line(f"{where(path, row)}: the record is {_kind(value)} — {_NOT_OBJECT_FIX}"))
        yield row, dict(value)


def is_local_file(path: str) -> bool:
    """Whether ``path`` names one local file read by the line-by-line readers (or parquet), not a dataset."""
    return Path(path).is_file()


def iter_rows(path: str, hub: HubOptions = HubOptions(), streaming: bool = False) -> Iterator[Row]:
    """``(row, value)`` pairs; a value is a :class:`BadRow` where the record itself cannot be read.

    Local JSON/JSONL/CSV files are read line by line (lazily: a file is never held in memory whole, except
    a ``.json`` array); parquet files, dataset folders and hub ids go through ``datasets``, with
    ``streaming`` as an ``IterableDataset`` that downloads as it goes.
    """
    local = Path(path)
    if local.is_dir():
        files = _folder_files(path, hub)
        if files is None:  # parquet, arrow or other files only datasets reads
            return _iter_datasets(path, hub, local=False, streaming=streaming, folder=True)
        return _nonempty(path, (row for file in files for row in _file_rows(file)))
    if not local.exists():
        if _HUB_ID.fullmatch(path) and not path.lower().endswith(_TEXT_SUFFIXES + (".gz", ".parquet")):
            return _iter_datasets(path, hub, local=False, streaming=streaming)
        raise DataError(f"{path}: no such file — check --data.path (relative paths start at {Path.cwd()})")
    name = local.name.lower().removesuffix(".gz")
    if local.name.lower().endswith(".parquet"):
        return _iter_datasets(path, HubOptions(), local=True, streaming=streaming)
    reader = _READERS.get(Path(name).suffix)
    if reader is None:
        raise DataError(
            f"{path}: unsupported file type {local.suffix!r} — use .json, .jsonl or .csv (optionally .gz) or .parquet"
        )
    return _nonempty(path, reader(local, path))


def _folder_files(path: str, hub: HubOptions) -> list[str] | None:
    """The files of a dataset folder's split (as ``datasets`` resolves ``data_dir``, ``subset`` and ``split``), or
    ``None`` when one of them is not a JSON/JSONL/CSV file (optionally ``.gz``) that the line readers read."""
    import datasets

    kwargs = {key: value for key, value in hub.load_kwargs().items() if key != "split"}
    try:
        data_files = datasets.load_dataset_builder(path, **kwargs).config.data_files or {}
    except Exception as err:  # noqa: BLE001 - sorted into one user error each by _load_error; a bug re-raises
        raise _load_error(path, err, folder=True) from None
    splits = {str(name): list(files) for name, files in data_files.items()}
    if hub.split not in splits:
        raise DataError(
            f"{path}: the folder has no split {hub.split!r} (splits: {', '.join(sorted(splits)) or 'none'}) — set"
            " --data.split to one of them (or --data.data_dir / --data.subset to another folder)"
        )
    files = [_shown_under(path, f) for f in splits[hub.split]]
    readable = all(Path(f.lower().removesuffix(".gz")).suffix in _READERS for f in files)
    return files if files and readable else None


def _shown_under(folder: str, file: str) -> str:
    """``file`` as the user would write it: under the folder as given (``data/hh/train.jsonl``), not absolute."""
    try:
        return str(Path(folder) / Path(file).resolve().relative_to(Path(folder).resolve()))
    except ValueError:  # a data file outside the folder (a config may point anywhere): its own path
        return file


def _file_rows(file: str) -> Iterator[Row]:
    """One file of a dataset folder, read by its line reader; rows carry the file (:class:`FileRow`)."""
    local = Path(file)
    reader = _READERS[Path(local.name.lower().removesuffix(".gz")).suffix]
    for row, value in _nonempty(file, reader(local, file)):
        yield FileRow(row, file), value


def _nonempty(path: str, rows: Iterator[Row]) -> Iterator[Row]:
    seen = False
    for item in rows:
        seen = True
        yield item
    if not seen:
        raise DataError(f"{path}: the file is empty (no records) — pass a file with at least one record")


def _open(path: Path, shown: str) -> BinaryIO:
    try:
        return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else path.open("rb")
    except PermissionError as err:
        raise DataError(f"{shown}: cannot read the file ({err.strerror}) — check its permissions") from None


def _binary_lines(path: Path, shown: str) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw bytes)``; a corrupt or cut gzip stream names the line it stopped at."""
    lineno = 0
    with _open(path, shown) as handle:
        try:
            for lineno, line in enumerate(handle, 1):
                yield lineno, line
        except _GZIP_ERRORS as err:
            raise DataError(
                f"{shown}:{lineno + 1}: the gzip data is corrupt or truncated ({_one_line(err)}) — "
                "re-download or re-compress the file"
            ) from None


def _read_jsonl(path: Path, shown: str) -> Iterator[Row]:
    for lineno, raw in _binary_lines(path, shown):
        if not raw.strip():
            continue  # blank lines keep their number but hold no record
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            yield lineno, BadRow(*_UNDECODABLE, detail=f" at byte {err.start}")
            continue
        try:
            yield lineno, json.loads(text)
        except json.JSONDecodeError as err:
            fix = "fix or remove the line: each line holds one complete JSON object"
            yield lineno, BadRow("invalid JSON", fix, detail=f" ({err.msg} at column {err.colno})")


def _read_json(path: Path, shown: str) -> Iterator[Row]:
    """A JSON array of objects (row = element number), or JSON Lines content in a ``.json`` file."""
    data = b"".join(line for _, line in _binary_lines(path, shown))
    try:
        text, undecodable = data.decode("utf-8-sig"), False
    except UnicodeDecodeError:
        # Bad bytes survive as lone surrogates, so the element that holds them can be named.
        text, undecodable = data.decode("utf-8-sig", errors="surrogateescape"), True
    start = _WHITESPACE.match(text).end()
    if text[start : start + 1] != "[":
        whole = _whole_json(text)
        if whole is None:
            yield from _read_jsonl(path, shown)
        else:
            yield 1, BadRow(*_UNDECODABLE) if undecodable and _has_surrogates(whole) else whole
        return
    for row, value in _json_elements(text, start + 1, shown):
        yield row, BadRow(*_UNDECODABLE) if undecodable and _has_surrogates(value) else value


def _whole_json(text: str) -> Any:
    """The file as one JSON object (a single, maybe pretty-printed record), or ``None`` for JSON Lines."""
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def _json_elements(text: str, pos: int, shown: str) -> Iterator[Row]:
    decoder, row = json.JSONDecoder(), 0
    pos = _WHITESPACE.match(text, pos).end()
    if text.startswith("]", pos):
        return
    while True:
        row += 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{shown}:{row}: invalid JSON in element {row} ({err.msg}, line {err.lineno} col {err.colno})"
                " — fix the file: a .json file holds one JSON array of objects, or one object per line"
            ) from None
        yield row, value
        pos = _WHITESPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            return
        else:
            raise DataError(
                f"{shown}:{row}: the JSON array is truncated or malformed after element {row} "
                "(expected ',' or ']') — fix the file or re-download it"
            )


def _has_surrogates(value: Any) -> bool:
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, Mapping):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogates(v) for v in value)
    return False


def raise_csv_field_limit() -> int:
    """Lifts the ``csv`` module's 128 KiB field limit to the largest the platform takes (a long answer is data,
    not a quoting error); returns the new limit."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return limit
        except OverflowError:  # a C long narrower than Python's maxsize (Windows)
            limit //= 2


def _read_csv(path: Path, shown: str) -> Iterator[Row]:
    """Rows of a CSV with a header line; the row number is the line the record starts on."""
    raise_csv_field_limit()
    lines = (raw.decode("utf-8-sig", errors="surrogateescape") for _, raw in _binary_lines(path, shown))
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
        if header is None:
            return
        _check_header(header, shown)
        start = reader.line_num + 1
        for fields in reader:
            row, start = start, reader.line_num + 1
            if fields:
                yield row, _csv_record(header, fields)
    except csv.Error as err:
        where = f"{shown}:{reader.line_num}"
        raise DataError(f"{where}: unreadable CSV ({err}) — fix the quoting on that line") from None


def _check_header(header: list[str], shown: str) -> None:
    names = [name.strip() for name in header]
    duplicates = sorted(name for name, n in Counter(names).items() if n > 1)
    if "" in names or duplicates:
        problem = "an empty column name" if "" in names else f"the repeated column {duplicates[0]!r}"
        raise DataError(
            f"{shown}:1: the CSV header has {problem} — the first line must be a header row naming every "
            "column once (e.g. prompt,chosen,rejected)"
        )


def _csv_record(header: list[str], fields: list[str]) -> Any:
    if len(fields) != len(header):
        return BadRow(
            f"the row has {len(fields)} fields but the header has {len(header)}",
            "quote fields that contain commas and give every row one value per header column",
        )
    record = dict(zip((name.strip() for name in header), fields, strict=True))
    return BadRow(*_UNDECODABLE) if _has_surrogates(record) else record


def _iter_datasets(path: str, hub: HubOptions, local: bool, streaming: bool = False, folder: bool = False) -> Iterator[Row]:
    """Parquet files, dataset folders and hub ids through ``datasets`` (imported only here: it is slow to import)."""
    import datasets

    try:
        if local:
            dataset = datasets.load_dataset("parquet", data_files=path, split="train", streaming=streaming)
        else:
            dataset = datasets.load_dataset(path, streaming=streaming, **hub.load_kwargs())
    except Exception as err:  # noqa: BLE001 - sorted into one user error each by _load_error; a bug re-raises
        raise _load_error(path, err, folder) from None
    if not streaming and len(dataset) == 0:
        raise DataError(f"{path}: the dataset is empty (no records) — pass a file with at least one record")
    return enumerate(dataset, 1) if not streaming else _nonempty(path, enumerate(dataset, 1))


def _load_error(path: str, err: Exception, folder: bool) -> Exception:
    """The one-line DataError for what ``datasets.load_dataset`` raised; anything unexpected is returned as is."""
    from datasets.data_files import EmptyDatasetError
    from datasets.exceptions import DatasetNotFoundError

    options = "--data.subset / --data.data_dir / --data.split / --data.revision"
    if folder and isinstance(err, (EmptyDatasetError, FileNotFoundError)):
        return DataError(
            f"{path}: is a directory with no data files that datasets reads ({_one_line(err)[:160]}) — pass a data file"
            f" (.json, .jsonl, .csv, .parquet), or a dataset folder and {options}"
        )
    if isinstance(err, ConnectionError):
        return DataError(
            f"{path}: the hub dataset is not reachable offline ({_one_line(err)[:200]}) — pass a local file with --data.path FILE"
        )
    if isinstance(err, DatasetNotFoundError):
        return DataError(f"{path}: no such dataset ({_one_line(err)[:200]}) — check --data.path")
    if isinstance(err, (ValueError, FileNotFoundError, EmptyDatasetError)):  # ArrowInvalid, unknown subset/split
        return DataError(f"{path}: cannot load ({_one_line(err)[:200]}) — check the file or {options}")
    return err


_READERS: dict[str, Callable[[Path, str], Iterator[Row]]] = {
    ".json": _read_json,
    ".jsonl": _read_jsonl,
    ".csv": _read_csv,
}


# ------------------------------------------------------------------------------------------- record parts

_ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "prompter": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
}
_ROLE_KEYS = (("role", "content"), ("from", "value"))


@dataclass
class ParsedRecord:
    """What one record (or the end of the file) produced: what :meth:`DataFormat.parse` returns.

    Attributes:
        pairs: Comparisons (validation scores them with the control classifier).
        examples: Training rows. :meth:`add_pair` adds a pair's two rows; a format that pairs rows itself
            appends each row once.
        skipped: One reason per thing the record held but gave nothing for (counted by reason with the row).
        warnings: Reasons for things kept but worth a look (counted, shown by ``inspect-data``).
    """

    pairs: list[PreferencePair] = field(default_factory=list)
    examples: list[ControlledExample] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add_pair(self, pair: PreferencePair) -> None:
        """Keep a comparison and its two examples, unless both sides say the same thing."""
        if pair.chosen.strip() == pair.rejected.strip():
            self.warnings.append(_IDENTICAL + " (pair skipped)")
            self.skipped.append(_IDENTICAL)
            return
        if not pair.chosen.strip() or not pair.rejected.strip():
            self.warnings.append(_EMPTY_SIDE)
        self.pairs.append(pair)
        self.examples.extend(pair.examples())


_IDENTICAL = "chosen and rejected are identical"
# Saying nothing is a real answer that raters judge (HH-RLHF and PandaLM both have such pairs), so an empty
# response facing a non-empty one is kept; an empty response with nothing to compare against is a bad row.
_EMPTY_SIDE = "empty response kept (one side of a comparison)"


def _message(value: Any, where: str) -> dict[str, str]:
    """A chat turn from ``{role, content}`` or sharegpt's ``{from, value}``."""
    if not isinstance(value, Mapping):
        raise BadRow(f"{where} is {_kind(value)}, expected a message", _MESSAGE_FIX, "type")
    role_key, content_key = next(((r, c) for r, c in _ROLE_KEYS if r in value), ("role", "content"))
    role, content = value.get(role_key), value.get(content_key)
    if not isinstance(role, str) or role.lower() not in _ROLES:
        fix = "use role user, assistant or system (or human, gpt)"
        raise BadRow(f"{where} has role {_short(role)}", fix, "type")
    if not isinstance(content, str):
        raise BadRow(f"{where} has {content_key} {_kind(content)}, expected a string", _MESSAGE_FIX, "type")
    return {"role": _ROLES[role.lower()], "content": content}


_MESSAGE_FIX = 'write each turn as {"role": "user", "content": "..."} or {"from": "human", "value": "..."}'


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise BadRow(f"{where} is {_kind(value)}, expected a list of messages", _MESSAGE_FIX, "type")
    return [_message(item, f"{where}[{i}]") for i, item in enumerate(value)]


def _response(text: str, where: str) -> str:
    if not text.strip():
        raise BadRow(f"empty {where}", "fill it in or drop the row (--data.on_bad_rows skip skips them)")
    return text


def _text(value: Any, name: str, out: ParsedRecord) -> str | None:
    """A response cell as text; ``None`` when it is not text.

    JSON booleans are read as ``True`` / ``False``: PandaLM stores a model that answered "True" as JSON
    ``true``. Numbers stay errors: a number in a response column almost always means a wrong column.
    """
    if isinstance(value, bool):
        out.warnings.append(f"boolean {name} read as text")
        return str(value)
    return value if isinstance(value, str) else None


def _number(value: Any, where: str) -> float:
    """A finite score; numeric strings are accepted because CSV cells are strings."""
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise BadRow(f"{where} is {_short(value)}, expected a finite number", "fix the score or drop the row")
    return number


# ------------------------------------------------------------------------------------------------ formats


class DataFormat(abc.ABC):
    """Base class of every data format: turns one raw record into pairs and training rows.

    Add a format of your own by subclassing it and registering it under a name (no edit of this module)::

        from meet_lightning import DataFormat, ParsedRecord, register_format

        class QuestionAnswers(DataFormat):
            # reads {"question": ..., "good_answer": ..., "bad_answer": ...}

            summary = "question, good_answer, bad_answer"

            @classmethod
            def detect(cls, record):
                return "good_answer" in record and "bad_answer" in record

            def parse(self, rec, raw, source):
                prompt = self._finish_prompt([{"role": "user", "content": self._string(rec, "question")}])
                out = ParsedRecord()
                out.add_pair(self._pair(prompt, self._string(rec, "good_answer"), self._string(rec, "bad_answer"), source))
                return out

        register_format("question_answers", QuestionAnswers)

    A recipe then sets ``data.format: question_answers`` once the module is imported, or names the class
    itself, ``data.format: my_package.formats.QuestionAnswers``, which imports it (``fit`` on the command line
    imports nothing else of yours).

    Override:
        parse: Required. ``(rec, raw, source) -> ParsedRecord`` for one record: ``rec`` has ``columns``
            applied, ``raw`` is the record as read (for ``prompt_template``), ``source`` is ``FILE:ROW``.
            Raise :class:`BadRow` for an unusable record (it stops the read, or with ``on_bad_rows: skip`` is
            counted under its reason); append to ``ParsedRecord.skipped`` for a record that is fine but
            gives nothing (counted with its row, never dropped silently).
        finish: Optional. Runs after the last record and returns a :class:`ParsedRecord` of what needs the
            whole file (pointwise quantiles, pairing replies across rows).
        detect: Optional classmethod ``(record) -> bool``: whether ``auto`` should pick this format for a
            file whose first record (columns applied) is ``record``. The default claims nothing.
        summary: The keys the format reads, shown when no format fits a file.
        uses_template: ``True`` when the prompt comes from a column, so ``prompt_template`` applies.

    Helpers for subclasses: ``_require(rec, *fields)`` (missing fields are a bad row naming the user's column),
    ``_string``, ``_prompt`` (a prompt column or ``prompt_template``), ``_reply_turns``, ``_finish_prompt``
    (checks the prompt, adds ``system_prompt``) and ``_pair`` (a :class:`PreferencePair` under
    ``chosen_control`` / ``rejected_control``). ``self.cfg`` is the :class:`SourceConfig`, ``self.preference``
    the preference name.

    A fresh instance reads each source, so a format may keep state across records (pointwise buffers its
    scores to compute quantiles; ranked notes whether any rank was seen). The tokenized cache is keyed by the
    format's name and the file, not the format's code: after changing a format of your own, pass another
    ``cache_dir`` or delete the cache folder.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # the keys this format reads, for the "cannot tell the format" message
    uses_template: ClassVar[bool] = False

    @classmethod
    def detect(cls, record: Mapping[str, Any]) -> bool:
        """Whether ``auto`` should read a file whose first record is ``record`` with this format (default: never)."""
        return False

    def __init__(self, cfg: SourceConfig) -> None:
        self.cfg = cfg
        self.preference = cfg.preference or DEFAULT_PREFERENCE

    @abc.abstractmethod
    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        """Turn one record into pairs and examples.

        Args:
            rec: The record with ``columns`` applied (canonical field names).
            raw: The record as read, for ``prompt_template``.
            source: ``FILE:ROW`` for the examples.
        """

    def finish(self) -> ParsedRecord:
        """Whatever needs the whole file (e.g. quantile labels)."""
        return ParsedRecord()

    # Field access: missing and mistyped fields are bad rows naming the column as the user wrote it.
    def _require(self, rec: Mapping[str, Any], *names: str) -> None:
        missing = [name for name in names if name not in rec]
        if missing:
            raise _Missing(missing, self.cfg.columns)

    def _string(self, rec: Mapping[str, Any], name: str) -> str:
        self._require(rec, name)
        value = rec[name]
        if not isinstance(value, str):
            raise self._wrong_type(name, value, "a string")
        return value

    def _response_cell(self, rec: Mapping[str, Any], name: str, out: ParsedRecord) -> str:
        self._require(rec, name)
        text = _text(rec[name], name, out)
        if text is None:
            raise self._wrong_type(name, rec[name], "a string")
        return text

    def _wrong_type(self, name: str, value: Any, expected: str) -> BadRow:
        label = _field_label(name, self.cfg.columns)
        fix = f"fix the value or map another column with --data.columns '{{{name}: COLUMN}}'"
        return BadRow(f"field {label} is {_kind(value)}, expected {expected}", fix, "type")

    def _prompt(self, rec: Mapping[str, Any], raw: Mapping[str, Any], name: str = "prompt") -> list[dict]:
        """The prompt turns: from ``prompt_template``, or a string or message list in column ``name``."""
        if self.cfg.prompt_template is not None:
            return [{"role": "user", "content": self._render(raw)}]
        self._require(rec, name)
        value = rec[name]
        if isinstance(value, str):
            return [{"role": "user", "content": value}]
        if isinstance(value, list):
            return _messages(value, f"field {name!r}")
        raise self._wrong_type(name, value, "a string or a list of messages")

    def _render(self, raw: Mapping[str, Any]) -> str:
        template = self.cfg.prompt_template or ""
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
        missing = [name for name in names if name not in raw]
        if missing:
            fix = "fix --data.prompt_template or the file's columns"
            raise BadRow(f"missing column {missing[0]!r} named in prompt_template", fix, "missing")
        for name in names:
            if not isinstance(raw[name], (str, int, float)) or isinstance(raw[name], bool):
                raise self._wrong_type(name, raw[name], "a string (prompt_template column)")
        try:
            return template.format(**{name: raw[name] for name in names})
        except (ValueError, TypeError) as err:  # a format spec such as {x:.2f} applied to text
            raise BadRow(f"prompt_template cannot format this row ({err})", "drop the format spec") from None

    def _finish_prompt(self, turns: Sequence[Mapping[str, str]]) -> tuple[dict, ...]:
        """Check the prompt says something, then put ``system_prompt`` first unless it has a system turn."""
        if not any(t["content"].strip() for t in turns if t["role"] != "system"):
            raise BadRow("empty prompt", "fill in the prompt or drop the row (--data.on_bad_rows skip)")
        turns = [dict(t) for t in turns]
        if self.cfg.system_prompt and turns[0]["role"] != "system":
            turns.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        return tuple(turns)

    def _reply_turns(self, rec: Mapping[str, Any], name: str, out: ParsedRecord) -> tuple[list[dict[str, str]], str]:
        """``(turns before the response, response text)`` of a response column (``chosen``, ``completion``…).

        A string is the response; a message list ends with it, and its earlier turns continue the prompt.
        """
        value = rec[name]
        text = _text(value, name, out)
        if text is not None:
            return [], text
        if isinstance(value, Mapping):
            value = [value]
        if not isinstance(value, list) or not value:
            raise self._wrong_type(name, value, "a string or a non-empty list of messages")
        turns = _messages(value, f"field {name!r}")
        if turns[-1]["role"] != "assistant":
            raise BadRow(
                f"the last message of {name} is a {turns[-1]['role']} turn",
                f"end {name} with the assistant response",
                "type",
            )
        return turns[:-1], turns[-1]["content"]

    def _pair(self, prompt: tuple, chosen: str, rejected: str, source: str) -> PreferencePair:
        cfg = self.cfg
        return PreferencePair(prompt, chosen, rejected, self.preference, cfg.chosen_control, cfg.rejected_control, source)


class HHRLHF(DataFormat):
    """Anthropic HH-RLHF: ``chosen`` / ``rejected`` transcripts ``"\\n\\nHuman: …\\n\\nAssistant: …"``.

    The prompt is everything before the last ``\\n\\nAssistant:`` (its turns become user/assistant
    messages); the response is the text after it, stripped. Turns are split on the ``\\n\\nHuman:`` /
    ``\\n\\nAssistant:`` markers only, so a response that says "Human:" mid-line stays whole. A pair whose
    transcripts differ before the last Assistant turn is not one comparison: it is skipped and counted.
    An empty last Assistant turn is kept as an empty response (counted in ``warnings``).
    """

    name = "hh_rlhf"
    summary = "chosen, rejected transcripts"
    _TURN = re.compile(r"\n\n(Human|Assistant):")
    _HH_ROLES = {"Human": "user", "Assistant": "assistant"}

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        self._require(rec, "chosen", "rejected")
        chosen_prefix, chosen = self._split(self._string(rec, "chosen"), "chosen")
        rejected_prefix, rejected = self._split(self._string(rec, "rejected"), "rejected")
        out = ParsedRecord()
        if chosen_prefix != rejected_prefix:
            out.skipped.append("chosen and rejected differ before the last Assistant turn")
            return out
        prompt = self._finish_prompt(self._turns(chosen_prefix, "chosen"))
        out.add_pair(self._pair(prompt, chosen, rejected, source))
        return out

    def _split(self, transcript: str, name: str) -> tuple[str, str]:
        if transcript.startswith(("Human:", "Assistant:")):
            transcript = "\n\n" + transcript  # the marker at the very start has no blank line before it
        cut = transcript.rfind("\n\nAssistant:")
        if cut < 0:
            raise BadRow(
                f"{name} has no '\\n\\nAssistant:' turn",
                "HH-RLHF transcripts end with an Assistant turn; for prompt/chosen/rejected data, or pairs without"
                " Human:/Assistant: markers (TRL implicit prompt), set --data.format pairwise",
            )
        return transcript[:cut], transcript[cut + len("\n\nAssistant:") :].strip()

    def _turns(self, prefix: str, name: str) -> list[dict[str, str]]:
        marks = list(self._TURN.finditer(prefix))
        if not marks or prefix[: marks[0].start()].strip():
            fix = "start the transcript with '\\n\\nHuman:' or set --data.format pairwise"
            raise BadRow(f"{name} does not start with a 'Human:' turn", fix)
        ends = [m.start() for m in marks[1:]] + [len(prefix)]
        return [
            {"role": self._HH_ROLES[m.group(1)], "content": prefix[m.end() : end].strip()}
            for m, end in zip(marks, ends, strict=True)
        ]


class Pairwise(DataFormat):
    """``prompt`` / ``chosen`` / ``rejected`` (TRL "standard" and "conversational"), prompt explicit or implicit.

    Each field is a string or a list of ``{role, content}`` messages. A message-list ``chosen`` /
    ``rejected`` ends with the assistant response; the turns before it continue the prompt (TRL's implicit
    prompt, where ``prompt`` may then be absent) and must be the same on both sides, else the pair is
    skipped and counted. Without a ``prompt`` column, plain-string ``chosen`` / ``rejected`` (TRL's
    standard implicit prompt, ``"The sky is blue."`` / ``"The sky is green."``) share their prompt as
    leading text: it ends at the last whitespace of the common prefix, so both responses start on a word
    (``"blue."`` / ``"green."``); strings that share no such text are a bad row.
    """

    name = "pairwise"
    summary = "prompt, chosen, rejected"
    uses_template = True

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        self._require(rec, "chosen", "rejected")
        out = ParsedRecord()
        chosen_head, chosen = self._reply_turns(rec, "chosen", out)
        rejected_head, rejected = self._reply_turns(rec, "rejected", out)
        if chosen_head != rejected_head:
            out.skipped.append("chosen and rejected differ before the last assistant turn")
            return out
        no_prompt = "prompt" not in rec and self.cfg.prompt_template is None
        if no_prompt and not chosen_head:  # TRL standard, implicit prompt: the shared leading text
            head, chosen, rejected = split_shared_prefix(chosen, rejected)
            turns = [{"role": "user", "content": head}]
        else:
            turns = ([] if no_prompt else self._prompt(rec, raw)) + chosen_head
        out.add_pair(self._pair(self._finish_prompt(turns), chosen, rejected, source))
        return out


_WORD_BREAK = re.compile(r"\s")


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``(prompt, chosen response, rejected response)`` of two texts that start with the same prompt.

    The prompt is the common leading text up to its last whitespace, so a response never starts inside a
    word (``"Answer: yes"`` / ``"Answer: yesterday"`` → ``"Answer:"``, ``"yes"``, ``"yesterday"``); the
    three parts are stripped. A bad row when no whitespace-ended prompt is shared.
    """
    shared = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        shared += 1
    breaks = [m.start() for m in _WORD_BREAK.finditer(chosen, 0, shared)]
    prompt = chosen[: breaks[-1]].strip() if breaks else ""
    if not prompt:
        raise BadRow(
            "chosen and rejected share no leading prompt text (no 'prompt' column, no Human:/Assistant: markers)",
            "add the prompt as its own column (--data.columns '{prompt: COLUMN}'), or for HH-RLHF transcripts set"
            " --data.format hh_rlhf",
            "missing",  # a prompt is what is missing: a row of another format is named as such
        )
    cut = breaks[-1]
    return prompt, chosen[cut:].strip(), rejected[cut:].strip()


class ShareGPT(DataFormat):
    """sharegpt-style (LLaMA-Factory): ``conversations`` [{from, value}] + ``chosen`` / ``rejected``.

    ``from`` is system / human / gpt (user / assistant and ``{role, content}`` also work); an optional
    top-level ``system`` string becomes the system turn. ``chosen`` / ``rejected`` are one assistant
    message or a plain string.
    """

    name = "sharegpt"
    summary = "conversations, chosen, rejected"

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        self._require(rec, "conversations", "chosen", "rejected")
        turns = _messages(rec["conversations"], "field 'conversations'")
        system = rec.get("system")
        if isinstance(system, str) and system.strip() and not (turns and turns[0]["role"] == "system"):
            turns.insert(0, {"role": "system", "content": system})
        prompt = self._finish_prompt(turns)
        out = ParsedRecord()
        chosen, rejected = self._reply(rec, "chosen", out), self._reply(rec, "rejected", out)
        out.add_pair(self._pair(prompt, chosen, rejected, source))
        return out

    def _reply(self, rec: Mapping[str, Any], name: str, out: ParsedRecord) -> str:
        value = rec[name]
        text = _text(value, name, out)
        if text is not None:
            return text
        if not isinstance(value, Mapping):
            raise self._wrong_type(name, value, 'a message {"from": "gpt", "value": "..."}')
        message = _message(value, f"field {name!r}")
        if message["role"] != "assistant":
            role = message["role"]
            raise BadRow(f"{name} is a {role} message", f"make {name} a gpt/assistant message", "type")
        return message["content"]


class MultiResponse(DataFormat):
    """A prompt column plus one response column per control (e.g. ``prompt``, ``concise``, ``verbose``).

    Every control column gives one example with controls ``{preference: column name}``; every two control
    columns ``i < j`` (in ``controls`` order, else file order) also form a pair, column ``i`` as chosen, so
    validation can score e.g. concise vs verbose. Identical responses keep their examples but form no pair
    (counted in ``warnings``).
    """

    name = "multi_response"
    summary = "prompt + one response column per control"
    uses_template = True

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self.controls: list[str] | None = list(cfg.controls) if cfg.controls else None

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        controls = self.controls = self.controls or self._default_controls(rec)
        prompt = self._finish_prompt(self._prompt(rec, raw))
        self._require(rec, *controls)
        out = ParsedRecord()
        texts = {name: _response(self._response_cell(rec, name, out), name) for name in controls}
        for name, text in texts.items():
            out.examples.append(ControlledExample(prompt, text, {self.preference: name}, source))
        for first, second in combinations(controls, 2):
            if texts[first].strip() == texts[second].strip():
                out.warnings.append("identical responses in two control columns (no pair, examples kept)")
                continue
            pair = PreferencePair(prompt, texts[first], texts[second], self.preference, first, second, source)
            out.pairs.append(pair)
        return out

    def _default_controls(self, rec: Mapping[str, Any]) -> list[str]:
        template = self.cfg.prompt_template or ""
        prompt_columns = {"prompt", "system", *(n for _, n, _, _ in string.Formatter().parse(template) if n)}
        controls = [k for k, v in rec.items() if isinstance(v, str) and k not in prompt_columns]
        if not controls:
            raise BadRow("no response columns besides the prompt", "name them with --data.controls '[a, b]'")
        return controls


class Pointwise(DataFormat):
    """``prompt`` / ``response`` + ``score`` (a number) or ``scores`` (``{attribute: number}``).

    A single ``score`` labels ``preference``; with ``scores`` each attribute is its own preference (named
    after the attribute, or ``<preference>_<attribute>`` when ``preference`` is set) and one row carries a
    control for every attribute it has a score for (a null score gives no control). Labels come from
    ``score_thresholds`` or from ``quantile_bins`` computed over the whole file per preference; with
    neither, a median split (2 quantile bins) labelled ``bad`` / ``good``.
    """

    name = "pointwise"
    summary = "prompt, response, score or scores"
    uses_template = True

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self.rows: list[tuple[tuple, str, dict[str, float], str]] = []
        self.attributes_seen: set[str] = set()

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        self._require(rec, *([] if self.cfg.prompt_template else ["prompt"]), "response")
        if "score" not in rec and "scores" not in rec:
            raise _Missing(["score"], self.cfg.columns, note=" (or 'scores')")
        prompt = self._finish_prompt(self._prompt(rec, raw))
        out = ParsedRecord()
        response = _response(self._response_cell(rec, "response", out), "response")
        scores = self._scores(rec)
        if not scores:
            out.skipped.append("no score for the selected attributes")
            return out
        self.rows.append((prompt, response, scores, source))
        return out

    def _scores(self, rec: Mapping[str, Any]) -> dict[str, float]:
        if "scores" not in rec:
            return {self.preference: _number(rec["score"], "field 'score'")}
        table = rec["scores"]
        if not isinstance(table, Mapping):
            raise self._wrong_type("scores", table, "an object {attribute: number}")
        self.attributes_seen.update(str(name) for name in table)
        wanted = self.cfg.attributes
        prefix = f"{self.cfg.preference}_" if self.cfg.preference else ""
        return {
            f"{prefix}{name}": _number(value, f"scores[{name!r}]")
            for name, value in table.items()
            if value is not None and (wanted is None or name in wanted)
        }

    def finish(self) -> ParsedRecord:
        self._check_attributes()
        values: dict[str, list[float]] = {}
        for _, _, scores, _ in self.rows:
            for preference, value in scores.items():
                values.setdefault(preference, []).append(value)
        cuts = {pref: self._cuts(vals) for pref, vals in values.items()}
        labels = self._labels()
        out = ParsedRecord()
        for prompt, response, scores, source in self.rows:
            controls = {p: labels[bisect.bisect_right(cuts[p], v)] for p, v in scores.items()}
            out.examples.append(ControlledExample(prompt, response, controls, source))
        return out

    def _cuts(self, values: list[float]) -> list[float]:
        return score_cuts(self.cfg, values)

    def _labels(self) -> list[str]:
        return score_labels(self.cfg)

    def _check_attributes(self) -> None:
        unknown = [name for name in self.cfg.attributes or [] if name not in self.attributes_seen]
        if unknown and self.attributes_seen:
            found = ", ".join(_short(name, 30) for name in sorted(self.attributes_seen))
            raise DataError(
                _one_line(
                    f"{self.cfg.path}: attribute {unknown[0]!r} is in no row's scores — set --data.attributes to some of {found}"
                )
            )


def score_cuts(cfg: SourceConfig, values: Sequence[float]) -> list[float]:
    """Cut points of the score bins of a source: ``score_thresholds``, else ``quantile_bins`` (default 2) over
    ``values``; a score gets ``score_labels(cfg)[bisect_right(cuts, score)]``."""
    if cfg.score_thresholds is not None:
        return [float(t) for t in cfg.score_thresholds]
    return quantile_cuts(values, cfg.quantile_bins or 2)


def score_labels(cfg: SourceConfig) -> list[str]:
    """The control of each score bin, lowest first: ``score_labels``, else :func:`default_score_labels`."""
    bins = len(cfg.score_thresholds) + 1 if cfg.score_thresholds else cfg.quantile_bins or 2
    return list(cfg.score_labels) if cfg.score_labels else default_score_labels(bins)


def quantile_cuts(values: Sequence[float], bins: int) -> list[float]:
    """Cut points for ``bins`` near-equal-count bins over ``values`` (``score < cut`` falls below a cut).

    Equal scores always share a bin, so each cut is the distinct value whose count of smaller scores is
    closest to ``k * n / bins``; on coarse scales a bin can come out larger or empty.
    """
    ordered = sorted(values)
    candidates = [(value, bisect.bisect_left(ordered, value)) for value in sorted(set(ordered))[1:]]
    if not candidates:
        return []
    cuts = []
    for k in range(1, bins):
        target = k * len(ordered) / bins
        cuts.append(min(candidates, key=lambda c: (abs(c[1] - target), c[1]))[0])
    return cuts


class PairwiseVotes(DataFormat):
    """PandaLM: ``instruction``, ``input``, ``response1``, ``response2``, ``annotator1..N`` votes.

    A vote is 1 (response1 better), 2 (response2 better) or 0 (tie). The majority is a vote value given by
    more than half of the annotators (2 of 3): 1 or 2 decides the pair, e.g. votes 1,1,0 choose response1.
    A majority of 0, or no majority (e.g. 1,2,0), is a tie: skipped and counted, or with ``ties: tie`` both
    responses train under control ``tie``. The prompt is the instruction, plus a blank line and the input
    when the input is not empty. The vote columns are the ``annotatorN`` columns of the first record.
    """

    name = "pairwise_votes"
    summary = "instruction, input, response1, response2, annotator1..3"
    uses_template = True
    _VOTE_COLUMN = re.compile(r"annotator(\d+)")
    _VOTE_FIX = "votes are 0 (tie), 1 (response1 better) or 2 (response2 better)"

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self.vote_columns: list[str] | None = None

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        columns = self.vote_columns = self.vote_columns or self._find_vote_columns(rec)
        self._require(rec, "response1", "response2", *columns)
        prompt = self._finish_prompt(self._instruction(rec, raw))
        out = ParsedRecord()
        responses = {v: self._response_cell(rec, f"response{v}", out) for v in (1, 2)}
        winner = self._majority([self._vote(rec, name) for name in columns])
        if winner is None and self.cfg.ties == "skip":
            out.skipped.append("annotators tie (no majority for either response)")
        elif winner is None:
            out.warnings.extend(_EMPTY_SIDE for text in responses.values() if not text.strip())
            for text in responses.values():
                out.examples.append(ControlledExample(prompt, text, {self.preference: TIE_CONTROL}, source))
        else:
            out.add_pair(self._pair(prompt, responses[winner], responses[3 - winner], source))
        return out

    def _find_vote_columns(self, rec: Mapping[str, Any]) -> list[str]:
        found = [(int(m.group(1)), k) for k in rec if (m := self._VOTE_COLUMN.fullmatch(k))]
        if not found:
            raise _Missing(["annotator1"], self.cfg.columns)
        return [name for _, name in sorted(found)]

    def _instruction(self, rec: Mapping[str, Any], raw: Mapping[str, Any]) -> list[dict]:
        if self.cfg.prompt_template is not None:
            return self._prompt(rec, raw)
        text = self._string(rec, "instruction")
        extra = rec.get("input")
        if extra is not None and not isinstance(extra, str):
            raise self._wrong_type("input", extra, "a string")
        return [{"role": "user", "content": f"{text}\n\n{extra}" if extra and extra.strip() else text}]

    def _vote(self, rec: Mapping[str, Any], name: str) -> int:
        value = rec[name]
        number = value.strip() if isinstance(value, str) else value
        if isinstance(number, bool) or str(number) not in ("0", "1", "2", "0.0", "1.0", "2.0"):
            raise BadRow(f"vote {name} is {_short(value)}", self._VOTE_FIX)
        return int(float(number))

    @staticmethod
    def _majority(votes: list[int]) -> int | None:
        """1 or 2 when more than half of the votes say so, else ``None`` (a tie)."""
        value, count = Counter(votes).most_common(1)[0]
        return value if value != 0 and 2 * count > len(votes) else None


class Unpaired(DataFormat):
    """Unpaired labelled responses (TRL's unpaired preference, as KTO trains on): ``prompt`` / ``completion`` / ``label``.

    ``label`` true marks a desirable completion (control ``chosen_control``, ``good``), false an undesirable
    one (``rejected_control``, ``bad``): a JSON boolean, or in CSV cells ``true`` / ``false`` / ``1`` / ``0``.
    ``prompt`` is a string or a message list; ``completion`` a string or a message list ending with the
    assistant turn (its earlier turns continue the prompt). Rows only, no pairs: validation scores their loss,
    not the control classifier.
    """

    name = "unpaired"
    summary = "prompt, completion, label (true/false)"
    uses_template = True
    _LABELS = {"true": True, "1": True, "false": False, "0": False}

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        self._require(rec, *([] if self.cfg.prompt_template else ["prompt"]), "completion", "label")
        out = ParsedRecord()
        head, completion = self._reply_turns(rec, "completion", out)
        prompt = self._finish_prompt(self._prompt(rec, raw) + head)
        completion = _response(completion, "completion")
        control = self.cfg.chosen_control if self._label(rec["label"]) else self.cfg.rejected_control
        out.examples.append(ControlledExample(prompt, completion, {self.preference: control}, source))
        return out

    def _label(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        key = value.strip().lower() if isinstance(value, str) else value if isinstance(value, int) else None
        found = self._LABELS.get(str(key)) if key is not None else None
        if found is None:
            label = _field_label("label", self.cfg.columns)
            raise BadRow(
                f"field {label} is {_short(value)}, expected true or false", "write true (desirable) or false (undesirable)"
            )
        return found


@dataclass(frozen=True)
class _Reply:
    """One assistant reply with feedback, kept until the whole file is read (pairs can span rows)."""

    prompt: tuple[dict[str, str], ...]
    response: str
    kind: str  # "thumb" (value ±1) or "number"
    value: float
    source: str


_THUMBS = {
    **dict.fromkeys(("up", "thumbs_up", "thumbsup", "thumb_up", "good", "positive", "like", "liked", "+1", "👍"), 1.0),
    **dict.fromkeys(("down", "thumbs_down", "thumbsdown", "thumb_down", "bad", "negative", "dislike", "disliked", "👎"), -1.0),
}
_FEEDBACK_KEYS = ("feedback", "rating", "score")
_NO_FEEDBACK = "no feedback on any assistant turn"
_NEUTRAL = "neutral feedback (0 in a file of -1/0/1)"


class MessagesFeedback(DataFormat):
    """Chat logs in the OpenAI ``messages`` shape with feedback on assistant replies (thumbs or scores).

    A sample row (one JSON object per line)::

        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Name a prime number."},
                      {"role": "assistant", "content": "7", "feedback": "up"}]}

    Feedback sits on an assistant turn (key ``feedback``, ``rating`` or ``score``), or on the row under the
    same keys, where it belongs to the last assistant turn (``{"messages": [...], "rating": 4}``). Every
    assistant turn with feedback is one reply to the turns before it (its prompt).

    Values, decided once per file:

    * **Thumbs**: ``"up"`` / ``"down"`` (also ``thumbs_up`` / ``thumbs_down``, ``good`` / ``bad``,
      ``positive`` / ``negative``, ``like`` / ``dislike``, 👍 / 👎), JSON ``true`` / ``false``, and numbers
      when every number of the file is -1, 0 or 1: 1 is up, -1 down, 0 neutral (skipped and counted); in a
      file of only 0 and 1, 0 is down. Two different replies to the same prompt (the same turns before them,
      also across rows: a regenerated answer is often logged as a row of its own) with opposite thumbs form
      a pair, thumbs up chosen. Every reply is one training row under ``chosen_control`` (up, ``good``) or
      ``rejected_control`` (down, ``bad``), paired or not.
    * **Scores**: any other numbers (a 1-5 rating, a reward): binned as ``pointwise`` bins them
      (``score_thresholds``, or ``quantile_bins`` over the file, by default a median split into ``bad`` /
      ``good``; ``score_labels`` names the bins). Replies to the same prompt in different bins form a pair,
      the higher bin chosen, each side under its bin's label. Setting ``score_thresholds`` or
      ``quantile_bins`` reads every value as a score.

    A row with no feedback at all is skipped and counted (``no feedback on any assistant turn``); feedback
    that is neither a thumb nor a number, or on a row without an assistant turn, is a bad row. Message
    ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts.
    """

    name = "messages_feedback"
    summary = "messages with feedback/rating/score on assistant turns"
    _VALUES_FIX = "use up/down (or true/false, 1/-1) for thumbs, or a number for a score"

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self.replies: list[_Reply] = []

    @classmethod
    def detect(cls, record: Mapping[str, Any]) -> bool:
        """A ``messages`` list (feedback may be missing from the first rows: they are counted, not guessed)."""
        return isinstance(record.get("messages"), list)

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        self._require(rec, "messages")
        value = rec["messages"]
        if not isinstance(value, list):
            raise self._wrong_type("messages", value, "a list of messages")
        turns, feedback = [], []
        for i, item in enumerate(value):
            turns.append(_message(_text_parts(item), f"field 'messages'[{i}]"))
            given = _first_feedback(item) if isinstance(item, Mapping) else None
            if given is not None:
                if turns[-1]["role"] != "assistant":
                    raise BadRow(f"messages[{i}] is a {turns[-1]['role']} turn with feedback", "put feedback on assistant turns")
                feedback.append((i, self._value(given, f"messages[{i}].feedback")))
        self._row_feedback(rec, turns, feedback)
        out = ParsedRecord()
        if not feedback:
            out.skipped.append(_NO_FEEDBACK)
            return out
        for i, (kind, number) in feedback:
            prompt = self._finish_prompt(turns[:i])
            response = _response(turns[i]["content"], f"assistant reply messages[{i}] (it has feedback)")
            self.replies.append(_Reply(prompt, response, kind, number, source))
        return out

    def _row_feedback(self, rec: Mapping[str, Any], turns: list[dict], feedback: list) -> None:
        """Adds the row's own ``feedback`` / ``rating`` / ``score`` to its last assistant turn."""
        given = _first_feedback(rec)
        if given is None:
            return
        last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
        if last is None:
            raise BadRow("the row has feedback but no assistant turn", "end messages with the assistant reply it rates")
        value = self._value(given, "the row's feedback")
        own = dict(feedback).get(last)
        if own is None:
            feedback.append((last, value))
        elif own != value:
            raise BadRow("the row's feedback and its last assistant turn's feedback disagree", "keep one of them")

    def _value(self, given: Any, where: str) -> tuple[str, float]:
        if isinstance(given, bool):
            return "thumb", 1.0 if given else -1.0
        if isinstance(given, str) and given.strip().lower() in _THUMBS:
            return "thumb", _THUMBS[given.strip().lower()]
        try:
            return "number", _number(given, where)
        except BadRow:
            raise BadRow(f"{where} is {_short(given)}", self._VALUES_FIX) from None

    def finish(self) -> ParsedRecord:
        out = ParsedRecord()
        if not self.replies:
            return out
        numbers = {r.value for r in self.replies if r.kind == "number"}
        forced = self.cfg.score_thresholds is not None or self.cfg.quantile_bins is not None
        thumbs = [r for r in self.replies if r.kind == "thumb"]
        if not forced and numbers <= {-1.0, 0.0, 1.0}:
            if numbers == {0.0, 1.0}:  # a file of 0 and 1 (a label column): 0 is thumbs down, not neutral
                self.replies = [replace(r, value=-1.0) if r.value == 0 else r for r in self.replies]
            self._thumbs(out, self.replies)
        elif thumbs:
            scores = ", ".join(f"{n:g}" for n in sorted(numbers)[:3])
            why = "score_thresholds / quantile_bins read feedback as scores" if forced else f"other rows give scores ({scores}…)"
            raise DataError(
                f"{thumbs[0].source}: feedback {'up' if thumbs[0].value > 0 else 'down'} is a thumb, but {why} — "
                "give one kind of feedback per file (split it into two sources)"
            )
        else:
            self._scores(out)
        return out

    def _thumbs(self, out: ParsedRecord, replies: list[_Reply]) -> None:
        cfg = self.cfg
        for prompt, group in _by_prompt(replies):
            rated = [r for r in group if r.value != 0]
            out.skipped.extend(_NEUTRAL for r in group if r.value == 0)
            ups = _distinct(r for r in rated if r.value > 0)
            downs = _distinct(r for r in rated if r.value < 0)
            for up in ups:
                for down in downs:
                    if up.response.strip() == down.response.strip():
                        out.warnings.append("the same reply got thumbs up and down (not compared)")
                        continue
                    pair = PreferencePair(
                        prompt, up.response, down.response, self.preference, cfg.chosen_control, cfg.rejected_control, up.source
                    )
                    out.pairs.append(pair)
            for r in rated:
                control = cfg.chosen_control if r.value > 0 else cfg.rejected_control
                out.examples.append(ControlledExample(prompt, r.response, {self.preference: control}, r.source))

    def _scores(self, out: ParsedRecord) -> None:
        cuts = score_cuts(self.cfg, [r.value for r in self.replies])
        labels = score_labels(self.cfg)
        for prompt, group in _by_prompt(self.replies):
            binned = [(bisect.bisect_right(cuts, r.value), r) for r in group]
            for level, r in binned:
                out.examples.append(ControlledExample(prompt, r.response, {self.preference: labels[level]}, r.source))
            best_first = sorted(binned, key=lambda item: -item[0])
            for (high, better), (low, worse) in combinations(best_first, 2):
                if high > low and better.response.strip() != worse.response.strip():
                    pair = PreferencePair(
                        prompt, better.response, worse.response, self.preference, labels[high], labels[low], better.source
                    )
                    out.pairs.append(pair)


def _text_parts(item: Any) -> Any:
    """A message whose ``content`` is a list of ``{"type": "text", "text": ...}`` parts, as one string."""
    content = item.get("content") if isinstance(item, Mapping) else None
    if not isinstance(content, list):
        return item
    if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return item  # _message names the problem
    return {**item, "content": "\n".join(p["text"] for p in content)}


def _first_feedback(item: Mapping[str, Any]) -> Any:
    return next((item[key] for key in _FEEDBACK_KEYS if item.get(key) is not None), None)


def _by_prompt(replies: Iterable[_Reply]) -> list[tuple[tuple, list[_Reply]]]:
    """Replies grouped by their prompt (the turns before them), groups in first-seen order."""
    groups: dict[tuple, tuple[tuple, list[_Reply]]] = {}
    for r in replies:
        key = tuple((t["role"], t["content"]) for t in r.prompt)
        groups.setdefault(key, (r.prompt, []))[1].append(r)
    return list(groups.values())


def _distinct(replies: Iterable[_Reply]) -> list[_Reply]:
    """The first of each different response text (a reply logged twice is paired once)."""
    seen: dict[str, _Reply] = {}
    for r in replies:
        seen.setdefault(r.response.strip(), r)
    return list(seen.values())


class Ranked(DataFormat):
    """OpenAssistant message trees: ``prompt`` is the root message ``{text, role, replies[...]}``.

    At every prompter message, its assistant replies that have a ``rank`` (0 = best) are compared; replies
    without a rank, and deleted ones, are left out; synthetic replies are kept (their rank is a human
    judgement like any other). ``all_pairs`` pairs every two ranked siblings (lower rank chosen);
    ``best_vs_rest`` pairs the best-ranked reply with each other ranked sibling. Siblings with equal ranks
    are not compared. The prompt of a reply is the whole path from the root to its parent. Every reply that
    takes part in a pair is one example: the best-ranked one under ``chosen_control``, the others under
    ``rejected_control``. A file where no reply has a rank is an error.
    """

    name = "ranked"
    summary = "prompt message tree with replies and rank"
    _NODE_ROLES = {"prompter": "user", "user": "user", "assistant": "assistant"}
    _TREE_FIX = 'write each message as {"text": ..., "role": "prompter", "rank": 0, "replies": [...]}'

    def __init__(self, cfg: SourceConfig) -> None:
        super().__init__(cfg)
        self.saw_rank = False
        self.rows = 0

    def parse(self, rec: Mapping[str, Any], raw: Mapping[str, Any], source: str) -> ParsedRecord:
        self._require(rec, "prompt")
        self.rows += 1
        out = ParsedRecord()
        stack: list[tuple[Any, tuple, str]] = [(rec["prompt"], (), "prompt")]
        while stack:  # depth-first, iterative: trees can be deep
            node, path, at = stack.pop()
            message, replies = self._node(node, at)
            history = path + (message,)
            if message["role"] == "user":
                self._compare(replies, history, at, source, out)
            stack.extend((r, history, f"{at}.replies[{i}]") for i, r in reversed(list(enumerate(replies))))
        return out

    def _node(self, node: Any, at: str) -> tuple[dict[str, str], list]:
        if not isinstance(node, Mapping):
            raise BadRow(f"{at} is {_kind(node)}, expected a message object", self._TREE_FIX, "type")
        role, text, replies = node.get("role"), node.get("text"), node.get("replies")
        replies = [] if replies is None else replies
        if not isinstance(role, str) or role not in self._NODE_ROLES:
            reason = f"{at}.role is {_short(role)}, expected 'prompter' or 'assistant'"
            raise BadRow(reason, self._TREE_FIX, "type")
        if not isinstance(text, str):
            raise BadRow(f"{at}.text is {_kind(text)}, expected a string", self._TREE_FIX, "type")
        if not isinstance(replies, list):
            raise BadRow(f"{at}.replies is {_kind(replies)}, expected a list", self._TREE_FIX, "type")
        return {"role": self._NODE_ROLES[role], "content": text}, replies

    def _ranked_replies(self, replies: list, at: str) -> list[tuple[float, int, str]]:
        """``(rank, position, text)`` of the ranked, not deleted assistant replies, best first."""
        ranked = []
        for i, reply in enumerate(replies):
            where = f"{at}.replies[{i}]"
            message, _ = self._node(reply, where)
            if reply.get("rank") is None or message["role"] != "assistant" or reply.get("deleted") is True:
                continue
            rank = reply["rank"]
            if isinstance(rank, bool) or not isinstance(rank, (int, float)) or not math.isfinite(rank):
                reason = f"{where}.rank is {_short(rank)}, expected a number (0 = best)"
                raise BadRow(reason, self._TREE_FIX, "type")
            ranked.append((rank, i, message["content"]))
        self.saw_rank = self.saw_rank or bool(ranked)
        return sorted(ranked)

    def _compare(self, replies: list, history: tuple, at: str, source: str, out: ParsedRecord) -> None:
        ranked = self._ranked_replies(replies, at)
        if len(ranked) < 2:
            return
        prompt = self._finish_prompt(history)
        if self.cfg.pairing == "all_pairs":
            candidates: Iterable = combinations(ranked, 2)
        else:
            candidates = ((ranked[0], other) for other in ranked[1:])
        used: set[int] = set()
        for better, worse in candidates:
            if better[0] == worse[0]:
                out.warnings.append("sibling replies share a rank (not compared)")
            elif better[2].strip() == worse[2].strip():
                out.warnings.append("sibling replies are identical (not compared)")
            else:
                out.warnings.extend(_EMPTY_SIDE for text in (better[2], worse[2]) if not text.strip())
                out.pairs.append(self._pair(prompt, better[2], worse[2], source))
                used.update((better[1], worse[1]))
        best = ranked[0][0]
        for rank, position, text in ranked:
            if position in used:
                control = self.cfg.chosen_control if rank == best else self.cfg.rejected_control
                out.examples.append(ControlledExample(prompt, text, {self.preference: control}, source))

    def finish(self) -> ParsedRecord:
        if self.rows and not self.saw_rank:
            raise DataError(
                f"{self.cfg.path}: no assistant reply in {self.rows} trees has a rank — ranked data needs "
                "'rank' (0 = best) on sibling replies; for other data set --data.format"
            )
        return ParsedRecord()


# ---------------------------------------------------------------------------------------------- detection


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


# ----------------------------------------------------------------------------------------------- registry

FORMATS: dict[str, type[DataFormat]] = {}
"""Format name → parser class, every registered format (:func:`register_format`); :func:`read_source` builds
a fresh parser per source."""

_DETECTORS: list[tuple[str, Callable[[Mapping[str, Any]], bool]]] = []
"""``(name, detector)`` in the order ``auto`` tries them: the first that fits wins."""

_FORMAT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def register_format(
    name: str,
    format_class: type[DataFormat],
    detector: Callable[[Mapping[str, Any]], bool] | None = None,
    *,
    detect_first: bool = True,
    replace: bool = False,
) -> type[DataFormat]:
    """Makes ``format_class`` readable as ``--data.format NAME`` (and by ``auto`` when it has a detector).

    The library's own formats are registered with this function too, at the end of this module. Example::

        register_format("question_answers", QuestionAnswers)   # see DataFormat's example

    Args:
        name: What ``--data.format`` / ``data.format`` takes: letters, digits and ``_``, not ``auto``.
        format_class: A subclass of :class:`DataFormat`.
        detector: ``(record) -> bool``, whether ``auto`` should read a file whose first record (columns
            applied) is ``record`` with this format; default the class's own :meth:`DataFormat.detect`.
        detect_first: Try this detector before the formats registered earlier (the default: a format you add
            is more specific than the library's general ones, e.g. ``multi_response`` takes any record with a
            ``prompt`` and two text columns); ``False`` tries it after them.
        replace: Allow replacing a registered format of the same name (else a ``ValueError``).

    Returns:
        ``format_class``, so the function also works as a decorator's body.

    Raises:
        TypeError: ``format_class`` is not a :class:`DataFormat` subclass, or ``detector`` is not callable.
        ValueError: A bad name, or a name taken by another class without ``replace``.
    """
    if not (isinstance(format_class, type) and issubclass(format_class, DataFormat)):
        raise TypeError(f"register_format({name!r}, ...): {format_class!r} is not a subclass of meet_lightning.DataFormat")
    if not isinstance(name, str) or not _FORMAT_NAME.fullmatch(name) or name == "auto":
        raise ValueError(f"register_format: format name {name!r} must be letters, digits and _ (and not 'auto')")
    if detector is not None and not callable(detector):
        raise TypeError(f"register_format({name!r}, ...): detector {detector!r} is not callable")
    _add_format(name, format_class, detector or format_class.detect, detect_first, replace)
    return format_class


def _add_format(name: str, format_class: type[DataFormat], detector: Callable, detect_first: bool, replace: bool) -> None:
    existing = FORMATS.get(name)
    if existing is not None and not replace and _class_path(existing) != _class_path(format_class):
        raise ValueError(
            f"data format {name!r} is already registered ({_class_path(existing)}) — pick another name, or pass"
            " replace=True to replace it"
        )
    unregister_format(name)  # re-registering (a module imported again) replaces, never duplicates
    FORMATS[name] = format_class
    _DETECTORS.insert(0 if detect_first else len(_DETECTORS), (name, detector))


def unregister_format(name: str) -> None:
    """Removes a registered format (and its detector); a name that is not registered is ignored."""
    FORMATS.pop(name, None)
    _DETECTORS[:] = [(n, fits) for n, fits in _DETECTORS if n != name]


def format_names() -> list[str]:
    """The names ``--data.format`` takes besides ``auto`` and a class path: every registered format."""
    return list(FORMATS)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def get_format(name: str) -> type[DataFormat]:
    """The parser class of ``--data.format NAME``: a registered name, or a class path ``package.module.Class`` of
    a :class:`DataFormat` subclass (its module is imported: a recipe names it, as it names a control class).

    Raises:
        ConfigError: Unknown name, a class path that does not import, or a class that is not a DataFormat.
    """
    found = FORMATS.get(name)
    if found is not None:
        return found
    module_name, _, class_name = name.replace(":", ".").rpartition(".") if isinstance(name, str) else ("", "", "")
    if not module_name:
        close = difflib.get_close_matches(str(name), list(FORMATS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"format {name!r} is unknown{hint} — set --data.format to auto, one of {', '.join(FORMATS)}, or the class"
            " path of a format of your own (my_package.formats.MyFormat)"
        )
    try:
        found = getattr(importlib.import_module(module_name), class_name, None)
    except ImportError as err:
        raise ConfigError(
            f"format {name!r}: cannot import {module_name!r} ({err}) — check the class path and that the package is installed"
        ) from None
    if not (isinstance(found, type) and issubclass(found, DataFormat)):
        raise ConfigError(
            f"format {name!r} is not a subclass of meet_lightning.DataFormat — name a DataFormat subclass or a registered format"
        )
    _add_format(name, found, found.detect, detect_first=True, replace=True)
    return found


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


# ------------------------------------------------------------------------------------------- entry point


def _canonical(raw: Mapping[str, Any], columns: Mapping[str, str]) -> dict[str, Any]:
    """The record under canonical field names: mapped columns are renamed (their old names dropped)."""
    rec = {k: v for k, v in raw.items() if k not in columns.values()}
    for name, column in columns.items():
        rec.pop(name, None)
        if column in raw:
            rec[name] = raw[column]
    return rec


@dataclass
class _Reading:
    """State of one :func:`read_source` call."""

    cfg: SourceConfig
    result: ParsedSource
    parser: DataFormat | None = None
    origin: str = "set by --data.format"

    def start(self, rec: Mapping[str, Any], row: int) -> DataFormat:
        """Pick the parser from the config or, for ``auto``, from this first record."""
        name = self.cfg.format
        if name == "auto":
            probe = dict(rec, prompt="") if self.cfg.prompt_template and "prompt" not in rec else rec
            name = detect_format(probe, where(self.cfg.path, row))
            self.origin = f"detected from row {row}"
        parser = get_format(name)(self.cfg)
        if self.cfg.prompt_template is not None and not parser.uses_template:
            raise ConfigError(f"data source {self.cfg.path!r}: {_no_template(name)}")
        self.result.format = name
        return parser

    def explain(self, bad: BadRow, rec: Any, raw: Any) -> BadRow:
        """Name a row of another format as such, and list the keys a row with a missing field does have."""
        fmt = self.result.format
        guess = _guess_format(rec)
        if bad.kind in ("missing", "type") and self.parser is not None and guess not in (None, fmt):
            return BadRow(
                f"this row looks like format {guess}, not {fmt} ({self.origin})",
                "a file holds one format: split it into one source per format",
            )
        if isinstance(bad, _Missing) and isinstance(raw, Mapping):
            keys = _keys(raw) or "no keys"
            header = " (a CSV's first line must be its header)" if ".csv" in self.cfg.path.lower() else ""
            detail = f" for format {fmt} ({self.origin}); the row has [{keys}]{header}"
            return BadRow(bad.reason, bad.fix + self._missing_hint(bad.fields, raw), bad.kind, detail)
        return bad

    def _missing_hint(self, fields: list[str], raw: Mapping[str, Any]) -> str:
        close = difflib.get_close_matches(fields[0], [str(k) for k in raw], n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if "prompt" in fields and self.parser is not None and self.parser.uses_template:
            hint += " or build the prompt with --data.prompt_template '{column_a}\\n\\n{column_b}'"
        return hint

    def record(self, row: int, bad: BadRow) -> None:
        """Stop at a bad row, or skip and count it (``on_bad_rows: skip``)."""
        if self.cfg.on_bad_rows == "error":
            raise DataError(_one_line(f"{where(self.cfg.path, row)}: {bad}"))
        self.count(row, [bad.reason])

    def count(self, row: int, reasons: list[str]) -> None:
        for reason in reasons:
            self.result.skipped[reason] += 1
            self.result.skipped_rows.setdefault(reason, []).append(row)

    def count_out(self, out: ParsedRecord, row: int | None) -> None:
        """Count what a record (``row``) or the end of the file (``None``) skipped and warned about."""
        self.result.warnings.update(out.warnings)
        if row is not None:
            self.count(row, out.skipped)
        else:
            self.result.skipped.update(out.skipped)


def read_source(cfg: SourceConfig) -> ParsedSource:
    """Read one source into pairs and training rows.

    Args:
        cfg: The source; see :class:`SourceConfig`.

    Returns:
        The pairs, examples, and per-reason counts of skipped records and warnings.

    Raises:
        DataError: Unreadable file, or (with ``on_bad_rows: error``) the first bad record, as one line
            ``FILE:ROW: what is wrong — how to fix it``; also when nothing usable is left.
        ConfigError: An option that does not fit the format (e.g. ``prompt_template`` for ``hh_rlhf``).
    """
    return parse_records(cfg, iter_rows(cfg.path, cfg.hub))


def parse_records(cfg: SourceConfig, rows: Iterable[tuple[int, Any]]) -> ParsedSource:
    """Parse records already in memory as :func:`read_source` parses a file's (``cfg.path`` names them).

    Args:
        cfg: The source options; ``path`` only labels messages and examples.
        rows: ``(row, record)`` pairs, rows 1-based.

    Returns:
        The same as :func:`read_source`.
    """
    result = ParsedSource(path=cfg.path, format=cfg.format)
    for out in iter_parsed(cfg, rows, result):
        result.pairs.extend(out.pairs)
        result.examples.extend(out.examples)
    _check_usable(result)
    return result


def iter_parsed(cfg: SourceConfig, rows: Iterable[tuple[int, Any]], result: ParsedSource | None = None) -> Iterator[ParsedRecord]:
    """What each record gives, record by record (streaming); counts go into ``result``.

    The last item is the parser's ``finish`` (pointwise rows come only there: their labels need every score).
    Bad records raise or are counted exactly as in :func:`read_source`.
    """
    reading = _Reading(cfg, result if result is not None else ParsedSource(path=cfg.path, format=cfg.format))
    for row, value in rows:
        reading.result.rows_read += 1
        rec: Any = None
        try:
            if isinstance(value, BadRow):
                raise value
            if not isinstance(value, Mapping):
                raise BadRow(f"the record is {_kind(value)}", _NOT_OBJECT_FIX, "type")
            rec = _canonical(value, cfg.columns)
            reading.parser = reading.parser or reading.start(rec, row)
            out = reading.parser.parse(rec, value, where(cfg.path, row))
        except BadRow as bad:
            reading.record(row, reading.explain(bad, rec, value))
            continue
        reading.count_out(out, row)
        yield out
    if reading.parser is not None:
        out = reading.parser.finish()
        reading.count_out(out, None)
        yield out


def _check_usable(result: ParsedSource) -> None:
    if result.examples:
        return
    why = ", ".join(f"{reason} ×{n}" for reason, n in result.skipped.most_common(3)) or "no records"
    raise DataError(
        _one_line(
            f"{result.path}: no usable rows in {result.rows_read} records ({why}) — "
            "check --data.format and --data.columns against the file"
        )
    )


_Format = DataFormat
"""Old name of :class:`DataFormat`, kept for one release."""
_Out = ParsedRecord
"""Old name of :class:`ParsedRecord`, kept for one release."""
_BadRow = BadRow
"""Old name of :class:`BadRow`, kept for one release."""
