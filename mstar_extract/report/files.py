"""Writing the report's files: temp name then rename, so a browser or a concurrent build never sees half a file.

Unlike the run's outputs (:mod:`mstar_extract.store.atomic`) these are not fsynced: they are derived from the
outputs and rebuilt by ``mstar report``, and one fsync per slide page would make a 10,000-slide report slow on
a network file system.
"""

from __future__ import annotations

import os
from pathlib import Path

from mstar_extract.store.atomic import temp_path_for


def write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp sibling and ``os.replace`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
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
