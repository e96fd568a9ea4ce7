"""The fast patch reader (issue 4 items 3, 6; issue 11): pixels equal the naive per-patch read_region (exactly, by
default), ordering, corrupt tiles, the worker pool across slides, dead workers, the bench command. Real SVS/TIFF
files, real processes. The comparison with the official mSTAR pipeline itself is in test_fidelity.py."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from mstar_extract.errors import ReadError, SlideError, SlideOpenError
from mstar_extract.reading import DeviceFeeder, PatchReader, ReaderPool, SlideJob, grid_order, read_patches_naive, resize_patch
from mstar_extract.reading.tiles import TiffTileSource
from mstar_extract.slides import open_slide
from mstar_extract.tiling import ReadPlan


def grid_plan(path, level: int = 0, read: int = 512, offset: int = 0, shuffle: int | None = None) -> ReadPlan:
    """Every patch of a grid (no tissue filter) covering the slide and sticking out of every border."""
    with open_slide(path) as s:
        w, h = s.dimensions
        ds = s.levels[level].downsample
    step = int(round(read * ds))
    xs = np.arange(-offset, w + step // 2, step)
    ys = np.arange(-offset, h + step // 2, step)
    coords = np.array([(x, y) for y in ys for x in xs], dtype=np.int64)
    if shuffle is not None:
        coords = coords[np.random.default_rng(shuffle).permutation(len(coords))]
    return ReadPlan(coords, level, ds, read, 256, step, 0.5, 20.0, None, None, w, h)


def collect(reader_or_stream) -> tuple[dict[int, np.ndarray], list[int]]:
    got: dict[int, np.ndarray] = {}
    order: list[int] = []
    for batch in reader_or_stream:
        assert batch.pixels.dtype == np.uint8 and batch.pixels.shape[1:] == (224, 224, 3)
        assert len(batch.pixels) == len(batch.indices) == len(batch.coords)
        for i, px in zip(batch.indices.tolist(), batch.pixels, strict=True):
            assert i not in got, f"patch {i} delivered twice"
            got[i] = px.copy()
        order.extend(batch.indices.tolist())
    return got, order


def diff_stats(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()), float(d.mean())


# ------------------------------------------------------------------------------------------- pixels
@pytest.mark.parametrize("level,read,offset", [(0, 512, 200), (1, 128, 300)])
def test_tile_path_equals_naive(fixture_slides, level, read, offset):
    """Direct tile decoding gives exactly the naive OpenSlide read (alpha dropped) + the same resize, at level 0
    and level 1, including patches that stick out of the slide (black there in both, as convert('RGB') gives)."""
    path = fixture_slides["svs40"].path
    plan = grid_plan(path, level, read, offset)
    ref = read_patches_naive(plan, path, backend="openslide")
    with PatchReader(plan, path, "openslide", batch_size=7, method="tiles") as r:
        assert r.method == "tiles" and r.decode_scale == 1 and r.decode == "full"
        got, _ = collect(r)
    assert sorted(got) == list(range(len(plan)))
    for i in range(len(plan)):
        mx, _ = diff_stats(got[i], ref[i])
        assert mx == 0, f"patch {i} at {plan.coords[i]} differs by {mx}"


def test_region_path_equals_naive(fixture_slides):
    path = fixture_slides["svs40"].path
    plan = grid_plan(path, 0, 512, 200)
    ref = read_patches_naive(plan, path, backend="tiffslide")
    with PatchReader(plan, path, "tiffslide", batch_size=16, method="regions") as r:
        assert r.method == "regions"
        got, _ = collect(r)
    assert max(diff_stats(got[i], ref[i])[0] for i in range(len(plan))) == 0


def test_reduced_decoding_within_jpeg_tolerance(fixture_slides):
    """--fast-decode, 40x -> 20x: tiles decoded at 1/2 by libjpeg (DCT scaling) stay within JPEG tolerance of the
    exact read, and the comparison can fail: the same patch read 16 level-0 pixels off differs clearly more."""
    path = fixture_slides["svs40"].path
    plan = grid_plan(path, 0, 512, 200)
    ref = read_patches_naive(plan, path, backend="openslide")
    with PatchReader(plan, path, "openslide", batch_size=32, decode="reduced") as r:
        assert r.method == "tiles" and r.decode_scale == 2
        got, _ = collect(r)
    means = [diff_stats(got[i], ref[i])[1] for i in range(len(plan))]
    assert max(means) < 1.5 and float(np.mean(means)) < 0.6
    tissue = [i for i in range(len(plan)) if 40 < ref[i].mean() < 220]
    assert tissue, "fixture has tissue"
    assert max(diff_stats(got[i], ref[i])[0] for i in tissue) <= 48
    shifted = ReadPlan(plan.coords[tissue] + 16, 0, 1.0, 512, 256, 512, 0.5, 20.0, None, None, plan.level0_width,
                       plan.level0_height)
    off = read_patches_naive(shifted, path, backend="openslide")
    assert np.mean([diff_stats(off[k], ref[i])[1] for k, i in enumerate(tissue)]) > 3 * np.mean([means[i] for i in tissue])


def test_border_patches_are_black_outside(fixture_slides):
    """Outside the level the reference (OpenSlide read_region + convert('RGB')) sees transparent pixels with the
    alpha dropped: black. Every reader path does the same."""
    path = fixture_slides["svs40"].path
    with open_slide(path) as s:
        w, h = s.dimensions
    plan = ReadPlan(np.array([[-256, 0], [w - 256, h - 256], [w + 10, 0]]), 0, 1.0, 512, 256, 512, 0.5, 20.0,
                    None, None, w, h)
    for method, backend in (("tiles", "openslide"), ("regions", "openslide"), ("regions", "tiffslide")):
        with PatchReader(plan, path, backend, batch_size=8, method=method) as r:
            (batch,) = list(r)
        px = dict(zip(batch.indices.tolist(), batch.pixels, strict=True))
        assert (px[0][:, :100] == 0).all() and (px[1][120:, :] == 0).all() and (px[1][:, 120:] == 0).all(), method
        assert (px[2] == 0).all() and px[1][:100, :100].mean() > 100, (method, backend)


def test_other_tiff_kinds_and_photometric(fixture_slides, tmp_path):
    """Generic pyramidal TIFF (fixture) and an Aperio-style file with RGB (not YCbCr) JPEG tiles: same pixels."""
    import tifffile

    rng = np.random.default_rng(0)
    import cv2

    img = cv2.resize(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), (1200, 800), interpolation=cv2.INTER_CUBIC)
    p = tmp_path / "rgbjpeg.svs"
    d = "Aperio Image Library v12.0.0\r\n1200x800 [0,0 1200x800] (240x240) JPEG/RGB Q=80|AppMag = 40|MPP = 0.25"
    with tifffile.TiffWriter(p) as tw:
        tw.write(img, tile=(240, 240), compression="jpeg", compressionargs={"level": 80, "outcolorspace": "rgb"},
                 photometric="rgb", metadata=None, description=d)
    with tifffile.TiffFile(p) as tf:
        assert tf.pages[0].photometric == 2  # RGB-coded JPEG, as in many real SVS files
    for path in (p, fixture_slides["tiff_nometa"].path):
        plan = grid_plan(path, 0, 256, 50)
        ref = read_patches_naive(plan, path, backend="openslide")
        with PatchReader(plan, path, "openslide", batch_size=5) as r:
            assert r.method == "tiles"
            got, _ = collect(r)
        assert max(diff_stats(got[i], ref[i])[0] for i in range(len(plan))) == 0


def test_tiles_decoded_once_per_batch(fixture_slides):
    path = fixture_slides["svs40"].path
    plan = grid_plan(path, 0, 384, 0)  # 384-px patches on 256-px tiles: neighbours share tiles
    with PatchReader(plan, path, batch_size=len(plan)) as r:
        list(r)
        src: TiffTileSource = r._tiles
        assert src.tiles_decoded <= src.across * src.down


def test_tiles_decoded_once_with_overlapping_patches(fixture_slides):
    """Overlapping patches (a 256-px step for 512-px reads): tiles go through the cache, decoded once each."""
    path = fixture_slides["svs40"].path
    with open_slide(path) as s:
        w, h = s.dimensions
    xs, ys = np.arange(0, w - 512, 256), np.arange(0, h - 512, 256)
    coords = np.array([(x, y) for y in ys for x in xs], dtype=np.int64)
    plan = ReadPlan(coords, 0, 1.0, 512, 256, 512, 0.5, 20.0, None, None, w, h)
    ref = read_patches_naive(plan, path, backend="openslide")
    with PatchReader(plan, path, batch_size=len(plan)) as r:
        got, _ = collect(r)
        src: TiffTileSource = r._tiles
        assert not src.direct and src.tiles_decoded <= src.across * src.down
    assert max(diff_stats(got[i], ref[i])[0] for i in range(len(plan))) == 0


# ------------------------------------------------------------------------------------------- order
def test_order_and_indices(fixture_slides):
    path = fixture_slides["svs20"].path
    plan = grid_plan(path, 0, 256, 0, shuffle=3)
    with PatchReader(plan, path, batch_size=6) as r:
        batches = list(r)
    rows = np.concatenate([b.indices for b in batches])
    assert sorted(rows.tolist()) == list(range(len(plan)))
    assert all(len(b) == 6 for b in batches[:-1])
    for b in batches:
        assert (b.coords == plan.coords[b.indices]).all()
    ys = plan.coords[rows, 1]
    assert (np.diff(ys) >= 0).all(), "batches come in row-major grid order"
    assert (grid_order(plan.coords) == rows).all()


def test_resize_is_pil_bilinear():
    """One resize, footprint -> 224, bit-identical to PIL's Image.resize(BILINEAR) (torchvision Resize on PIL)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for side in (512, 683, 256, 224):
        img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        out = resize_patch(img, 224)
        assert out.shape == (224, 224, 3) and out.dtype == np.uint8
        want = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR))
        assert (out == want).all(), side
    buf = np.zeros((224, 224, 3), np.uint8)
    assert resize_patch(img, 224, out=buf) is buf and (buf == out).all()


