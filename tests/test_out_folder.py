"""The output folder: nothing escapes OUT (slide ids), one OUT never mixes settings (its settings record), and a
rerun that skips a finished slide keeps the slide's record (issue 12 items 1, 6 and 13), through real CLI runs."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from mstar_extract.errors import UsageError
from mstar_extract.manifest import ManifestRow, latest_rows
from mstar_extract.store.layout import OutLayout, make_layout, slide_id_problem, validate_slide_id
from mstar_extract.testing.cli import run_mstar

TINY = ["--model", "timm:test_vit", "--weights", "random", "--device", "cpu", "--workers", "0",
        "--batch-size", "8", "--no-qc"]


def mstar(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return run_mstar(*args, stdin=stdin, env={**os.environ, "MSTAR_PROGRESS_INTERVAL": "3600"}, timeout=600)


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def six_slides(fixture_slides, tmp_path_factory) -> Path:
    """Six small slides (the 20x fixture under six names)."""
    root = tmp_path_factory.mktemp("six")
    for i in range(6):
        shutil.copy(fixture_slides["svs20"].path, root / f"s{i}.svs")
    return root


# ------------------------------------------------------------------------------------------------ slide ids
@pytest.mark.parametrize("bad", ["", "../../escape", "a/b", "a\\b", "..", "x..y", ".hidden", "tab\there",
                                 "new\nline", "z" * 201, "\u202egnp.exe"])
def test_unsafe_slide_ids_are_refused(bad: str) -> None:
    assert slide_id_problem(bad) is not None
    with pytest.raises(UsageError, match="line 3"):
        validate_slide_id(bad, "list.csv line 3")
    with pytest.raises(UsageError):
        OutLayout("out").bag(bad)


@pytest.mark.parametrize("good", ["TCGA-AB-1234-01Z-00-DX1", "slide 1", "a.b", "ü-ñ", "x" * 200, "a+b=(c)"])
def test_plain_slide_ids_name_files_inside_out(good: str, tmp_path: Path) -> None:
    assert slide_id_problem(good) is None
    files = OutLayout(tmp_path / "out").slide(good)
    for p in (files.bag, files.pt, files.coords, files.qc, files.contours, files.lock):
        assert p.parent.parent == tmp_path / "out", p
    assert all(good in p.name for p in (files.bag, files.pt, files.coords, files.qc, files.contours))
    assert make_layout(tmp_path / "out").manifest == tmp_path / "out" / "manifest.csv"
    with pytest.raises(UsageError, match="unknown output layout"):
        make_layout(tmp_path / "out", "nope")


def test_a_slide_id_cannot_write_outside_out(fixture_slides, tmp_path: Path) -> None:
    """``../../escape`` and an absolute path as slide ids, from a CSV list and from stdin, for tile and extract:
    exit 2 naming the row, before any work, and nothing written anywhere."""
    svs = fixture_slides["svs20"].path
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    target = tmp_path / "abs_target"
    before = files_under(tmp_path)
    for bad in ("../../escape", str(target)):
        listing = work / "list.csv"
        listing.write_text(f"path,slide_id\n{svs},ok\n{svs},{bad}\n")
        out = work / "out"
        for args, stdin in ((["tile", listing, out], None), (["tile", "-", out], listing.read_text()),
                            (["extract", "-", out, *TINY], listing.read_text())):
            r = mstar(*args, stdin=stdin)
            assert r.returncode == 2, (args, r.stderr)
            errors = [ln for ln in r.stderr.splitlines() if ln.startswith("mstar: error:")]
            assert len(errors) == 1 and "line 3" in errors[0] and "slide id" in errors[0], r.stderr
            assert "Traceback" not in r.stderr
            assert not out.exists()  # nothing done at all
        listing.unlink()
    assert files_under(tmp_path) == before
    assert not list(tmp_path.rglob("escape*")) and not list(tmp_path.rglob("abs_target*"))


# ------------------------------------------------------------------------------------------------ settings record
def test_rerun_with_another_patch_size_is_refused_before_any_work(six_slides: Path, tmp_path: Path) -> None:
    """The issue's scenario: 3 of 6 bags done at 256 px, then a rerun at 224 px: refused (exit 2), nothing written."""
    part = tmp_path / "three"
    part.mkdir()
    for i in range(3):
        os.link(six_slides / f"s{i}.svs", part / f"s{i}.svs")
    out = tmp_path / "out"
    r = mstar("extract", part, out, *TINY)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (out / "features").iterdir()) == ["s0.h5", "s1.h5", "s2.h5"]
    record = json.loads((out / "mstar_settings.json").read_text())
    assert record["tiling"]["patch_size"] == 256 and record["features"]["weights_sha256"] == "random"
    state = {p: p.stat().st_mtime_ns for p in files_under(out)}

    r = mstar("extract", six_slides, out, *TINY, "--patch-size", "224")
    assert r.returncode == 2, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("mstar: error:")]
    assert len(errors) == 1 and "--patch-size 224 (OUT has 256)" in errors[0] and "--overwrite" in errors[0], r.stderr
    assert "RANDOM" not in r.stderr  # refused before the model (and its random-weights warning) was even built
    assert {p: p.stat().st_mtime_ns for p in files_under(out)} == state  # nothing written, nothing touched

    r = mstar("extract", part / "s0.svs", six_slides / "s3.svs", out, *TINY, "--jsonl")  # the same settings: go on
    assert r.returncode == 0, r.stderr
    finals = {e["slide_id"]: e["status"] for e in map(json.loads, r.stdout.splitlines()) if e["event"] in
              ("done", "skipped")}
    assert finals == {"s0": "skipped", "s3": "done"}


