"""What an output folder holds: the merged manifest joined with the lock files (``mstar status OUT``).

:func:`collect_status` asks :mod:`mstar_extract.manifest` for the merged rows (which also rewrites
``OUT/manifest.csv`` unless told not to) and :mod:`mstar_extract.locks` for the lock files; a slide that has only
a lock (being processed now, or left by a killed process) is listed as ``running`` or ``stale``. A slide whose
latest row is ``skipped`` with a reason (``taken by another process``: a run left it to another process, which has
recorded nothing for it since) is listed as ``held``: it is not done, so OUT is not complete. Each slide is
one JSON-able dict: the manifest's columns (:meth:`~mstar_extract.manifest.ManifestRow.to_json`) plus ``lock``.
The command-line layer (:mod:`mstar_extract.cli.status`) only prints a :class:`StatusReport`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mstar_extract.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE

OK_STATUSES = ("done", "skipped", "no_tissue")
"""Latest outcomes that need no further work (``skipped`` only without a reason: the outputs were complete)."""
COUNT_KEYS = ("done", "skipped", "no_tissue", "failed", "held", "running", "stale")
"""The keys of :attr:`StatusReport.counts`, in display order."""


@dataclass
class StatusReport:
    """Everything ``mstar status`` knows about an output folder."""

    out_dir: Path
    has_manifest: bool
    slides: list[dict[str, Any]] = field(default_factory=list)
    locks: list[dict[str, Any]] = field(default_factory=list)
    lock_timeout_s: float = 0.0
    expected: int | None = None

    @property
    def counts(self) -> dict[str, int]:
        c = {k: 0 for k in COUNT_KEYS}
        for s in self.slides:
            c[s["status"]] = c.get(s["status"], 0) + 1
        return c

    @property
    def n_failed(self) -> int:
        return self.counts["failed"]

    @property
    def n_held(self) -> int:
        """Slides left to another process that recorded no outcome for them: not done."""
        return self.counts["held"]

    @property
    def n_running(self) -> int:
        return sum(1 for lk in self.locks if lk["state"] == "running")

    @property
    def n_unfinished_stale(self) -> int:
        """Stale locks of slides without a done/no_tissue row: work a killed process left unfinished."""
        final = {s["slide_id"] for s in self.slides if s["status"] in ("done", "no_tissue")}
        return sum(1 for lk in self.locks if lk["state"] == "stale" and lk["slide_id"] not in final)

    @property
    def n_finished_ok(self) -> int:
        return sum(1 for s in self.slides if s["status"] in OK_STATUSES)

    @property
    def complete(self) -> bool:
        """No failure, nothing running, nothing left half-done, and (with ``expected``) enough finished slides."""
        if not self.has_manifest or self.n_failed or self.n_held or self.n_running or self.n_unfinished_stale:
            return False
        return self.expected is None or self.n_finished_ok >= self.expected

    @property
    def exit_code(self) -> int:
        if not self.has_manifest:
            return EXIT_USAGE
        return EXIT_FAILED if self.n_failed else EXIT_OK

    def summary(self) -> dict[str, Any]:
        return {
            "out": str(self.out_dir),
            "manifest": self.has_manifest,
            "total": len(self.slides),
            "counts": self.counts,
            "failed": self.n_failed,
            "held": self.n_held,
            "running": self.n_running,
            "stale_locks": sum(1 for lk in self.locks if lk["state"] == "stale"),
            "expected": self.expected,
            "complete": self.complete,
            "exit_code": self.exit_code,
        }


def _lock_states(out: Path, lock_timeout_s: float) -> dict[str, dict[str, Any]]:
    """slide_id -> the lock's facts with ``state`` (``running``/``stale``) and ``reason`` (why stale)."""
    from mstar_extract.locks import list_locks

    now = time.time()
    locks: dict[str, dict[str, Any]] = {}
    for info in list_locks(out, now):
        reason = info.stale_reason(lock_timeout_s)
        entry = info.as_dict()
        entry.update(state="stale" if reason else "running", reason=reason)
        locks[info.slide_id] = entry
    return locks


def _lock_only_slide(slide_id: str, lock: dict[str, Any]) -> dict[str, Any]:
    """A slide known only from its lock file: every manifest column null but what the lock tells."""
    from mstar_extract.manifest import ManifestRow

    slide: dict[str, Any] = {k: None for k in ManifestRow.columns()}
    slide.update(slide_id=slide_id, status=lock["state"], error=lock["reason"], host=lock["host"], pid=lock["pid"],
                 lock=lock)
    return slide


def collect_status(out_dir: str | os.PathLike[str], lock_timeout_s: float, expected: int | None = None,
                   write_manifest: bool = True) -> StatusReport:
    """Merge the manifest (rewriting ``OUT/manifest.csv`` when ``write_manifest`` and writable) and read the locks."""
    from mstar_extract.manifest import load_manifest

    out = Path(out_dir)
    rows = load_manifest(out, write=write_manifest)
    report = StatusReport(out_dir=out, has_manifest=rows is not None, lock_timeout_s=lock_timeout_s, expected=expected)
    locks = _lock_states(out, lock_timeout_s)
    report.locks = [locks[k] for k in sorted(locks)]
    for r in rows or []:
        slide = {**r.to_json(), "lock": locks.get(r.slide_id)}
        if r.status == "skipped" and r.error:  # left to another process, which recorded nothing since
            slide["status"] = "held"
        report.slides.append(slide)
    seen = {s["slide_id"] for s in report.slides}
    report.slides.extend(_lock_only_slide(sid, lk) for sid, lk in locks.items() if sid not in seen)
    report.slides.sort(key=lambda s: s["slide_id"])
    return report
