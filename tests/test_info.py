"""`mstar info`: JSON/JSONL/human output, backends, broken files (exit 1, one line), no torch import."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mstar_extract.cli import main
from mstar_extract.testing.cli import run_mstar


def run(*args: str):
    return CliRunner().invoke(main, ["info", *args])


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_json_reports_resolution_and_levels(fixture_slides, backend):
    paths = [str(fixture_slides[n].path) for n in ("svs40", "svs20", "tiff_nometa")]
    res = run(*paths, "--json", "--backend", backend)
    assert res.exit_code == 0, res.stderr
    recs = {r["slide_id"]: r for r in json.loads(res.stdout)}
    assert set(recs) == {"svs40", "svs20", "tiff_nometa"}
    s40, s20, tif = recs["svs40"], recs["svs20"], recs["tiff_nometa"]
    assert (s40["mpp_x"], s40["mpp_y"], s40["objective_magnification"], s40["mpp_source"]) == (0.25, 0.25, 40, "metadata")
    assert (s20["mpp_x"], s20["objective_magnification"]) == (0.5, 20)
    assert tif["mpp_x"] is None and tif["mpp_y"] is None and tif["mpp_source"] is None
    assert s40["backend"] == backend and s40["vendor"] == "aperio" and s40["error"] is None
    assert (s40["width"], s40["height"]) == (6000, 4000)
    assert s40["levels"] == [{"width": 6000, "height": 4000, "downsample": 1.0},
                             {"width": 1500, "height": 1000, "downsample": 4.0},
                             {"width": 375, "height": 250, "downsample": 16.0}]
    assert sorted(s40["associated_images"]) == ["label", "macro", "thumbnail"]
    assert len(tif["levels"]) == 4


def test_same_structure_through_both_backends(fixture_slides):
    folder = str(fixture_slides["svs40"].path.parent)
    a = json.loads(run(folder, "--json", "--backend", "openslide").stdout)
    b = json.loads(run(folder, "--json", "--backend", "tiffslide").stdout)
    keys = ("slide_id", "width", "height", "levels", "mpp_x", "mpp_y", "objective_magnification", "associated_images")
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]


def test_human_output_and_override(fixture_slides):
    res = run(str(fixture_slides["tiff_nometa"].path))
    assert res.exit_code == 0
    assert "3000 x 2000 px" in res.stdout and "--mpp-override" in res.stdout and "downsample 8" in res.stdout
    res = run(str(fixture_slides["tiff_nometa"].path), "--mpp-override", "0.5", "--json")
    (rec,) = json.loads(res.stdout)
    assert (rec["mpp_x"], rec["mpp_source"]) == (0.5, "override")


def test_mpp_override_only_fills_missing_resolution(fixture_slides, tmp_path):
    """--mpp-override never replaces real metadata (a mixed folder stays right); a list's mpp column always wins."""
    svs, nometa = fixture_slides["svs40"].path, fixture_slides["tiff_nometa"].path
    res = run(str(svs), str(nometa), "--mpp-override", "0.5", "--json")
    recs = {r["slide_id"]: r for r in json.loads(res.stdout)}
    assert (recs["svs40"]["mpp_x"], recs["svs40"]["mpp_source"]) == (0.25, "metadata")
    assert (recs["tiff_nometa"]["mpp_x"], recs["tiff_nometa"]["mpp_source"]) == (0.5, "override")
    listing = tmp_path / "list.csv"
    listing.write_text(f"path,mpp\n{svs},0.2\n")
    (rec,) = json.loads(run(str(listing), "--mpp-override", "0.5", "--json").stdout)
    assert (rec["mpp_x"], rec["mpp_source"]) == (0.2, "override")


def test_jsonl_events(fixture_slides):
    res = run(str(fixture_slides["svs20"].path), str(fixture_slides["broken_empty"].path), "--jsonl")
    assert res.exit_code == 1
    events = [json.loads(line) for line in res.stdout.splitlines()]
    assert [e["event"] for e in events] == ["slide", "slide", "summary"]
    assert events[-1] == {"event": "summary", "command": "info", "total": 2, "counts": {"ok": 1, "failed": 1},
                          "exit_code": 1}
    assert {e["slide_id"]: e["error"] for e in events[:2]} == {"empty": "empty file (0 bytes)", "svs20": None}


def test_broken_files_exit_1_with_one_line_each_others_reported(fixture_slides, tmp_path):
    broken = [fixture_slides[n].path for n in ("broken_empty", "broken_text", "broken_truncated")]
    missing = tmp_path / "missing.svs"
    good = fixture_slides["svs20"].path
    env = {**os.environ, "COLUMNS": "200"}
    proc = run_mstar("info", *broken, missing, good, "--json", env=env, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 4 and "Traceback" not in proc.stderr, proc.stderr
    reasons = ["empty file", "not a SVS slide", "truncated file", "file not found"]
    for path, reason in zip([*broken, missing], reasons, strict=True):
        assert any(line.startswith(f"mstar: error: {path}: {reason}") for line in lines), (path, lines)
    recs = {r["slide_id"]: r for r in json.loads(proc.stdout)}
    assert recs["svs20"]["mpp_x"] == 0.5 and recs["truncated"]["error"].startswith("truncated file")


def test_verify_finds_the_corrupt_tile(fixture_slides):
    path = fixture_slides["broken_corrupt_tile"].path
    assert run(str(path)).exit_code == 0  # metadata alone is fine
    res = run(str(path), "--verify")
    assert res.exit_code == 1
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"mstar: error: {path}: cannot decode region")
    assert run(str(fixture_slides["svs20"].path), "--verify").exit_code == 0


def test_unsupported_extension_and_usage_errors(tmp_path):
    odd = tmp_path / "slide.xyz"
    odd.write_text("x")
    res = run(str(odd))
    assert res.exit_code == 1 and "unsupported file extension '.xyz'" in res.stderr
    assert run(str(tmp_path / "empty_dir_glob_*.svs")).exit_code == 2
    assert run("x.svs", "--mpp-override", "-1").exit_code == 2


def test_help_and_info_do_not_import_torch(fixture_slides):
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from mstar_extract.cli import main\n"
        "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0 and 'info' in r.output\n"
        f"r = CliRunner().invoke(main, ['info', {str(fixture_slides['svs40'].path)!r}, '--json']); assert r.exit_code == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'transformers', 'h5py'))\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
