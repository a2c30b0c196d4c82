"""Names are data: one rule for preference and label names, paths that stay in their folder, exports without local paths.

Preference and label names come from the user's data (a column name, a label value, a ``scores`` key) and end up
as folder names (``export/adapters/<preference>/<label>/``), added-token text and chat-template data. One rule,
checked where the data is read (:func:`check_name`), keeps them plain: letters (any script), digits, space,
``-``, ``_`` and ``.``, no leading dot, at most :data:`MAX_NAME_LENGTH` characters. Every path written from a
name is still resolved and must stay under its folder (:func:`safe_path`), so a name that got past the rule
(an older checkpoint, a schema built in Python) cannot write elsewhere.

An export is meant to be published, so it keeps no local paths: :func:`public_value` turns a local path into its
base name (a file of this package into its package-relative name) and leaves hub ids and other text alone;
:func:`local_paths` finds what an export still holds, for ``push`` to refuse it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from meet_lightning.errors import ConfigError, DataError

MAX_NAME_LENGTH = 64
"""Longest preference or label name (a folder name and part of every added token's text)."""

NAME_RULE = f"letters, digits, space, '-', '_', '.' (not first), 1-{MAX_NAME_LENGTH} characters"
"""The rule as error messages state it."""

_PUNCTUATION = frozenset(" -_.")
_FIXES = {
    "preference": "rename the preference (--data.preference, or the key in the scores dict)",
    "label": "rename the label (the data's control column name or label value, or the recipe's label setting)",
}


def name_problem(name: Any) -> str | None:
    """What makes ``name`` unusable as a preference or label name, or ``None`` when it follows the rule."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not text"
    if not name:
        return "is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"is {len(name)} characters long"
    if name.startswith("."):
        return "starts with a dot"
    if name != name.strip():
        return "starts or ends with a space"
    for char in name:
        # Letters, combining marks and digits of any script (L*, M*, N*); everything else but the four signs is out:
        # '/' and '\\' (folders), ':' '|' '<' '>' (token text), '+' (combined adapters), quotes, braces, controls.
        if char not in _PUNCTUATION and unicodedata.category(char)[0] not in "LMN":
            return f"contains {char!r}"
    return None


def check_name(kind: str, name: Any, where: str) -> str:
    """Returns ``name`` when it follows the rule; DataError naming ``where`` and the fix otherwise.

    Args:
        kind: ``preference`` or ``label``.
        name: The name as read.
        where: Where it came from (``FILE:ROW``, a column, a flag), the start of the message.
    """
    problem = name_problem(name)
    if problem is not None:
        fix = _FIXES.get(kind, f"rename the {kind}")
        raise DataError(f"{where}: {kind} name {name!r} {problem} — {fix}; allowed: {NAME_RULE}")
    return name


def check_controls(controls: Mapping[str, Any], where: str) -> None:
    """Checks every preference and label of one row's ``{preference: label}`` (see :func:`check_name`)."""
    for preference, label in controls.items():
        check_name("preference", preference, where)
        check_name("label", label, where)


def safe_path(root: Path, *parts: str) -> Path:
    """``root / parts…`` where each part is one plain folder or file name and the result stays under ``root``.

    Raises:
        ConfigError: A part is empty, ``.``/``..``, holds a path separator, or the resolved path leaves ``root``.
    """
    for part in parts:
        if not part or part in (".", "..") or "/" in part or "\\" in part or "\x00" in part:
            raise ConfigError(
                f"{root}: the name {part!r} would not be one folder inside it — rename it in the data ({NAME_RULE}) and train again"
            )
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise ConfigError(f"{path}: resolves outside {root} — nothing written; rename it in the data ({NAME_RULE})")
    return path


# ------------------------------------------------------------------------------------------ local paths
_ABSOLUTE = re.compile(r"^(?:/(?!/)[^\s/]|~[\\/]|[A-Za-z]:[\\/]|\\\\[^\\\s])")
"""An absolute path as a whole string: ``/x…``, ``~/…``, ``C:\\…``, ``\\\\server\\…`` (``//`` is a URL's, not ours)."""

_IN_TEXT = re.compile(
    r"(?:^|(?<=[\s`'\"(\[=,]))(?:(?:/[^\s/`'\")\],]+){2,}|~[\\/][^\s`'\")\],]+|[A-Za-z]:\\[^\s`'\")\],]+)", re.M
)
"""An absolute path inside text (a model card): two components at least, so ``1/2`` and ``and/or`` are not paths."""

_PACKAGE = Path(__file__).resolve().parent


def is_absolute_path(value: str) -> bool:
    """Whether the string ``value`` is an absolute local path (POSIX, home-relative or Windows)."""
    return bool(_ABSOLUTE.match(value))


def public_value(value: str) -> str:
    """``value`` without its local folders: a local path becomes its base name, anything else stays.

    A file of this package keeps its package-relative name (``meet_lightning/demo_data/…``: the card derives
    its licence from it); a hub id (``owner/name``, not a local path) stays as it is.
    """
    local = is_absolute_path(value) or value.startswith(("./", "../", ".\\", "..\\"))
    if not local and ("/" in value or "\\" in value):
        try:
            local = Path(value).exists()
        except OSError:  # a name too long for the file system is not a local path
            local = False
    if not local:
        return value
    try:
        resolved = Path(value).expanduser().resolve()
        if resolved.is_relative_to(_PACKAGE):
            return resolved.relative_to(_PACKAGE.parent).as_posix()
    except (OSError, RuntimeError):
        pass
    windows = PureWindowsPath(value)
    return (windows.name if windows.drive or "\\" in value else PurePosixPath(value).name) or value.strip("/\\")


def without_local_paths(value: Any) -> Any:
    """``value`` (a JSON/YAML tree) with every string key and value passed through :func:`public_value`."""
    if isinstance(value, str):
        return public_value(value)
    if isinstance(value, Mapping):
        return {without_local_paths(k) if isinstance(k, str) else k: without_local_paths(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_local_paths(v) for v in value]
    return value


def local_paths(value: Any) -> Iterator[str]:
    """Every string key or value of a JSON/YAML tree that is an absolute local path."""
    if isinstance(value, str):
        if is_absolute_path(value):
            yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from local_paths(key)
            yield from local_paths(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from local_paths(item)


def local_paths_in_text(text: str) -> list[str]:
    """Absolute local paths written inside ``text`` (a model card)."""
    return _IN_TEXT.findall(text)