# ------------------------------------------------------------------------------------------- corrupt tiles
@pytest.mark.parametrize("method", ["tiles", "regions"])
def test_corrupt_tile(fixture_slides, method):
    fx = fixture_slides["broken_corrupt_tile"]
    x, y, _, _ = fx.extra["corrupt_tile"]
    plan = grid_plan(fx.path, 0, 256, 0)
    with PatchReader(plan, fx.path, batch_size=8, method=method) as r:
        with pytest.raises(ReadError) as err:
            list(r)
    msg = str(err.value)
    assert str(fx.path) in msg and f"(x={x}, y={y})" in msg and "\n" not in msg
    with PatchReader(plan, fx.path, batch_size=8, method=method, skip_bad_patches=True) as r:
        got, _ = collect(r)
        bad = r.bad_indices
    bad_row = int(np.flatnonzero((plan.coords[:, 0] == x) & (plan.coords[:, 1] == y))[0])
    assert bad.tolist() == [bad_row] and r.n_bad == 1
    assert len(got) == len(plan) - 1 and bad_row not in got
    assert f"(x={x}, y={y})" in r.bad[0][1]


# ------------------------------------------------------------------------------------------- pool
def test_pool_two_workers_several_slides(fixture_slides):
    """Every patch of every slide exactly once, equal to the in-process reader; a broken slide fails alone."""
    fx = fixture_slides
    jobs = [
        SlideJob("svs40", str(fx["svs40"].path), grid_plan(fx["svs40"].path, 0, 512, 100)),
        SlideJob("corrupt", str(fx["broken_corrupt_tile"].path), grid_plan(fx["broken_corrupt_tile"].path, 0, 256)),
        SlideJob("empty", str(fx["broken_empty"].path), grid_plan(fx["svs20"].path, 0, 256)),
        SlideJob("svs20", str(fx["svs20"].path), grid_plan(fx["svs20"].path, 0, 256, 0, shuffle=1)),
        SlideJob("tiff", str(fx["tiff_nometa"].path), grid_plan(fx["tiff_nometa"].path, 1, 128)),
    ]
    outcome: dict[str, object] = {}
    with ReaderPool(workers=2, batch_size=8) as pool:
        for job in jobs:
            pool.submit(job)
        for stream in pool.results():
            try:
                got, _ = collect(stream)
                outcome[stream.slide_id] = got
            except SlideError as exc:
                outcome[stream.slide_id] = exc
    assert isinstance(outcome["corrupt"], ReadError) and "(x=" in str(outcome["corrupt"])
    assert isinstance(outcome["empty"], SlideOpenError)
    for job in (jobs[0], jobs[3], jobs[4]):
        got = outcome[job.slide_id]
        assert isinstance(got, dict) and sorted(got) == list(range(len(job.plan))), job.slide_id
        with PatchReader(job.plan, job.path, batch_size=8) as r:
            ref, _ = collect(r)
        assert all((got[i] == ref[i]).all() for i in ref), job.slide_id


