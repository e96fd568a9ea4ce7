"""`mstar status OUT`: merges concurrent manifest parts, shows locks, JSONL for scripts, exit codes 0/1/2."""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

from mstar_extract.locks import lock_path
from mstar_extract.manifest import ManifestRow, ManifestWriter
from mstar_extract.testing.cli import run_mstar

SPAWN = mp.get_context("spawn")


def _writer(out: str, ids: list[str], failed: list[str], start: mp.synchronize.Event) -> None:
    """One extraction process appending rows to its own part file."""
    start.wait(60)
    w = ManifestWriter(out)
    for sid in ids:
        status = "failed" if sid in failed else "done"
        w.add(ManifestRow(sid, f"/slides/{sid}.svs", status, n_patches=None if sid in failed else 7,
                          error=f"{sid}.svs: corrupt tile at (512, 0)" if sid in failed else ""))


def _mstar(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run this checkout's ``mstar`` command as a real subprocess."""
    return run_mstar(*args, env={**os.environ, **(env or {})}, timeout=120)


def _jsonl(stdout: str) -> list[dict]:
    lines = stdout.splitlines()
    assert lines, "no output"
    return [json.loads(line) for line in lines]  # every stdout line is one JSON object


def _concurrent_parts(out: Path, failed: list[str]) -> None:
    ids_a = [f"a{i:02d}" for i in range(8)] + ["shared"]
    ids_b = [f"b{i:02d}" for i in range(8)] + ["shared"]
    start = SPAWN.Event()
    procs = [SPAWN.Process(target=_writer, args=(str(out), ids, failed, start)) for ids in (ids_a, ids_b)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


def test_status_merges_concurrent_parts_jsonl(tmp_path: Path) -> None:
    _concurrent_parts(tmp_path, failed=["b03"])
    assert len(list((tmp_path / ".manifest").glob("*.csv"))) == 2
    res = _mstar("status", str(tmp_path), "--jsonl")
    assert res.returncode == 1, res.stderr  # one slide failed
    events = _jsonl(res.stdout)
    slides = [e for e in events if e["event"] == "slide"]
    summary = events[-1]
    assert summary["event"] == "summary" and [e["event"] for e in events].count("summary") == 1
    ids = [s["slide_id"] for s in slides]
    assert len(ids) == len(set(ids)) == 17  # 8 + 8 + "shared" once
    assert summary["counts"]["done"] == 16 and summary["counts"]["failed"] == 1
    assert summary["complete"] is False and summary["exit_code"] == 1
    failed = [s for s in slides if s["status"] == "failed"]
    assert failed[0]["slide_id"] == "b03" and "corrupt tile" in failed[0]["error"]
    # manifest.csv is rewritten with the merged rows
    with open(tmp_path / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["slide_id"] for r in rows) == sorted(ids)


def test_status_human_and_failed_only(tmp_path: Path) -> None:
    _concurrent_parts(tmp_path, failed=["a01", "b05"])
    res = _mstar("status", str(tmp_path))
    assert res.returncode == 1
    assert "failed" in res.stdout and "a01: a01.svs: corrupt tile at (512, 0)" in res.stdout
    assert "not complete" in res.stdout
    res = _mstar("status", str(tmp_path), "--failed")
    assert [line.split("\t")[0] for line in res.stdout.splitlines()] == ["a01", "b05"]
    res = _mstar("status", str(tmp_path), "--json")
    doc = json.loads(res.stdout)
    assert doc["summary"]["failed"] == 2 and len(doc["slides"]) == 17


def test_skipped_never_hides_done_and_complete_with_expect(tmp_path: Path) -> None:
    w = ManifestWriter(tmp_path)
    w.add(ManifestRow("s1", "/x/s1.svs", "done", n_patches=3))
    w.add(ManifestRow("s2", "/x/s2.svs", "no_tissue", n_patches=0))
    later = ManifestWriter(tmp_path)  # a second run that found s1 complete
    later.add(ManifestRow("s1", "/x/s1.svs", "skipped", finished=time.time() + 5))
    res = _mstar("status", str(tmp_path), "--jsonl")
    assert res.returncode == 0
    events = _jsonl(res.stdout)
    by_id = {e["slide_id"]: e for e in events if e["event"] == "slide"}
    assert by_id["s1"]["status"] == "done" and by_id["s2"]["status"] == "no_tissue"
    assert events[-1]["complete"] is True
    res = _mstar("status", str(tmp_path), "--jsonl", "--expect", "3")  # a third slide never ran
    assert res.returncode == 0 and _jsonl(res.stdout)[-1]["complete"] is False


def test_status_shows_running_and_stale_locks(tmp_path: Path) -> None:
    ManifestWriter(tmp_path).add(ManifestRow("finished", "/x/f.svs", "done", n_patches=1))
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys,time\nfrom mstar_extract.locks import try_acquire\n"
         "l = try_acquire(sys.argv[1], 'busy')\nprint('held', flush=True)\ntime.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        stale = lock_path(tmp_path, "crashed")
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_text(json.dumps({"slide_id": "crashed", "host": "node-gone", "pid": 99, "token": "t"}))
        os.utime(stale, (time.time() - 7200,) * 2)
        res = _mstar("status", str(tmp_path), "--jsonl", "--lock-timeout", "600")
        assert res.returncode == 0
        events = _jsonl(res.stdout)
        by_id = {e["slide_id"]: e for e in events if e["event"] == "slide"}
        assert by_id["busy"]["status"] == "running" and by_id["busy"]["lock"]["pid"] == holder.pid
        assert by_id["crashed"]["status"] == "stale" and by_id["crashed"]["lock"]["host"] == "node-gone"
        assert events[-1]["running"] == 1 and events[-1]["stale_locks"] == 1
        assert events[-1]["complete"] is False  # work is in progress / was left half-done
        human = _mstar("status", str(tmp_path)).stdout
        assert f"pid {holder.pid}" in human and "stale locks" in human and "node-gone" in human
    finally:
        holder.kill()
        holder.wait()


def test_status_exit_2_without_manifest(tmp_path: Path) -> None:
    res = _mstar("status", str(tmp_path), "--jsonl")
    assert res.returncode == 2 and "no manifest" in res.stderr
    assert _jsonl(res.stdout)[-1]["manifest"] is False
    res = _mstar("status", str(tmp_path / "missing"))
    assert res.returncode == 2 and "no such folder" in res.stderr and res.stdout == ""


def test_status_no_write_leaves_folder_untouched(tmp_path: Path) -> None:
    ManifestWriter(tmp_path).add(ManifestRow("s", "/x/s.svs", "done", n_patches=1))
    res = _mstar("status", str(tmp_path), "--no-write", "--jsonl")
    assert res.returncode == 0 and not (tmp_path / "manifest.csv").exists()