def test_tile_refuses_another_patch_size_and_extract_adds_its_model(six_slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    one = six_slides / "s0.svs"
    assert mstar("tile", one, out).returncode == 0
    coords = out / "coords" / "s0.h5"
    mtime = coords.stat().st_mtime_ns
    r = mstar("tile", one, out, "--patch-size", "224", "--min-tissue", "0.25")
    assert r.returncode == 2 and "--patch-size 224 (OUT has 256)" in r.stderr and "--min-tissue 0.25" in r.stderr
    assert coords.stat().st_mtime_ns == mtime  # not "skipped" with the old coordinates
    assert "features" not in json.loads((out / "mstar_settings.json").read_text())

    r = mstar("extract", one, out, *TINY, "--seg-mpp", "4")  # a segmentation setting that moves the coordinates
    assert r.returncode == 2 and "--seg-mpp 4 (OUT has 8)" in r.stderr
    r = mstar("extract", one, out, *TINY)  # tile's settings: extract adds its own
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "mstar_settings.json").read_text())["features"]["dtype"] == "float32"
    r = mstar("extract", one, out, *TINY, "--dtype", "float16")
    assert r.returncode == 2 and "--dtype float16 (OUT has float32)" in r.stderr
    # coordinates from elsewhere bring their own geometry: only the features' settings are compared; a slide
    # without a coordinates file there is an ordinary per-slide failure
    r = mstar("extract", one, six_slides / "s1.svs", out, *TINY, "--coords-dir", out, "--patch-size", "224",
              "--jsonl")
    assert r.returncode == 1 and "OUT has" not in r.stderr, r.stderr
    finals = {e["slide_id"]: e for e in map(json.loads, r.stdout.splitlines()) if e["event"] in ("skipped", "failed")}
    assert finals["s0"]["status"] == "skipped" and finals["s1"]["status"] == "failed"
    assert finals["s1"]["error"] == f"no coordinates for slide id 's1' in {out}", finals["s1"]
    r = mstar("tile", one, out, "--patch-size", "224", "--overwrite")  # the way out that the message names
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "mstar_settings.json").read_text())["tiling"]["patch_size"] == 224


# ------------------------------------------------------------------------------------------------ manifest merge
def status_of(out: Path) -> dict:
    r = mstar("status", out, "--jsonl")
    assert r.returncode == 0, r.stderr
    events = [json.loads(ln) for ln in r.stdout.splitlines()]
    return {"summary": events[-1], **{e["slide_id"]: e for e in events if e["event"] == "slide"}}


def test_a_skipped_slide_keeps_its_record_in_status(fixture_slides, tmp_path: Path) -> None:
    """A rerun that skips a finished slide: status says done (not ``done 0, skipped 1``) with the slide's mpp and
    seconds, also when OUT was copied without its hidden part files, or the finishing row was never written."""
    svs = fixture_slides["svs20"].path
    out = tmp_path / "out"
    assert mstar("tile", svs, out).returncode == 0
    first = status_of(out)["svs20"]
    assert first["status"] == "done" and first["mpp"] == 0.5 and first["seconds"] > 0

    copy = tmp_path / "copied"  # e.g. cp -r out/* copied/: manifest.csv comes, .manifest/ does not
    shutil.copytree(out, copy, ignore=lambda d, names: [n for n in names if n.startswith(".")])
    for folder in (out, copy):
        assert mstar("tile", svs, folder).returncode == 0  # skipped
        st = status_of(folder)
        assert st["summary"]["counts"]["done"] == 1 and st["summary"]["counts"]["skipped"] == 0, st
        assert (st["svs20"]["mpp"], st["svs20"]["seconds"], st["svs20"]["finished"]) == \
            (first["mpp"], first["seconds"], first["finished"]), st["svs20"]
        with open(folder / "manifest.csv", newline="") as fh:
            row = next(csv.DictReader(fh))
        assert row["status"] == "done" and float(row["mpp"]) == 0.5 and float(row["seconds"]) == first["seconds"]

    lost = tmp_path / "lost"  # the process that finished the slide was killed before recording it
    shutil.copytree(out, lost, ignore=lambda d, names: [n for n in names if n in (".manifest", "manifest.csv")])
    assert mstar("tile", svs, lost).returncode == 0
    st = status_of(lost)
    assert st["summary"]["counts"]["done"] == 1 and st["summary"]["complete"] is True
    assert st["svs20"]["status"] == "done" and st["svs20"]["mpp"] == 0.5  # from the coordinates file


def test_merge_rule() -> None:
    rows = [ManifestRow("a", "/a", "done", n_patches=3, mpp=0.5, seconds=9.0, finished=1.0),
            ManifestRow("a", "/a", "skipped", n_patches=3, seconds=0.0, finished=2.0),
            ManifestRow("b", "/b", "skipped", n_patches=0, mpp=0.25, seconds=0.0, finished=2.0),
            ManifestRow("c", "/c", "failed", error="boom", finished=1.0),
            ManifestRow("c", "/c", "skipped", error="taken by another process", finished=2.0)]
    merged = {r.slide_id: r for r in latest_rows(rows)}
    assert (merged["a"].status, merged["a"].seconds, merged["a"].mpp) == ("done", 9.0, 0.5)
    assert (merged["b"].status, merged["b"].seconds, merged["b"].mpp) == ("no_tissue", None, 0.25)
    assert merged["c"].status == "skipped" and merged["c"].error == "taken by another process"