def test_pool_inline_and_skip_mode(fixture_slides):
    fx = fixture_slides["broken_corrupt_tile"]
    plan = grid_plan(fx.path, 0, 256)
    with ReaderPool(workers=0, batch_size=8, skip_bad_patches=True) as pool:
        pool.submit(SlideJob("c", str(fx.path), plan))
        for stream in pool.results():
            got, _ = collect(stream)
            assert stream.n_bad == 1 and len(got) == len(plan) - 1 and "(x=" in stream.bad_reasons[0]


def test_killed_worker_fails_the_slide_and_pool_goes_on(fixture_slides):
    path = fixture_slides["svs40"].path
    plan = grid_plan(path, 0, 512, 0)
    with ReaderPool(workers=1, batch_size=2) as pool:
        assert pool.wait_ready(120)
        (pid,) = pool.pids
        os.kill(pid, signal.SIGSTOP)  # hold it still so that it holds tasks when it dies
        pool.submit(SlideJob("victim", str(path), plan))
        pool.submit(SlideJob("after", str(path), plan))
        os.kill(pid, signal.SIGKILL)
        results = {}
        for stream in pool.results():
            try:
                got, _ = collect(stream)
                results[stream.slide_id] = len(got)
            except SlideError as exc:
                results[stream.slide_id] = str(exc)
        assert pool.pids[0] != pid
    assert "reader worker process died" in results["victim"] and "SIGKILL" in results["victim"]
    assert str(path) in results["victim"]
    assert results["after"] == len(plan)


