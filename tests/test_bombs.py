"""Image bombs and pyramid-less slides through the real command line, under a memory cap (issue 12 item 10).

The files are real and crafted in seconds (:mod:`mstar_extract.testing.bombs`): a 3.4 MB PNG of 30000 x 30000
pixels, a 460 KB sparse TIFF of 100000 x 100000 pixels without a pyramid. Each run is a ``python -m mstar_extract``
subprocess started by a small wrapper that caps its address space (``RLIMIT_AS``) and reports the largest resident
set of its children (``RUSAGE_CHILDREN``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mstar_extract.testing.bombs import write_flat_tiff, write_png_bomb, write_sparse_tiff

GB = 2**30
_CAPPED = r"""
import resource, subprocess, sys
cap, timeout = int(sys.argv[1]), float(sys.argv[2])
def limit():
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
try:
    code = subprocess.run(sys.argv[3:], preexec_fn=limit, timeout=timeout).returncode  # killed on timeout
except subprocess.TimeoutExpired:
    code = 124
    print(f"mstar did not finish within {timeout} s", file=sys.stderr)
print(f"maxrss_kb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
sys.exit(code)
"""


def capped_mstar(*args: str, cap: int = 3 * GB, timeout: float = 240, env: dict | None = None):
    """(completed process, max RSS in bytes) of ``python -m mstar_extract ARGS`` run with at most ``cap`` bytes of
    address space. The old code needed more than 8 GB for the PNG, and never finished the TIFF."""
    e = {**os.environ, "MSTAR_PROGRESS_INTERVAL": "3600", "COLUMNS": "250", **(env or {})}
    res = subprocess.run([sys.executable, "-c", _CAPPED, str(cap), str(timeout), sys.executable, "-m", "mstar_extract",
                          *args], capture_output=True, text=True, env=e, timeout=timeout + 60)
    rss = int(re.findall(r"maxrss_kb=(\d+)", res.stderr)[-1]) * 1024
    return res, rss


def errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("mstar: error")]


@pytest.fixture(scope="module")
def bomb_folder(fixture_slides, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bombs")
    write_png_bomb(d / "a_png_bomb.png", 30000, 30000)  # 2.7 GB of pixels in 3.4 MB
    write_sparse_tiff(d / "b_sparse.tif", 100000, 100000)  # 10 gigapixels, no pyramid, 460 KB
    write_png_bomb(d / "c_no_resolution.png", 15000, 15000, mpp=None)  # under the limit, but no mpp
    shutil.copy(fixture_slides["svs20"].path, d / "d_good.svs")
    return d


def test_bombs_fail_at_once_with_one_line_each_and_the_folder_goes_on(bomb_folder, tmp_path):
    out = tmp_path / "out"
    res, rss = capped_mstar("tile", str(bomb_folder), str(out), "--workers", "1", "--jsonl")
    finals = {e["slide_id"]: e for e in map(json.loads, res.stdout.splitlines()) if e["event"] in ("done", "failed")}
    assert res.returncode == 1, res.stderr
    assert {k: v["status"] for k, v in finals.items()} == {
        "a_png_bomb": "failed", "b_sparse": "failed", "c_no_resolution": "failed", "d_good": "done"}
    lines = errors(res.stderr)
    assert len(lines) == 3 and "Traceback" not in res.stderr, res.stderr
    png, tif, nores = (finals[k]["error"] for k in ("a_png_bomb", "b_sparse", "c_no_resolution"))
    assert png.startswith("image is 30000x30000 = 900 megapixels, more than the 250 megapixels limit") and \
        "--max-image-pixels / MSTAR_MAX_IMAGE_PIXELS" in png
    assert tif.startswith("the slide has no pyramid: its only level is 100000x100000 = 10.0 gigapixels") and \
        "--max-read-pixels / MSTAR_MAX_READ_PIXELS" in tif
    assert nores.startswith("no resolution (mpp)")  # checked from the header, before 225 Mpx were decoded
    assert rss < 1 * GB, rss  # decoding the PNG alone takes 2.7 GB (the old code peaked at 8.9 GB)
    assert (out / "coords" / "d_good.h5").is_file()


def test_info_reads_only_the_header_of_a_png_bomb(bomb_folder):
    res, rss = capped_mstar("info", str(bomb_folder / "a_png_bomb.png"), "--json", env={"MSTAR_MAX_IMAGE_PIXELS": "1G"})
    (rec,) = json.loads(res.stdout)
    assert res.returncode == 0 and (rec["width"], rec["height"]) == (30000, 30000) and rss < 1 * GB, res.stderr


def test_pixel_limits_are_options_and_variables(fixture_slides, tmp_path):
    png, svs = fixture_slides["png_small"].path, fixture_slides["svs40"].path
    res, _ = capped_mstar("tile", str(png), str(tmp_path / "o1"), "--mpp-override", "0.5", "--max-image-pixels", "1000")
    assert res.returncode == 1 and "more than the 1000 pixels limit for plain images" in errors(res.stderr)[0]
    res, _ = capped_mstar("tile", str(svs), str(fixture_slides["svs20"].path), str(tmp_path / "o2"), "--workers", "2",
                          env={"MSTAR_MAX_READ_PIXELS": "400k"})  # the variable reaches the worker processes
    lines = errors(res.stderr)
    assert res.returncode == 1 and len(lines) == 1 and str(svs) in lines[0], res.stderr  # svs20 (750x500) is done
    assert "its coarsest level fine enough, level 1, is 1500x1000 = 1.5 megapixels, more than the 400000 pixels" in lines[0]
    res, _ = capped_mstar("tile", str(svs), str(tmp_path / "o3"), "--max-read-pixels", "lots")
    assert res.returncode == 2 and "'lots' is not a pixel count" in res.stderr


def test_pyramid_less_slide_is_read_in_strips_with_progress(tmp_path):
    flat = write_flat_tiff(tmp_path / "flat.tif", 8192, 8192)  # 67 Mpx, no pyramid: level 0 is read for segmentation
    res, _ = capped_mstar("tile", str(flat), str(tmp_path / "out"), "-v", "--no-qc", env={"MSTAR_PROGRESS_INTERVAL": "0"})
    assert res.returncode == 0, res.stderr
    strips = re.findall(r"flat\.tif: read (\d+)/(\d+) strips of level 0", res.stderr)
    assert [int(done) for done, _ in strips] == list(range(1, int(strips[0][1]) + 1)) and len(strips) >= 3, res.stderr
