"""SLIDES discovery through the real command line (real ``mstar`` processes, real files and links):

* symbolic-link loops in a slides folder end (each real folder searched once), a link to a slide is that slide,
  broken links are one per-slide "file not found" line while the other slides are done (issue 12 item 9);
* a SLIDES argument that does not exist is a usage error (exit 2, one line naming it) before any work: OUT is not
  created and the model is never loaded (torch is not even imported) (issue 12 item 12).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mstar_extract.testing.cli import mstar_env, run_mstar

TIMEOUT_S = 240  # the old discovery never ended on two loops (> 150 s for the scan alone)


def mstar(*args: str, importtime: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real command line: forked from the pre-imported test launcher, or a fresh interpreter for
    ``importtime`` (``-X importtime`` lists what the run itself imports)."""
    env = {**os.environ, "MSTAR_PROGRESS_INTERVAL": "3600", "COLUMNS": "200"}
    if not importtime:
        return run_mstar(*args, env=env, timeout=TIMEOUT_S, cwd=cwd)
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "mstar_extract", *args], capture_output=True,
                          text=True, env=mstar_env(env), timeout=TIMEOUT_S, cwd=cwd)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("mstar: error")]


@pytest.fixture
def looped(fixture_slides, tmp_path: Path) -> Path:
    """Two real slides in a folder with two loops to itself, a loop back up from a sub-folder, a link to a slide,
    a broken link and a self-link, both named like slides."""
    d = tmp_path / "slides"
    (d / "sub").mkdir(parents=True)
    shutil.copy(fixture_slides["svs20"].path, d / "case1.svs")
    shutil.copy(fixture_slides["svs20"].path, d / "sub" / "case2.svs")
    os.symlink(".", d / "x")
    os.symlink(".", d / "y")
    os.symlink("..", d / "sub" / "up")
    os.symlink("case1.svs", d / "alias.svs")
    os.symlink("scanner-share/gone.svs", d / "broken.svs")
    os.symlink("self.svs", d / "self.svs")
    return d


def test_tile_a_folder_with_link_loops_and_broken_links(looped, tmp_path):
    out = tmp_path / "out"
    res = mstar("tile", str(looped), str(out), "--workers", "1", "--jsonl", "--no-qc")
    events = [json.loads(ln) for ln in res.stdout.splitlines()]
    finals = {e["slide_id"]: e for e in events if e["event"] in ("done", "failed", "skipped", "no_tissue")}
    assert res.returncode == 1, res.stderr
    assert {k: v["status"] for k, v in finals.items()} == {
        "case1": "done", "case2": "done", "broken": "failed", "self": "failed"}
    assert finals["case1"]["path"] == str(looped / "case1.svs") and finals["case2"]["path"] == str(looped / "sub" / "case2.svs")
    errors = error_lines(res.stderr)
    assert len(errors) == 2 and "Traceback" not in res.stderr, res.stderr
    assert any(str(looped / "broken.svs") in ln and "broken symbolic link to 'scanner-share/gone.svs'" in ln for ln in errors)
    assert finals["self"]["error"].startswith("file not found: broken symbolic link")
    assert sorted(p.name for p in (out / "coords").iterdir()) == ["case1.h5", "case2.h5"]


def test_recursive_glob_over_link_loops(looped):
    res = mstar("info", "**/*.svs", "--json", cwd=looped)
    assert res.returncode == 1  # the two broken links
    recs = {r["slide_id"]: r for r in json.loads(res.stdout)}
    assert sorted(recs) == ["broken", "case1", "case2", "self"]
    assert recs["case1"]["path"] == str(looped / "case1.svs") and recs["case2"]["path"] == str(looped / "sub" / "case2.svs")


@pytest.mark.parametrize("command", ["extract", "tile"])
def test_a_missing_slides_argument_stops_before_any_work(fixture_slides, tmp_path, command):
    out = tmp_path / "out"
    missing = tmp_path / "nonexistent"
    extra = ["--weights", "random", "--device", "cpu"] if command == "extract" else []
    res = mstar(command, str(fixture_slides["svs20"].path), str(missing) + "/", str(out), *extra, importtime=True)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if not ln.startswith("import time:")]
    assert lines == [f"mstar: error: SLIDES argument not found: '{missing}/': no such file or folder"]
    assert not out.exists()  # nothing written, not even the folder
    imported = {ln.split("|")[-1].strip() for ln in res.stderr.splitlines() if ln.startswith("import time:")}
    assert "torch" not in imported and "timm" not in imported  # the model was never loaded


def test_a_missing_argument_is_checked_before_the_weights(tmp_path):
    """Both mistakes at once: the slides are checked first (cheap), the weights are never looked at."""
    res = mstar("extract", str(tmp_path / "gone.svs"), str(tmp_path / "out"), "--weights", str(tmp_path / "no.pth"))
    assert res.returncode == 2 and error_lines(res.stderr) == [
        f"mstar: error: SLIDES argument not found: '{tmp_path / 'gone.svs'}': no such file or folder"], res.stderr
