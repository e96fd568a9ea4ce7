"""One report writer at a time per output folder: ``report_assets/.lock`` created with ``O_EXCL``.

Several jobs sharing OUT (a Slurm array, torchrun ranks) each write the report when they finish; a job that
finds the lock held by a live writer skips its report (the writer's report, or the next one, includes its
slides). A lock whose file was not touched for :data:`STALE_S` seconds, or whose writer on this host is gone,
is taken over; the writer touches it while it works.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mstar_extract.errors import MstarError
from mstar_extract.report.layout import run_path

STALE_S = 600.0
TOUCH_S = 20.0


class ReportBusy(MstarError):
    """Another live process is writing this folder's report."""


class ReportLock:
    """The held lock; :meth:`touch` keeps it fresh during a long build."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._touched = time.monotonic()

    def touch(self) -> None:
        if time.monotonic() - self._touched >= TOUCH_S:
            self._touched = time.monotonic()
            try:
                os.utime(self.path)
            except OSError:
                pass


def _stale(path: Path) -> str | None:
    """Why the existing lock is stale, or None when its writer looks alive."""
    from mstar_extract.locks import hostname, pid_alive

    try:
        age = time.time() - path.stat().st_mtime
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return "unreadable lock"
    if age > STALE_S:
        return f"not touched for {age:.0f} s"
    if info.get("host") == hostname() and info.get("pid") and not pid_alive(int(info["pid"])):
        return "its process is gone"
    return None


def _describe(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
        return f"host {info.get('host')} pid {info.get('pid')}"
    except (OSError, ValueError):
        return "another process"


@contextmanager
def report_lock(out_dir: Path) -> Iterator[ReportLock]:
    """Hold the folder's report lock for the block; :class:`ReportBusy` when a live writer holds it."""
    from mstar_extract.locks import hostname

    path = run_path(out_dir, "lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            if _stale(path) is None:
                raise ReportBusy(f"{out_dir}: the report is being written by {_describe(path)}; "
                                 f"run 'mstar report {out_dir}' when it is done") from None
            aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{time.time_ns()}")
            try:
                os.rename(path, aside)  # only one taker's rename succeeds
                os.unlink(aside)
            except OSError:
                pass
    else:
        raise ReportBusy(f"{out_dir}: could not take the report lock {path}")
    try:
        os.write(fd, json.dumps({"host": hostname(), "pid": os.getpid(), "start": time.time()}).encode())
    finally:
        os.close(fd)
    try:
        yield ReportLock(path)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
