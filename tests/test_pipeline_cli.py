"""Shell-pipeline citizenship of ``mstar tile`` / ``mstar extract`` (issue 8), through real subprocesses:

slide lists piped on stdin (paths, or a CSV with a header), JSONL on stdout and nothing else, one final event
per slide, periodic progress lines (no carriage returns) when stderr is a file, ``--quiet``, ``--debug``
tracebacks, the environment defaults MSTAR_WEIGHTS / MSTAR_DEVICE / MSTAR_WORKERS and their override by options,
``mstar --version`` and ``mstar status OUT --jsonl`` deciding a resubmission.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import h5py
import pytest

from mstar_extract import __version__
from mstar_extract.testing.cli import run_mstar
from mstar_extract.testing.fixtures import make_island_slides

MODEL = "timm:test_vit"
FINAL = ("done", "skipped", "no_tissue", "failed")
_SCRUB = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MSTAR_WEIGHTS", "MSTAR_DEVICE", "MSTAR_WORKERS",
          "MSTAR_LOCK_TIMEOUT", "MSTAR_PROGRESS_INTERVAL")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith("SLURM_")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run(*args: str, stdin: str | None = None, env: dict[str, str] | None = None,
        stderr_file: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``mstar ARGS``; stderr is captured, or written to ``stderr_file`` (not a terminal) when given."""
    return run_mstar(*args, stdin=stdin, env=env or _env(), timeout=900, stderr_file=stderr_file)


def jsonl(stdout: str) -> list[dict]:
    """stdout holds nothing but JSON objects, one per line (json.loads raises otherwise)."""
    events = [json.loads(line) for line in stdout.splitlines()]
    assert all(isinstance(e, dict) and "event" in e for e in events)
    return events


