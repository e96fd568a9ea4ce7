"""A slide whose lock cannot be had is never reported as done (issue 12, item 4), with real ``mstar tile`` runs:

* an empty lock (what a full disk left while an older version created it) is taken over once a few seconds old,
  and a fresh one makes the run end with exit code 4, not 0;
* the disk filling while a run creates a slide's lock leaves no lock, and the rerun does the slide;
* a slide held by another live process: the run waits for it (at most the lock timeout), exits 0 when the holder
  finished it, 4 when it is still not done; ``mstar status`` counts it ``held`` and OUT not complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mstar_extract.locks import hostname, lock_path, try_acquire
from mstar_extract.testing.cli import run_mstar, start_mstar
from mstar_extract.testing.fixtures import make_island_slides

FINAL = ("done", "skipped", "no_tissue", "failed")
EXIT_INCOMPLETE = 4


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MSTAR_", "SLURM_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", **extra}


def tile(*args: str | Path, **kw) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    return run_mstar("tile", *args, "--workers", "1", "--no-qc", "--no-report", "--jsonl", env=_env(), timeout=600,
                     **kw)


def finals(stdout: str) -> dict[str, dict]:
    return {e["slide_id"]: e for e in map(json.loads, stdout.splitlines()) if e["event"] in FINAL}


def summary(stdout: str) -> dict:
    last = json.loads(stdout.splitlines()[-1])
    assert last["event"] == "summary"
    return last


def status(out: Path) -> tuple[dict[str, dict], dict]:
    r = run_mstar("status", out, "--jsonl", env=_env(), timeout=120)
    events = [json.loads(line) for line in r.stdout.splitlines()]
    return {e["slide_id"]: e for e in events if e["event"] == "slide"}, events[-1]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_island_slides(tmp_path_factory.mktemp("held_slides"), ["p0", "p1", "p2"], seed=40)


def _empty_lock(out: Path, slide_id: str, age_s: float) -> Path:
    p = lock_path(out, slide_id)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def test_an_empty_lock_never_hides_a_slide(slides: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    old = _empty_lock(out, "p1", age_s=30)  # what a full disk left behind, well within --lock-timeout
    r = tile(slides["p0"], slides["p1"], out)
    assert r.returncode == 0, r.stderr
    assert {k: v["status"] for k, v in finals(r.stdout).items()} == {"p0": "done", "p1": "done"}
    assert (out / "coords" / "p1.h5").is_file() and not old.exists()
    assert "taking over the lock of slide p1" in r.stderr and "cannot be read" in r.stderr

    young = _empty_lock(out, "p2", age_s=0)  # as if an older version were writing it right now
    r = tile(slides["p2"], out)
    assert r.returncode == EXIT_INCOMPLETE, r.stderr  # not 0: p2 has no coordinates
    assert finals(r.stdout)["p2"]["status"] == "skipped"
    assert summary(r.stdout)["unfinished"] == ["p2"] and summary(r.stdout)["exit_code"] == EXIT_INCOMPLETE
    assert not (out / "coords" / "p2.h5").exists()
    assert "held by other processes are not done: p2" in r.stderr
    by_id, st = status(out)
    assert by_id["p2"]["status"] == "held" and st["complete"] is False and st["counts"]["held"] == 1
    assert young.exists()  # its age decides: a rerun now (> 5 s later) takes it over
    r = tile(slides["p2"], out)
    assert r.returncode == 0 and finals(r.stdout)["p2"]["status"] == "done", r.stderr
    by_id, st = status(out)
    assert by_id["p2"]["status"] == "done" and st["complete"] is True


def _lock_bytes_upper_bound(slide_id: str, cmd: list[str]) -> int:
    """The largest content a lock of ``slide_id`` made by ``cmd`` can have (mstar_extract.locks._content)."""
    return len(json.dumps({"slide_id": slide_id, "host": hostname(), "pid": 9_999_999, "start": 1767000000.1234567,
                           "cmd": " ".join(cmd), "token": "f" * 32, "proc_start": 9_999_999_999}))


def test_a_full_disk_while_a_slide_lock_is_made_leaves_nothing_that_hides_it(slides: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    """The disk fills while the run creates a slide's lock. A real file-size limit (RLIMIT_FSIZE: writes past it
    fail as on a full disk) lets the settings record's lock be written but not the longer lock of a slide with a
    200-character id: the run stops with exit code 3 and leaves no lock; the rerun does the slide."""
    import resource

    out = tmp_path / "out"
    assert tile(slides["p0"], out).returncode == 0  # OUT and its settings record exist
    long_id = "L" * 200
    listing = tmp_path / "list.csv"
    listing.write_text(f"slide_id,path\n{long_id},{slides['p1']}\n")
    cmd = [sys.executable, "-m", "mstar_extract", "tile", str(listing), str(out), "--workers", "1", "--no-qc",
           "--no-report", "--jsonl"]
    main = str(Path(sys.modules["mstar_extract"].__file__).parent / "__main__.py")  # type: ignore[arg-type]
    limit = _lock_bytes_upper_bound("settings record", [main, *cmd[3:]]) + 16
    assert len(long_id) > 16 + 40

    def full_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, preexec_fn=full_disk,
                       env={**_env(), "PYTHONPATH": str(Path(main).parent.parent)})
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    assert "cannot create the lock file" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in (out / ".locks").iterdir()) == []
    assert not (out / ".mstar_settings.json.lock").exists()

    again = tile(listing, out)
    assert again.returncode == 0, again.stderr
    assert finals(again.stdout)[long_id]["status"] == "done"
    assert (out / "coords" / f"{long_id}.h5").is_file()


_HOLDER = (
    "import sys, time\n"
    "from mstar_extract.locks import try_acquire\n"
    "lock = try_acquire(sys.argv[1], sys.argv[2], heartbeat_s=0.2)\n"
    "assert lock is not None\n"
    "print('held', flush=True)\n"
    "time.sleep(600)\n"
)


def test_a_slide_held_by_a_live_process_is_not_reported_done(slides: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out), "p1"], stdout=subprocess.PIPE, text=True,
                              env=_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        r = tile(slides["p0"], slides["p1"], out, "--lock-timeout", "3")
        waited = time.monotonic() - t0
        assert r.returncode == EXIT_INCOMPLETE, r.stderr
        final = finals(r.stdout)
        assert final["p0"]["status"] == "done"
        assert final["p1"]["status"] == "skipped" and final["p1"]["error"] == "taken by another process"
        s = summary(r.stdout)
        assert s["unfinished"] == ["p1"] and s["counts"]["skipped"] == 1
        assert "waiting for 1 slide(s) held by other processes" in r.stderr and waited >= 3
        by_id, st = status(out)
        assert by_id["p1"]["status"] == "held" and by_id["p1"]["lock"]["pid"] == holder.pid
        assert st["held"] == 1 and st["complete"] is False
    finally:
        holder.kill()
        holder.wait()
    r = tile(slides["p0"], slides["p1"], out)  # the holder died: its lock is taken over at once (same host)
    assert r.returncode == 0, r.stderr
    assert {k: v["status"] for k, v in finals(r.stdout).items()} == {"p0": "skipped", "p1": "done"}
    assert status(out)[1]["complete"] is True


def test_the_run_waits_for_a_held_slide_that_its_holder_finishes(slides: dict[str, Path], tmp_path: Path) -> None:
    """Two processes on one list: the one that reaches the end first waits for the other's slide, then exits 0."""
    from mstar_extract.inputs import SlideEntry
    from mstar_extract.manifest import ManifestWriter
    from mstar_extract.pipeline.tile_job import TileSettings, tile_slide

    out = tmp_path / "out"
    lock = try_acquire(out, "p1", heartbeat_s=0.2)  # this test process is the other job, working on p1
    assert lock is not None
    run = start_mstar("tile", slides["p0"], slides["p1"], out, "--workers", "1", "--no-qc", "--no-report",
                      "--jsonl", "--lock-timeout", "120", env=_env())
    try:
        assert run.stdout is not None
        for line in run.stdout:  # until the run has met the held slide
            event = json.loads(line)
            if event["slide_id"] == "p1" if "slide_id" in event else False:
                assert event["event"] == "skipped"
                break
        outcome = tile_slide(SlideEntry("p1", slides["p1"]), out, TileSettings(qc=False))
        assert outcome.status == "done"
        ManifestWriter(out).add(outcome.to_row())  # as the runner records it, before the lock goes
        lock.release()
        rest, err = run.communicate(timeout=300)
    finally:
        lock.release()
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, err
    assert json.loads(rest.splitlines()[-1])["unfinished"] == []
    assert "waiting for 1 slide(s) held by other processes" in err
    assert status(out)[1]["complete"] is True


def test_several_processes_give_the_worst_exit_code() -> None:
    """`--devices`: one exit code for the device processes (a whole-run error, then a failure, then slides left to
    other jobs; a process killed by a signal counts as failed)."""
    from mstar_extract.errors import worst_exit_code

    assert worst_exit_code([0, 0]) == 0
    assert worst_exit_code([0, EXIT_INCOMPLETE]) == EXIT_INCOMPLETE
    assert worst_exit_code([EXIT_INCOMPLETE, 1, 0]) == 1
    assert worst_exit_code([1, 3, EXIT_INCOMPLETE]) == 3
    assert worst_exit_code([0, -9]) == 1 and worst_exit_code([None, 0]) == 1
