"""Atomic file creation: write under a temporary name in the same folder, fsync, rename into place.

A reader never sees a half-written file, and a process killed at any moment leaves either the old complete
file or the new complete file, plus at worst a temp file that :func:`clean_stale_temps` removes.
Temp names look like ``.<final name>.<host>.<pid>.<random>.tmp`` (hidden, and never matching ``*.h5``).

A full, over-quota or read-only file system is not a problem of one file but of the whole output folder:
:func:`disk_problem` recognises it (ENOSPC, EDQUOT, EROFS, also inside HDF5's messages) so that the pipeline can
stop the run with one line instead of failing every slide. HDF5 files are built in memory and written with
plain writes (:func:`atomic_hdf5`): HDF5 never meets a failing write, which otherwise leaves files it can neither
flush nor close (tracebacks at garbage collection, then a segmentation fault at exit).
"""

from __future__ import annotations

import errno
import io
import os
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"

DISK_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
}
"""Errors of a write that no other slide can escape: the folder's whole file system refuses writes."""
_HDF5_ERRNO = ("errno = {}", "error message = '{}'")


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
                os.fsync(fh.fileno())  # a full disk may only tell here (delayed allocation, NFS)
        os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass  # never created, or the file system refuses even that (read-only)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, str(tmp)):
            # name the file the user asked for, not its temp: "cannot write OUT/features/x.h5: ..."
            raise OSError(exc.errno, exc.strerror, os.fspath(final)) from exc
        raise


def write_bytes_atomic(final: str | os.PathLike[str], data: bytes | memoryview) -> None:
    with atomic_path(final) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


@contextmanager
def atomic_buffer(final: str | os.PathLike[str]) -> Iterator[io.BytesIO]:
    """Yield an in-memory binary file; on normal exit write its bytes to ``final`` atomically (on error nothing
    is written). ``h5py.File`` accepts it in place of a path::

        with atomic_buffer(out / "x.h5") as buf:
            with h5py.File(buf, "w") as f:
                f.create_dataset("coords", data=xy)

    The HDF5 file is the same byte for byte as one written in place, but HDF5 never writes to the disk itself:
    a full or read-only disk is one plain ``OSError`` (ENOSPC/EDQUOT/EROFS) from ``write`` (see the module
    docstring). Costs one in-memory copy of the file while it is written.
    """
    buf = io.BytesIO()
    yield buf
    write_bytes_atomic(final, buf.getbuffer())


@contextmanager
def atomic_hdf5(final: str | os.PathLike[str]) -> Iterator[Any]:
    """:func:`atomic_buffer` holding a new ``h5py.File`` (yielded, open for writing; closed before the write)."""
    import h5py

    with atomic_buffer(final) as buf:
        with h5py.File(buf, "w") as f:
            yield f


def _errno_of(exc: BaseException) -> int | None:
    """The errno of a disk error in ``exc``: an ``OSError``'s, or the one HDF5 names in its message."""
    code = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and code in DISK_ERRNOS:
        return int(code)
    text = str(exc)
    for code in DISK_ERRNOS:
        if _HDF5_ERRNO[0].format(code) in text or _HDF5_ERRNO[1].format(os.strerror(code)) in text:
            return code
    return None


def _filename_of(exc: BaseException) -> str | None:
    name = getattr(exc, "filename", None)
    if name:
        return os.fspath(name)
    text = str(exc)
    start = text.find("filename = '")
    if start >= 0:
        start += len("filename = '")
        end = text.find("'", start)
        return text[start:end] if end > start else None
    return None


def disk_problem(exc: BaseException) -> str | None:
    """One line when ``exc`` (or an exception it was raised from) is a write refused by the whole file system
    (no space left, quota exceeded, read-only); None for anything else.

    >>> disk_problem(OSError(errno.ENOSPC, "No space left on device", "/out/features/a.h5"))
    'cannot write /out/features/a.h5: no space left on the device'
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        code = _errno_of(cur)
        if code is not None:
            where = _filename_of(cur)
            return f"cannot write {where}: {DISK_ERRNOS[code]}" if where else f"cannot write: {DISK_ERRNOS[code]}"
        cur = cur.__cause__ or cur.__context__
    return None


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
