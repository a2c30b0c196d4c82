"""Write audit for the DDP test: with ``MEET_AUDIT_ROOT`` and ``MEET_AUDIT_LOG`` set, every file this process
opens for writing, renames or removes under the root is appended to ``MEET_AUDIT_LOG.rank<LOCAL_RANK>``.

Python imports ``sitecustomize`` at start-up from ``sys.path``: the test puts ``tests/helpers`` on
``PYTHONPATH`` of the subprocess (and so of every DDP rank Lightning starts from it). Writes done outside
Python's ``open``/``os`` (safetensors' own file writes) are still seen through the ``os.replace`` that follows.
"""

import os
import sys

_ROOT = os.environ.get("MEET_AUDIT_ROOT")
_LOG = os.environ.get("MEET_AUDIT_LOG")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _paths(event, args):
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None))[:3]
        writing = (
            any(c in mode for c in "wax+") if isinstance(mode, str) else bool(isinstance(flags, int) and flags & _WRITE_FLAGS)
        )
        return [path] if writing else []
    if event in ("os.rename", "os.remove", "os.unlink", "shutil.rmtree", "shutil.move"):
        return list(args[:2]) if event in ("os.rename", "shutil.move") else [args[0]]
    return []


def _hook(event, args):
    for path in _paths(event, args):
        if isinstance(path, (str, bytes, os.PathLike)):
            text = os.fsdecode(os.fspath(path))
            if os.path.abspath(text).startswith(_ROOT):
                with open(f"{_LOG}.rank{os.environ.get('LOCAL_RANK', '0')}", "a") as log:
                    log.write(f"{event} {text}\n")


if _ROOT and _LOG:
    _ROOT = os.path.abspath(_ROOT)
    sys.addaudithook(_hook)
