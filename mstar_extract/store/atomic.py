"""Atomic file creation: write under a temporary name in the same folder, fsync, rename into place.

A reader never sees a half-written file, and a process killed at any moment leaves either the old complete
file or the new complete file, plus at worst a temp file that :func:`clean_stale_temps` removes.
Temp names look like ``.<final name>.<host>.<pid>.<random>.tmp`` (hidden, and never matching ``*.h5``).
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".tmp"


def temp_path_for(final: Path) -> Path:
    """A unique temporary sibling of ``final`` (same folder, so the rename is atomic)."""
    host = socket.gethostname().split(".")[0] or "host"
    return final.with_name(f".{final.name}.{host}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (best effort; some file systems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path to write; on normal exit fsync it and rename it to ``final``; on error delete it.

    >>> with atomic_path(out / "x.h5") as tmp:
    ...     write_hdf5(tmp)
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(final)
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise


def write_bytes_atomic(final: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(final: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(final, text.encode("utf-8"))


def clean_stale_temps(folder: str | os.PathLike[str], older_than_s: float = 600.0) -> list[Path]:
    """Remove temp files left by killed runs in ``folder`` (recursively).

    A temp file of a process that is still alive on this host is kept; one of a dead process on this host,
    or of another host and not modified for ``older_than_s`` seconds (default 600, the lock timeout: another
    node may still be writing it), is removed. Returns the removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host = socket.gethostname().split(".")[0] or "host"
    removed: list[Path] = []
    now = time.time()
    for p in folder.rglob(f".*{TMP_SUFFIX}"):
        parts = p.name[:-len(TMP_SUFFIX)].rsplit(".", 3)
        if len(parts) != 4 or not parts[2].isdigit() or len(parts[3]) != 8:
            continue  # not one of ours (``.<name>.<host>.<pid>.<8 hex>.tmp``): never touch foreign files
        alive = False
        if parts[1] == host:
            try:
                pid = int(parts[2])
                os.kill(pid, 0)
                alive = True
            except (ValueError, ProcessLookupError):
                alive = False
            except PermissionError:
                alive = True
        else:
            try:
                alive = now - p.stat().st_mtime < older_than_s
            except FileNotFoundError:
                continue
        if not alive:
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed
