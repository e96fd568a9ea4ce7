"""`mstar status OUT`: print what :func:`mstar_extract.status.collect_status` finds in an output folder.

Human report on stdout (counts per status, failures with reasons, slides held by other processes, slides being
processed now, stale locks); ``--json`` prints one JSON document; ``--jsonl`` prints one ``{"event": "slide",
...}`` object per slide and a final ``{"event": "summary", ..., "complete": bool}`` so a script can decide
whether to resubmit. A closed stdout (``| head``) ends the printing quietly, with the same exit code.
Exit codes: 0 no failed slide, 1 at least one failed, 2 OUT has no manifest (nothing finished there yet).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from mstar_extract.cli.common import output_options
from mstar_extract.console import Reporter
from mstar_extract.envdefaults import default_lock_timeout
from mstar_extract.errors import EXIT_USAGE
from mstar_extract.report.layout import run_path
from mstar_extract.status import COUNT_KEYS, StatusReport, collect_status


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _print_human(report: StatusReport, failed_only: bool, reporter: Reporter) -> None:
    def echo(line: str) -> None:
        reporter.write_stdout(line + "\n")

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
    held = [s for s in report.slides if s["status"] == "held"]
    if held:
        echo(f"held ({len(held)}; left to another process that has recorded nothing for them since: not done):")
        for s in held:
            lock = s.get("lock")
            now = f"  (still locked by host {lock['host']} pid {lock['pid']})" if lock else ""
            echo(f"  {s['slide_id']}{now}")
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
    reporter.note_closed_stdout = False  # `mstar status OUT --jsonl | head` cuts a report, not a run
    report = collect_status(out, default_lock_timeout(lock_timeout), expect, write_manifest=not no_write)
    slides = [s for s in report.slides if s["status"] == "failed"] if failed_only else report.slides
    if reporter.jsonl:
        for s in slides:
            reporter.event("slide", **s)
        reporter.event("summary", **report.summary())
    elif as_json:
        doc = {"summary": report.summary(), "slides": slides, "locks": report.locks}
        reporter.write_stdout(json.dumps(doc, indent=2) + "\n")
    elif report.has_manifest or report.locks:
        _print_human(report, failed_only, reporter)
    if not report.has_manifest:
        reporter.error(f"{out}: no manifest (no slide has finished there yet)")
    return report.exit_code
