"""`mstar status OUT`: merge the manifest parts of every process and summarise the folder (issues 5 and 8).

Human report on stdout (counts per status, failures with reasons, slides being processed now, stale locks);
``--json`` prints one JSON document; ``--jsonl`` prints one ``{"event": "slide", ...}`` object per slide and a
final ``{"event": "summary", ..., "complete": bool}`` so a script can decide whether to resubmit.
Exit codes: 0 no failed slide, 1 at least one failed, 2 OUT has no manifest (nothing finished there yet).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from mstar_extract.cli.common import output_options
from mstar_extract.console import Reporter
from mstar_extract.envdefaults import default_lock_timeout
from mstar_extract.errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from mstar_extract.report.layout import run_path

OK_STATUSES = ("done", "skipped", "no_tissue")
COUNT_KEYS = ("done", "skipped", "no_tissue", "failed", "running", "stale")


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
        if not self.has_manifest or self.n_failed or self.n_running or self.n_unfinished_stale:
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
            "running": self.n_running,
            "stale_locks": sum(1 for lk in self.locks if lk["state"] == "stale"),
            "expected": self.expected,
            "complete": self.complete,
            "exit_code": self.exit_code,
        }


def collect_status(
    out_dir: str | Path, lock_timeout_s: float, expected: int | None = None, write_manifest: bool = True
) -> StatusReport:
    """Merge the manifest parts (rewriting ``OUT/manifest.csv`` when writable) and read the lock files."""
    from mstar_extract.locks import list_locks
    from mstar_extract.manifest import MANIFEST_NAME, PARTS_DIR, latest_rows, merge_manifest, read_parts

    out = Path(out_dir)
    parts = out / PARTS_DIR
    has_manifest = (out / MANIFEST_NAME).is_file() or (parts.is_dir() and any(parts.glob("*.csv")))
    report = StatusReport(out_dir=out, has_manifest=has_manifest, lock_timeout_s=lock_timeout_s, expected=expected)
    rows = []
    if has_manifest:
        rows = None
        if write_manifest:
            try:
                rows = merge_manifest(out)
            except OSError:
                rows = None  # read-only folder: report without rewriting manifest.csv
        if rows is None:
            rows = latest_rows(read_parts(out))
    now = time.time()
    locks: dict[str, dict[str, Any]] = {}
    for info in list_locks(out, now):
        reason = info.stale_reason(lock_timeout_s)
        entry = info.as_dict()
        entry.update(state="stale" if reason else "running", reason=reason)
        locks[info.slide_id] = entry
    report.locks = [locks[k] for k in sorted(locks)]
    seen: set[str] = set()
    for r in rows:
        slide: dict[str, Any] = {
            "slide_id": r.slide_id, "path": r.path, "status": r.status, "n_patches": r.n_patches, "mpp": r.mpp,
            "seconds": r.seconds, "error": r.error or None, "host": r.host or None, "pid": r.pid or None,
            "finished": r.finished or None, "lock": locks.get(r.slide_id),
        }
        report.slides.append(slide)
        seen.add(r.slide_id)
    for sid, lk in locks.items():
        if sid not in seen:
            report.slides.append({
                "slide_id": sid, "path": None, "status": lk["state"], "n_patches": None, "mpp": None,
                "seconds": None, "error": lk["reason"], "host": lk["host"], "pid": lk["pid"], "finished": None,
                "lock": lk,
            })
    report.slides.sort(key=lambda s: s["slide_id"])
    return report


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _print_human(report: StatusReport, failed_only: bool) -> None:
    echo = click.echo
    failed = [s for s in report.slides if s["status"] == "failed"]
    if failed_only:
        for s in failed:
            echo(f"{s['slide_id']}\t{s['error'] or ''}")
        return
    c = report.counts
    echo(f"{report.out_dir}: {len(report.slides)} slides")
    for k in COUNT_KEYS:
        if c.get(k) or k in ("done", "failed"):
            echo(f"  {k:<10} {c.get(k, 0):>7}")
    running = [lk for lk in report.locks if lk["state"] == "running"]
    stale = [lk for lk in report.locks if lk["state"] == "stale"]
    if running:
        echo(f"running now ({len(running)}):")
        for lk in running:
            echo(f"  {lk['slide_id']}  host {lk['host']} pid {lk['pid']}  for {_age(lk['age_s'])}")
    if stale:
        echo(f"stale locks ({len(stale)}; the next run takes them over):")
        for lk in stale:
            echo(f"  {lk['slide_id']}  host {lk['host']} pid {lk['pid']}: {lk['reason']}")
    if failed:
        echo(f"failed ({len(failed)}):")
        for s in failed:
            echo(f"  {s['slide_id']}: {s['error'] or '(no reason recorded)'}")
    if report.expected is not None:
        echo(f"finished {report.n_finished_ok} of {report.expected} expected slides")
    page = run_path(report.out_dir, "report")  # OUT/report.html (mstar report)
    echo(f"report: {page}" + ("" if page.is_file() else " (not written yet: mstar report OUT)"))
    echo("complete" if report.complete else "not complete")


@click.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (summary, slides, locks).")
@click.option("--failed", "failed_only", is_flag=True, help="Only the failed slides (human: 'slide_id<TAB>reason').")
@click.option(
    "--expect", type=click.IntRange(min=0), default=None, metavar="N",
    help="Number of slides the run should have; 'complete' also needs N finished slides.",
)
@click.option(
    "--lock-timeout", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
    help="Age after which a lock counts as stale [default: $MSTAR_LOCK_TIMEOUT or 600].",
)
@click.option("--no-write", is_flag=True, help="Do not rewrite OUT/manifest.csv (read only).")
@output_options()
def status(
    out: Path, as_json: bool, failed_only: bool, expect: int | None, lock_timeout: float | None, no_write: bool,
    reporter: Reporter,
) -> int:
    """Summarise OUT: merge the manifests of all processes, count slides per status, list failures and locks.

    \b
    Exit codes: 0 no failed slide, 1 some slide failed, 2 OUT has no manifest yet.
    Scripts: 'mstar status OUT --jsonl | tail -n 1' is a summary object with "complete": true/false.
    """
    if not out.is_dir():
        reporter.error(f"{out}: no such folder")
        return EXIT_USAGE
    report = collect_status(out, default_lock_timeout(lock_timeout), expect, write_manifest=not no_write)
    slides = [s for s in report.slides if s["status"] == "failed"] if failed_only else report.slides
    if reporter.jsonl:
        for s in slides:
            reporter.event("slide", **s)
        reporter.event("summary", **report.summary())
    elif as_json:
        doc = {"summary": report.summary(), "slides": slides, "locks": report.locks}
        click.echo(json.dumps(doc, indent=2))
    elif report.has_manifest or report.locks:
        _print_human(report, failed_only)
    if not report.has_manifest:
        reporter.error(f"{out}: no manifest (no slide has finished there yet)")
    return report.exit_code
