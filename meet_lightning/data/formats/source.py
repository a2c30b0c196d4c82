"""One source read end to end: :func:`read_source` (a file, folder or hub dataset), :func:`parse_records` (records
in memory) and :func:`iter_parsed` (record by record, for streaming).

The rows come from :mod:`~meet_lightning.data.formats.reading`; the format is the one ``format`` names, or for
``auto`` the one detected from the first record; each record is parsed, a bad one stops the read or is skipped
and counted (``on_bad_rows``), and a source that gives nothing usable is refused.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from meet_lightning.data.formats.base import DataFormat, SourceConfig, _no_template, get_format
from meet_lightning.data.formats.detection import _guess_format, detect_format
from meet_lightning.data.formats.reading import _NOT_OBJECT_FIX, iter_rows, where
from meet_lightning.data.formats.records import BadRow, ParsedRecord, _keys, _kind, _Missing, _one_line
from meet_lightning.data.rows import ParsedSource
from meet_lightning.errors import ConfigError, DataError


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
