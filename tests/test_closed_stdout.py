"""A closed stdout never loses work (issue 12, item 8), with real pipes closed by their reader.

``mstar extract slides/ out/ --jsonl | head -1`` used to print ``error: unexpected BrokenPipeError``, exit 1 and
write no bag. Now the events stop, one line on stderr says so, every slide finishes and the exit code is the
normal one; ``mstar info --json`` and ``mstar status --jsonl`` end quietly; and Python's flush of stdout at exit
never prints "Exception ignored ... BrokenPipeError".
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from mstar_extract.store.bags import validate_bag
from mstar_extract.testing.cli import run_mstar, start_mstar
from mstar_extract.testing.fixtures import make_island_slides

TINY = "timm:test_vit"
IDS = ["c0", "c1", "c2"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MSTAR_", "SLURM_"))}
    return {**env, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pipe_closed")
    make_island_slides(d, IDS, seed=70)
    return d


def _clean(stderr: str) -> None:
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert "unexpected" not in stderr, stderr


def test_extract_piped_into_head_finishes_every_slide(slides: Path, tmp_path: Path) -> None:
    """The issue's own command line, `mstar extract slides/ out/ --jsonl | head -1`: the run's stdout is a real
    pipe into a real `head -1`, as a shell sets it up."""
    out = tmp_path / "out"
    err = tmp_path / "stderr.txt"
    read_end, write_end = os.pipe()
    head = subprocess.Popen(["head", "-1"], stdin=read_end, stdout=subprocess.PIPE, text=True)
    os.close(read_end)
    with open(err, "w") as err_fh:
        proc = start_mstar("extract", slides, out, "--jsonl", "--model", TINY, "--weights", "random", "--device",
                           "cpu", "--workers", "1", "--no-report", env=_env(), stdout=write_end, stderr=err_fh)
        os.close(write_end)  # only the run and head hold the pipe now
        code = proc.wait(900)
    first = head.communicate(timeout=60)[0].splitlines()
    assert len(first) == 1 and json.loads(first[0])["event"] == "started"  # head got its line
    assert code == 0, err.read_text()  # the normal exit code of a run where every slide is done
    stderr = err.read_text()
    _clean(stderr)
    notes = [ln for ln in stderr.splitlines() if "broken pipe" in ln]
    assert len(notes) == 1 and notes[0].startswith("mstar: warning: stdout was closed"), stderr
    for sid in IDS:
        assert validate_bag(out / "features" / f"{sid}.h5", {"model": TINY}) is None, sid
    rows = {ln.split(",")[0]: ln for ln in (out / "manifest.csv").read_text().splitlines()[1:]}
    assert sorted(rows) == IDS and all(",done," in row for row in rows.values())


def test_tile_events_stop_when_the_reader_goes_the_run_does_not(slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = start_mstar("tile", slides, out, "--jsonl", "--workers", "1", "--no-report", env=_env())
    assert proc.stdout is not None and proc.stderr is not None
    assert json.loads(proc.stdout.readline())["event"] == "started"
    proc.stdout.close()  # the reader is gone: the next event meets a broken pipe
    stderr = proc.stderr.read()
    assert proc.wait(600) == 0, stderr
    _clean(stderr)
    assert sum("stdout was closed (broken pipe)" in ln for ln in stderr.splitlines()) == 1
    assert sorted(p.name for p in (out / "coords").iterdir()) == [f"{s}.h5" for s in IDS]


@pytest.mark.parametrize("args,code", [
    (("info", "--json"), 0),
    (("info", "--jsonl"), 0),
    (("info",), 0),
    (("status", "--jsonl"), 0),
    (("status", "--json"), 0),
    (("status",), 0),
])
def test_reports_end_quietly_on_a_closed_stdout(slides: Path, tmp_path: Path, args: tuple[str, ...],
                                                code: int) -> None:
    """The reader closes the pipe before anything is written (`mstar info --json ... | head -c0`)."""
    out = tmp_path / "out"
    if args[0] == "status":
        assert run_mstar("tile", slides, out, "--workers", "1", "--no-qc", "--no-report", env=_env()).returncode == 0
        target = [out]
    else:
        target = [slides]
    proc = start_mstar(*args[:1], *target, *args[1:], env=_env())
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    stderr = proc.stderr.read()
    assert proc.wait(300) == code, stderr
    _clean(stderr)
    assert "error" not in stderr, stderr
