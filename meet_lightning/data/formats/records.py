"""What one record gives, and what makes it unusable: :class:`ParsedRecord` and :class:`BadRow`.

Also the helpers every format reads a record's parts with (chat turns, responses, scores) and the short
descriptions of a value (its JSON kind, a shortened repr) that messages use. A :class:`BadRow` names what is
wrong without the row; :mod:`~meet_lightning.data.formats.source` adds ``FILE:ROW``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meet_lightning.data.rows import ControlledExample, PreferencePair
from meet_lightning.errors import DataError

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
