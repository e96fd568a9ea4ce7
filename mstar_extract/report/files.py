"""Writing the report's files: temp name then rename, so a browser or a concurrent build never sees half a file.

Unlike the run's outputs (:mod:`mstar_extract.store.atomic`) these are not fsynced: they are derived from the
outputs and rebuilt by ``mstar report``, and one fsync per slide page would make a 10,000-slide report slow on
a network file system.
"""

from __future__ import annotations

import os
from pathlib import Path

from mstar_extract.store.atomic import temp_path_for

_made: set[Path] = set()
"""Folders this process has created (or found), so a 10,000-page build does not ask 10,000 times."""


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp sibling and ``os.replace`` (parents created)."""
    if path.parent not in _made:
        path.parent.mkdir(parents=True, exist_ok=True)
        _made.add(path.parent)
    tmp = temp_path_for(path)
    try:
        try:
            tmp.write_bytes(data)
        except FileNotFoundError:  # the folder was removed since this process made it
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` unless ``path`` already holds exactly it; True when written."""
    try:
        if path.stat().st_size == len(data) and path.read_bytes() == data:
            return False
    except OSError:
        pass
    write_bytes(path, data)
    return True