# ------------------------------------------------------------------------------------------- device, CLI
def test_device_feeder_cpu():
    px = np.random.default_rng(2).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    t = DeviceFeeder("cpu")(px)
    assert tuple(t.shape) == (3, 3, 224, 224) and str(t.dtype) == "torch.uint8"
    assert (t.permute(0, 2, 3, 1).numpy() == px).all()
    px[:] = 0  # the tensor owns its memory (pool slots get reused)
    assert int(t.sum()) > 0


@pytest.mark.gpu
def test_device_feeder_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    px = np.random.default_rng(2).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    feeder = DeviceFeeder("cuda")
    for _ in range(3):
        t = feeder(px)
    assert t.is_cuda and (t.permute(0, 2, 3, 1).cpu().numpy() == px).all()


def test_bench_read_cli(fixture_slides):
    from click.testing import CliRunner

    from mstar_extract.cli import main

    res = CliRunner().invoke(main, ["bench", "read", str(fixture_slides["svs40"].path), "--workers", "0", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    for key in ("patches_per_s", "device", "batch_size", "workers", "precision", "n_patches", "seconds"):
        assert key in doc
    assert doc["n_patches"] > 0 and doc["precision"] is None and doc["workers"] == 0
    assert doc["slides"][0]["read"] == doc["n_patches"] and doc["decode"] == "full"
    res = CliRunner().invoke(main, ["bench", "read", str(fixture_slides["svs40"].path), "--workers", "0", "--json",
                                    "--fast-decode"])
    assert res.exit_code == 0, res.output
    fast = json.loads(res.stdout)
    assert fast["decode"] == "reduced" and fast["n_patches"] == doc["n_patches"]


def test_workers_exit_when_the_main_process_dies(fixture_slides, tmp_path):
    """SIGKILL of the main process (or SIGTERM without handler): its reader workers go away on their own."""
    import subprocess
    import sys
    import time

    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, time\n"
        "from mstar_extract.reading import ReaderPool\n"
        "if __name__ == '__main__':\n"
        "    pool = ReaderPool(workers=2)\n"
        "    pool.wait_ready(120)\n"
        "    print(' '.join(map(str, pool.pids)), flush=True)\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 20
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in pids if _alive(p)]
        assert not alive, f"reader workers {alive} outlived their parent"
    finally:
        if proc.poll() is None:
            proc.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_workers_never_rerun_the_callers_main(fixture_slides):
    """Reader workers need only this package: an unguarded script's top level runs once (not once per worker), and
    code piped to ``python -`` (no importable main file) works."""
    import subprocess
    import sys

    path = fixture_slides["svs20"].path
    code = (
        "print('TOP-LEVEL', flush=True)\n"
        "from mstar_extract.reading import ReaderPool, SlideJob\n"
        "from mstar_extract.tiling import ReadPlan\n"
        "import numpy as np\n"
        f"plan = ReadPlan(coords=np.array([[0, 0], [256, 0], [0, 256]]), level=0, level_downsample=1.0, read_size=256,\n"
        "                patch_size=256, patch_size_level0=256, target_mpp=0.5, target_magnification=20.0, level0_mpp=0.5,\n"
        "                level0_magnification=20.0, level0_width=4096, level0_height=4096)\n"
        "with ReaderPool(workers=2, batch_size=2) as pool:\n"
        f"    pool.submit(SlideJob('s', {str(path)!r}, plan))\n"
        "    n = sum(len(b) for s in pool.results() for b in s)\n"
        "print('PATCHES', n, flush=True)\n"
    )
    r = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("TOP-LEVEL") == 1, r.stdout
    assert "PATCHES 3" in r.stdout and "Traceback" not in r.stderr, r.stdout + r.stderr
