"""The one way the library writes a file: complete or not at all, and durable once written.

:func:`write_atomic` writes to a temp file in the target's own folder (``.NAME.PID.partial``), fsyncs it,
``os.replace``-s it over the target and fsyncs the folder: a crash at any moment leaves the old file or the new
one, never a half-written one, and nothing in the system temp folder. Checkpoints, ``controls.safetensors``,
``done.json``, the saved recipe and predictions all go through it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".partial"
"""Suffix of the temp files a killed writer can leave behind (removed by the next run of the same folder)."""


def write_atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Writes ``path`` through ``write(file)`` on a temp file in the same folder: fsync, ``os.replace``, fsync.

    The temp file is removed on an exception; after a kill, :func:`remove_stale_temp_files` removes it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        with open(tmp, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_atomic` for a text file (UTF-8)."""
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """:func:`write_atomic` for bytes already in memory (e.g. ``safetensors.torch.save``)."""
    write_atomic(path, lambda handle: handle.write(data))


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Deletes the ``*.partial`` temp files a killed writer left in ``folder``; returns them."""
    stale = sorted(Path(folder).glob(f".*{TEMP_SUFFIX}")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def fsync_folder(folder: Path) -> None:
    """Makes a rename inside ``folder`` durable (where the platform can open a folder)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
