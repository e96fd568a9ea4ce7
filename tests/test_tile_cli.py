"""`mstar tile` end to end through a real subprocess: outputs, manifest, errors, reruns, stdin, JSONL."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import h5py
import pytest

from mstar_extract.store.coords import read_coords_file
from mstar_extract.testing.cli import run_mstar as run_checkout_mstar


def run_mstar(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    e = {**os.environ, "MSTAR_PROGRESS_INTERVAL": "3600", **(env or {})}
    return run_checkout_mstar(*args, stdin=stdin, env=e, timeout=300)


def manifest(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv", newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def mixed_folder(fixture_slides, tmp_path_factory) -> Path:
    """Good slides and every broken input in one folder tree."""
    root = tmp_path_factory.mktemp("mixed")
    for name in ("svs40", "svs20", "glass_only", "broken_empty", "broken_text", "broken_truncated", "tiff_nometa"):
        src = fixture_slides[name].path
        shutil.copy(src, root / src.name)
    return root


def test_good_and_broken_slides(mixed_folder, tmp_path) -> None:
    out = tmp_path / "out"
    r = run_mstar("tile", str(mixed_folder), str(out), "--workers", "2")
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    rows = manifest(out)
    assert {k: v["status"] for k, v in rows.items()} == {
        "svs40": "done", "svs20": "done", "glass_only": "no_tissue", "empty": "failed", "text": "failed",
        "truncated": "failed", "tiff_nometa": "failed"}
    assert "no resolution" in rows["tiff_nometa"]["error"] and "--mpp-override" in rows["tiff_nometa"]["error"]
    for sid in ("empty", "text", "truncated", "tiff_nometa"):
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("mstar: error:") and str(mixed_folder / sid) in ln]
        assert len(lines) == 1, (sid, r.stderr)  # one line per failure, naming the file
        assert rows[sid]["error"] and "\n" not in rows[sid]["error"]
    assert int(rows["svs40"]["n_patches"]) > 0 and float(rows["svs40"]["mpp"]) == 0.25
    for sid in ("svs40", "svs20", "glass_only"):
        assert (out / "coords" / f"{sid}.h5").is_file()
        img = cv2.imread(str(out / "qc" / f"{sid}.jpg"))
        assert img is not None and max(img.shape[:2]) >= 800  # legible: upscaled when the slide is small
        doc = json.loads((out / "contours" / f"{sid}.geojson").read_text())
        assert doc["type"] == "FeatureCollection"
    with h5py.File(out / "coords" / "svs40.h5", "r") as f:
        assert f["coords"].attrs["patch_size_level0"] == 512 and f["coords"].shape[0] == int(rows["svs40"]["n_patches"])
    with h5py.File(out / "coords" / "glass_only.h5", "r") as f:
        assert f["coords"].shape == (0, 2)  # a valid, empty coordinates file
    assert not list(out.rglob("*.tmp"))
    # 20x and 40x scans of the same glass: the same physical grid
    a, b = read_coords_file(out / "coords" / "svs40.h5"), read_coords_file(out / "coords" / "svs20.h5")
    assert {tuple(c) for c in (a.coords // 2).tolist()} == {tuple(c) for c in b.coords.tolist()}


def test_rerun_skips_and_overwrite_recomputes(fixture_slides, tmp_path) -> None:
    slides = fixture_slides["svs40"].path.parent
    out = tmp_path / "out"
    first = run_mstar("tile", str(slides), str(out), "--workers", "1")
    assert first.returncode == 0, first.stderr
    mtime = (out / "coords" / "svs40.h5").stat().st_mtime_ns
    again = run_mstar("tile", str(slides), str(out), "--workers", "1", "--jsonl")
    assert again.returncode == 0
    events = [json.loads(ln) for ln in again.stdout.splitlines()]
    finals = {e["slide_id"]: e for e in events if e["event"] not in ("started", "summary")}
    assert {e["status"] for e in finals.values()} == {"skipped"} and len(finals) == 3
    assert finals["svs40"]["n_patches"] > 0
    assert (out / "coords" / "svs40.h5").stat().st_mtime_ns == mtime
    assert manifest(out)["svs40"]["status"] == "done"  # a skip never hides the earlier done row
    forced = run_mstar("tile", str(slides), str(out), "--workers", "1", "--overwrite", "--jsonl")
    assert forced.returncode == 0
    assert {json.loads(ln)["event"] for ln in forced.stdout.splitlines()} >= {"done", "no_tissue", "summary"}
    assert (out / "coords" / "svs40.h5").stat().st_mtime_ns != mtime


def test_stdin_list_jsonl_and_mpp_override(fixture_slides, tmp_path) -> None:
    fx = fixture_slides["tiff_nometa"]
    listing = f"# slides\n{fixture_slides['svs40'].path}\n\n{fx.path}\n{tmp_path / 'missing.svs'}\n"
    out = tmp_path / "out"
    r = run_mstar("tile", "-", str(out), "--jsonl", "--mpp-override", str(fx.mpp), "--coords-format", "clam",
                  "--workers", "1", stdin=listing)
    assert r.returncode == 1
    events = [json.loads(ln) for ln in r.stdout.splitlines()]  # stdout holds nothing but JSON lines
    finals = {e["slide_id"]: e for e in events if e["event"] in ("done", "skipped", "no_tissue", "failed")}
    assert finals["svs40"]["status"] == "done" and finals["tiff_nometa"]["status"] == "done"
    assert finals["missing"]["status"] == "failed" and finals["missing"]["error"]
    assert events[-1]["event"] == "summary" and events[-1]["counts"]["failed"] == 1 and events[-1]["exit_code"] == 1
    for e in finals.values():
        assert set(e) >= {"slide_id", "path", "status", "n_patches", "seconds", "error"}
    with h5py.File(out / "coords" / "svs40.h5", "r") as f:
        a = f["coords"].attrs
        assert a["patch_level"] == 0 and a["patch_size"] == 512  # the override did not replace real metadata
    with h5py.File(out / "coords" / "tiff_nometa.h5", "r") as f:
        assert f["coords"].attrs["patch_size"] == 256


def test_on_error_fail_stops_early(fixture_slides, tmp_path) -> None:
    listing = "\n".join(str(fixture_slides[n].path) for n in ("broken_empty", "broken_text", "svs20"))
    lst = tmp_path / "list.txt"
    lst.write_text(listing + "\n")
    out = tmp_path / "out"
    r = run_mstar("tile", str(lst), str(out), "--on-error", "fail", "--workers", "1")
    assert r.returncode == 1
    rows = manifest(out)
    assert len(rows) == 1 and next(iter(rows.values()))["status"] == "failed"
    assert "Traceback" not in r.stderr


def test_tissue_mask_geojson_reproduces_coords(fixture_slides, tmp_path) -> None:
    slide = fixture_slides["svs40"].path
    a = run_mstar("tile", str(slide), str(tmp_path / "a"), "--workers", "1")
    assert a.returncode == 0, a.stderr
    b = run_mstar("tile", str(slide), str(tmp_path / "b"), "--workers", "1",
                  "--tissue-mask", str(tmp_path / "a" / "contours"))
    assert b.returncode == 0, b.stderr
    ca, cb = read_coords_file(tmp_path / "a" / "coords" / "svs40.h5"), read_coords_file(tmp_path / "b" / "coords" / "svs40.h5")
    sa, sb = {tuple(c) for c in ca.coords.tolist()}, {tuple(c) for c in cb.coords.tolist()}
    assert len(sa ^ sb) <= max(1, len(sa) // 10)
    c = run_mstar("tile", str(slide), str(tmp_path / "c"), "--tissue-mask", str(tmp_path))  # folder without a mask
    assert c.returncode == 1 and "no tissue mask" in c.stderr


def test_usage_errors_exit_2(fixture_slides, tmp_path) -> None:
    slide = str(fixture_slides["svs20"].path)
    for args in (["--magnification", "20", "--mpp", "0.5"], ["--pen-colors", "purple"], ["--overlap", "300"],
                 ["--shard", "3/2"]):
        r = run_mstar("tile", slide, str(tmp_path / "o"), *args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.count("\n") <= 2
    assert run_mstar("tile", "--help").returncode == 0


def test_slide_runner_bookkeeping(tmp_path) -> None:
    """The runner used by tile and extract: events, manifest rows, stderr lines, exit code."""
    import io

    from mstar_extract.console import Reporter
    from mstar_extract.inputs import SlideEntry
    from mstar_extract.pipeline.runner import SlideOutcome, SlideRunner

    out, err = io.StringIO(), io.StringIO()
    rep = Reporter(jsonl=True, stdout=out, stderr=err)
    runner = SlideRunner(tmp_path, rep, total=3, command="tile")
    a, b, c = (SlideEntry(s, tmp_path / f"{s}.svs") for s in ("a", "b", "c"))
    for e in (a, b, c):
        assert runner.begin(e)
    runner.finish(SlideOutcome(slide_id="a", path=str(a.path), status="done", n_patches=5, seconds=1.0, mpp=0.25))
    runner.finish(SlideOutcome.failed(b, "no resolution\n(mpp) in the file"))
    runner.finish(SlideOutcome(slide_id="c", path=str(c.path), status="no_tissue", n_patches=0))
    assert runner.close() == 1
    events = [json.loads(ln) for ln in out.getvalue().splitlines()]
    assert [e["event"] for e in events] == ["started"] * 3 + ["done", "failed", "no_tissue", "summary"]
    assert events[4]["error"] == "no resolution (mpp) in the file"  # always one line
    assert events[-1]["counts"] == {"done": 1, "skipped": 0, "no_tissue": 1, "failed": 1}
    errors = [ln for ln in err.getvalue().splitlines() if ln.startswith("mstar: error:")]
    assert errors == [f"mstar: error: {b.path}: no resolution (mpp) in the file"]
    rows = manifest(tmp_path)
    assert rows["a"]["status"] == "done" and rows["a"]["n_patches"] == "5" and rows["b"]["status"] == "failed"
    ok = SlideRunner(tmp_path / "ok", Reporter(stderr=io.StringIO()), total=0, command="tile")
    assert ok.close() == 0