def final_by_slide(events: list[dict]) -> dict[str, dict]:
    """The final event of each slide; asserts that every slide has exactly one."""
    finals = [e for e in events if e["event"] in FINAL]
    ids = [e["slide_id"] for e in finals]
    assert len(ids) == len(set(ids)), f"a slide has several final events: {ids}"
    for e in finals:
        assert e["status"] == e["event"]
    return {e["slide_id"]: e for e in finals}


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three small 20x SVS slides with a clear tissue island each (3-5 patches)."""
    return make_island_slides(tmp_path_factory.mktemp("pipe_slides"), ["p0", "p1", "p2"], seed=20)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from mstar_extract.models.registry import get_spec

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("pipe_weights") / "tiny.pth"
    torch.save(get_spec(MODEL).build().state_dict(), path)
    return path


def extract_args(*args: str) -> list[str]:
    return ["extract", *args, "--model", MODEL]


# ------------------------------------------------------------------------------------------------ mstar tile
def test_tile_reads_a_csv_list_on_stdin_and_logs_progress_lines(slides: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "ghost.svs"
    listing = (f"# slides of the study\nslide_id,path\n\nA,{slides['p0']}\n   \n# B is the second\n"
               f"B,{slides['p1']}\nghost,{missing}\nC,{slides['p2']}\n")
    err = tmp_path / "stderr.log"
    r = run("tile", "-", str(tmp_path / "out"), "--jsonl", "--workers", "1", "--no-qc", stdin=listing,
            env=_env(MSTAR_PROGRESS_INTERVAL="0"), stderr_file=err)
    assert r.returncode == 1  # one slide failed (after all others were processed)
    events = jsonl(r.stdout)
    finals = final_by_slide(events)
    assert {k: v["status"] for k, v in finals.items()} == {"A": "done", "B": "done", "C": "done", "ghost": "failed"}
    assert finals["ghost"]["path"] == str(missing) and finals["ghost"]["error"]
    assert sorted(e["slide_id"] for e in events if e["event"] == "started") == ["A", "B", "C", "ghost"]
    assert events[-1]["event"] == "summary" and events[-1]["counts"]["failed"] == 1 and events[-1]["exit_code"] == 1
    assert (tmp_path / "out" / "coords" / "A.h5").is_file()  # ids from the CSV's slide_id column
    text = err.read_bytes().decode()
    assert "\r" not in text and "\x1b[" not in text  # no progress-bar redraws, no terminal codes
    progress = [ln for ln in text.splitlines() if re.match(r"mstar: tile: slides: \d+/4 slide", ln)]
    assert 1 <= len(progress) <= 5, text  # interval 0: one line per finished slide (+ the last)
    errors = [ln for ln in text.splitlines() if ln.startswith("mstar: error:")]
    assert len(errors) == 1 and str(missing) in errors[0]


def test_tile_reports_a_slide_locked_by_another_process_as_skipped(slides: dict[str, Path], tmp_path: Path) -> None:
    from mstar_extract.locks import try_acquire

    out = tmp_path / "out"
    lock = try_acquire(out, "p1", heartbeat_s=0.2)  # this live pytest process works on p1
    assert lock is not None
    try:
        r = run("tile", str(slides["p0"]), str(slides["p1"]), str(out), "--jsonl", "--workers", "1", "--no-qc",
                "--lock-timeout", "2")
    finally:
        lock.release()
    assert r.returncode == 4, r.stderr  # p1 is not done: never 0 (issue 12; tests/test_held_slides.py)
    events = jsonl(r.stdout)
    finals = final_by_slide(events)
    assert finals["p0"]["status"] == "done"
    assert finals["p1"]["status"] == "skipped" and "another process" in finals["p1"]["error"]
    assert [e["slide_id"] for e in events if e["event"] == "started"] == ["p0"]
    assert not (out / "coords" / "p1.h5").exists()
    assert events[-1]["counts"] == {"done": 1, "skipped": 1, "no_tissue": 0, "failed": 0}


def test_debug_shows_a_traceback_for_an_unexpected_error(slides: dict[str, Path], tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "out"  # creating OUT fails with an OSError nobody anticipated
    plain = run("tile", str(slides["p0"]), str(out), "--workers", "1")
    assert plain.returncode == 1 and plain.stdout == ""
    assert "Traceback" not in plain.stderr
    lines = [ln for ln in plain.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("mstar: error: unexpected") and "--debug" in lines[0]
    debug = run("tile", str(slides["p0"]), str(out), "--workers", "1", "--debug")
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr and "NotADirectoryError" in debug.stderr


# ------------------------------------------------------------------------------------------------ mstar extract
@pytest.mark.slow
def test_extract_reads_paths_on_stdin_options_override_env(slides: dict[str, Path], tmp_path: Path) -> None:
    """Paths piped in with comments and blank lines; stderr is a file; every MSTAR_* variable is set to
    something unusable and the options win over all of them."""
    missing = tmp_path / "missing.svs"
    listing = f"# from find\n{slides['p0']}\n\n{slides['p1']}\n  \n# done later\n{missing}\n{slides['p2']}\n"
    env = _env(MSTAR_WEIGHTS=str(tmp_path / "no_such_weights.pth"), MSTAR_DEVICE="cuda:7", MSTAR_WORKERS="many")
    err = tmp_path / "stderr.log"
    out = tmp_path / "out"
    r = run(*extract_args("-", str(out), "--jsonl", "--weights", "random", "--device", "cpu", "--workers", "1"),
            stdin=listing, env=env, stderr_file=err)
    assert r.returncode == 1, r.stderr[-3000:]
    events = jsonl(r.stdout)
    finals = final_by_slide(events)
    assert {k: v["status"] for k, v in finals.items()} == {"p0": "done", "p1": "done", "p2": "done",
                                                            "missing": "failed"}
    assert "not found" in finals["missing"]["error"]
    for sid in ("p0", "p1", "p2"):
        assert finals[sid]["n_patches"] > 0 and finals[sid]["bag"] == str(out / "features" / f"{sid}.h5")
    assert events[-1]["event"] == "summary" and events[-1]["counts"] == {"done": 3, "skipped": 0, "no_tissue": 0,
                                                                           "failed": 1}
    with h5py.File(out / "features" / "p0.h5", "r") as f:
        assert f.attrs["weights_sha256"] == "random" and f.attrs["model"] == MODEL
    text = err.read_bytes().decode()
    assert "\r" not in text and "Traceback" not in text
    assert "on cpu" in text and "1 reader worker(s)" in text
    progress = [ln for ln in text.splitlines() if ln.startswith("mstar: extract: slides:")]
    # periodic (at most one line per 30 s by default, checked when a slide ends, plus one at the end): never one
    # per patch or batch, whatever the speed of the machine
    assert len(progress) <= 4 + 1, text
    assert len(text.splitlines()) <= 20, text


@pytest.mark.slow
def test_quiet_run_is_silent_and_mstar_weights_path_is_used(slides: dict[str, Path], weights_file: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run(*extract_args(str(slides["p1"]), str(out), "--device", "cpu", "--workers", "1", "--quiet"),
            env=_env(MSTAR_WEIGHTS=str(weights_file)))
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout == ""
    with h5py.File(out / "features" / "p1.h5", "r") as f:
        assert f.attrs["weights_sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
        assert f["features"].shape[0] > 0


@pytest.mark.slow
def test_mstar_device_is_honoured(slides: dict[str, Path], tmp_path: Path) -> None:
    r = run(*extract_args(str(slides["p0"]), str(tmp_path / "out"), "--weights", "random"),
            env=_env(MSTAR_DEVICE="cuda:7"))
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("mstar: error:")]
    assert len(errors) == 1 and "cuda:7" in errors[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "features").exists()  # refused before any slide


@pytest.mark.slow
def test_mstar_workers_and_device_honoured_then_status_decides_resubmission(slides: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    out = tmp_path / "out"
    missing = tmp_path / "lost.svs"
    listing = tmp_path / "more.txt"  # a missing path inside a list is a per-slide failure (on the command line: exit 2)
    listing.write_text(f"{missing}\n")
    r = run(*extract_args(str(slides["p2"]), str(listing), str(out)),
            env=_env(MSTAR_WORKERS="2", MSTAR_DEVICE="cpu", MSTAR_WEIGHTS="random"))
    assert r.returncode == 1, r.stderr[-3000:]
    assert "on cpu" in r.stderr and "2 reader worker(s)" in r.stderr  # both variables reached the run
    assert "RANDOM weights" in r.stderr  # and MSTAR_WEIGHTS=random
    st = run("status", str(out), "--jsonl")
    assert st.returncode == 1  # a slide failed: resubmit
    events = jsonl(st.stdout)
    slides_ev = {e["slide_id"]: e for e in events if e["event"] == "slide"}
    assert slides_ev["p2"]["status"] == "done" and slides_ev["lost"]["status"] == "failed"
    assert slides_ev["lost"]["path"] == str(missing) and slides_ev["lost"]["error"]
    summary = events[-1]
    assert summary["event"] == "summary" and summary["complete"] is False and summary["failed"] == 1
    assert summary["counts"]["done"] == 1 and summary["exit_code"] == 1
    # the documented resubmission recipe: the failed slides' paths, piped back in
    failed_paths = [e["path"] for e in events if e["event"] == "slide" and e["status"] == "failed"]
    assert failed_paths == [str(missing)]


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"mstar, version {__version__}"
    m = run_mstar("--version", timeout=120)  # with this process's environment
    assert m.returncode == 0 and m.stdout.strip() == f"mstar, version {__version__}"


# ------------------------------------------------------------------------- issue 12, item 14: a new user's stumbles
@pytest.mark.parametrize("command", ["tile", "extract"])
def test_a_forgotten_out_is_reported_as_missing_out(slides: dict[str, Path], command: str) -> None:
    r = run(command, str(slides["p0"].parent))  # `mstar extract slides/`
    assert r.returncode == 2 and r.stdout == ""
    assert f"Usage: mstar {command} [OPTIONS] SLIDES... OUT" in r.stderr
    assert "Error: Missing argument 'OUT'." in r.stderr and "SLIDES'" not in r.stderr, r.stderr
    nothing = run(command)
    assert nothing.returncode == 2 and "Missing argument 'SLIDES...'" in nothing.stderr


def test_help_lists_the_options_a_user_needs_first() -> None:
    text = run("extract", "--help").stdout
    order = ["Model:", "--model", "--weights", "--device", "--batch-size", "--precision", "Output:", "--dtype",
             "--format", "Patches:", "--magnification", "--patch-size", "Slides and jobs:", "--workers", "Messages:",
             "--jsonl", "Tissue segmentation", "--seg-mpp", "--pen-dilate-um"]
    options = text[text.index("\nModel:"):]  # after the description and its examples
    where = [options.index("\n  " + word if word.startswith("-") else "\n" + word) for word in order]
    assert where == sorted(where), text
    assert "Other options" not in text  # every option has its section
    tile = run("tile", "--help").stdout
    options = tile[tile.index("\nPatches:"):]
    where = [options.index("\n  " + word if word.startswith("-") else "\n" + word)
             for word in ["Patches:", "--patch-size", "--min-tissue", "Output:", "--coords-format",
                          "Slides and jobs:", "--lock-timeout", "Messages:", "Tissue segmentation", "--seg-mpp"]]
    assert where == sorted(where) and "--model" not in tile and "Other options" not in tile, tile


@pytest.mark.slow
def test_random_weights_warning_is_one_line_and_quiet_hides_it_and_floats_are_short(slides: dict[str, Path],
                                                                                     tmp_path: Path) -> None:
    out = tmp_path / "out"
    quiet = run(*extract_args(str(slides["p0"]), str(out), "--weights", "random", "--device", "cpu", "--workers",
                              "0", "-q"))
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr  # -q: nothing of the warning
    (out / "mstar_settings.json").unlink()  # as an OUT written by an older version, without a settings record
    r = run(*extract_args(str(slides["p0"]), str(out), "--weights", "random", "--device", "cpu", "--workers", "0",
                          "--magnification", "15", "--no-report"))
    assert r.returncode == 1, r.stderr
    warnings = [ln for ln in r.stderr.splitlines() if "RANDOM" in ln or "!!!" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("mstar: warning: --weights random"), r.stderr
    failed = [ln for ln in r.stderr.splitlines() if ln.startswith("mstar: error:")]
    assert len(failed) == 1 and "target_mpp is 0.5, expected 0.666667" in failed[0], r.stderr
    assert "0.6666666" not in r.stderr
