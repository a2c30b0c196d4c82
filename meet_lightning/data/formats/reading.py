"""Files, dataset folders and hub datasets → ``(row, record)`` pairs, before any format reads them.

Local JSON, JSON Lines and CSV files (each optionally ``.gz``) are read line by line with the standard library,
so a problem names ``FILE:ROW``; parquet files, other dataset folders and hub ids go through ``datasets``
(imported only then). A record that cannot be read arrives as a
:class:`~meet_lightning.data.formats.records.BadRow` in its place; a file that cannot be read stops the read.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from meet_lightning.data.formats.records import BadRow, _kind, _one_line
from meet_lightning.errors import DataError

_TEXT_SUFFIXES = (".json", ".jsonl", ".csv")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)
_UNDECODABLE = ("undecodable bytes (not UTF-8)", "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
_NOT_OBJECT_FIX = 'write each record as a JSON object with named fields, e.g. {"prompt": ..., "chosen": ...}'


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
