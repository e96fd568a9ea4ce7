#!/usr/bin/env python
"""`mstar tile` vs a CLAM-style baseline on one large 40x SVS: whole-process wall time and peak RSS.

The baseline re-implements (it does not copy) the default segmentation + patching of CLAM's
``create_patches_fp.py --seg --patch`` (mahmoodlab/CLAM, ``wsi_core/WholeSlideImage.py``), as documented there:

* segmentation level = the level closest to downsample 64; that whole level is read with OpenSlide;
* RGB -> HSV, median blur (7) of saturation, binary threshold at ``sthresh = 8``, closing with a 4x4 kernel;
* contours with ``RETR_CCOMP``; tissue kept when its area (net of holes) exceeds ``a_t = 100`` reference patches
  (512 x 512 level-0 px, scaled to the segmentation level), at most ``max_n_holes = 8`` holes of area > ``a_h = 16``;
* the mask picture (contours drawn on the level nearest downsample 64) is saved as a JPEG;
* patching at level 0 over each contour's bounding box with step = patch size, a candidate kept when any of the
  four points at +-patch/4 around its centre lies in the contour ("four_pt") and its centre is not in a hole,
  tested in a ``multiprocessing.Pool(4)`` per contour (as CLAM does); coords written to ``patches/<id>.h5``.

The patch size is 512 level-0 px (= 256 px at 20x, the same footprint ``mstar tile`` uses by default).
CLAM also imports pandas and matplotlib at start-up; the baseline does not (they are not installed here),
which favours the baseline.

Run:  python benchmarks/tile_vs_clam.py [--workdir DIR] [--repeat 3] [--json]
The slide (30000 x 20000, 40x, built with ``mstar_extract.testing.fixtures.make_large_svs``) is cached in DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# ------------------------------------------------------------------------------------------------ baseline
def clam_baseline(slide_path: str, out_dir: str, patch_size: int = 512, a_t: float = 100.0) -> int:
    """CLAM's default create_patches_fp.py segmentation + patching (re-implemented); returns #patches."""
    import multiprocessing as mp

    import cv2
    import h5py
    import numpy as np
    import openslide
    from PIL import Image

    out = Path(out_dir)
    (out / "patches").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    name = Path(slide_path).stem
    wsi = openslide.open_slide(slide_path)
    dims = wsi.level_dimensions
    downs = [(dims[0][0] / w, dims[0][1] / h) for w, h in dims]
    seg_level = wsi.get_best_level_for_downsample(64) if len(dims) > 1 else 0

    # --- segmentation
    img = np.array(wsi.read_region((0, 0), seg_level, dims[seg_level]))
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    med = cv2.medianBlur(hsv[:, :, 1], 7)
    _, binary = cv2.threshold(med, 8, 255, cv2.THRESH_BINARY)
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((4, 4), np.uint8))
    sx, sy = downs[seg_level]
    ref_area = int(512 ** 2 / (sx * sy))
    a_t, a_h, max_holes = a_t * ref_area, 16 * ref_area, 8
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    tissue, holes_all = [], []
    if hierarchy is not None:
        hier = np.squeeze(hierarchy, axis=(0,))[:, 2:]
        for ci in np.flatnonzero(hier[:, 1] == -1):
            hole_ids = np.flatnonzero(hier[:, 1] == ci)
            area = cv2.contourArea(contours[ci]) - sum(cv2.contourArea(contours[h]) for h in hole_ids)
            if area == 0 or area <= a_t:
                continue
            hs = sorted((contours[h] for h in hole_ids), key=cv2.contourArea, reverse=True)[:max_holes]
            tissue.append(contours[ci])
            holes_all.append([h for h in hs if cv2.contourArea(h) > a_h])
    scale = np.array([sx, sy])
    tissue = [np.array(c * scale, dtype=np.int32) for c in tissue]
    holes_all = [[np.array(h * scale, dtype=np.int32) for h in hs] for hs in holes_all]

    # --- mask picture (visWSI at the level nearest downsample 64)
    vis_level = seg_level
    vis = np.array(wsi.read_region((0, 0), vis_level, dims[vis_level]).convert("RGB"))
    inv = 1.0 / np.array(downs[vis_level])
    thick = max(1, int(250 * float(np.sqrt(inv[0] * inv[1]))))
    cv2.drawContours(vis, [np.array(c * inv, dtype=np.int32) for c in tissue], -1, (0, 255, 0), thick)
    for hs in holes_all:
        cv2.drawContours(vis, [np.array(h * inv, dtype=np.int32) for h in hs], -1, (0, 0, 255), thick)
    Image.fromarray(vis).save(out / "masks" / f"{name}.jpg")

    # --- patching
    all_coords = []
    for cont, hs in zip(tissue, holes_all, strict=True):
        x0, y0, w, h = cv2.boundingRect(cont)
        xs, ys = np.arange(x0, x0 + w, patch_size), np.arange(y0, y0 + h, patch_size)
        gx, gy = np.meshgrid(xs, ys, indexing="ij")
        cands = np.stack([gx.ravel(), gy.ravel()], axis=1)
        with mp.Pool(min(4, mp.cpu_count())) as pool:
            res = pool.starmap(_clam_check, [(c, cont, hs, patch_size) for c in cands])
        kept = [c for c, ok in zip(cands, res, strict=True) if ok]
        all_coords.extend(kept)
    if all_coords:
        with h5py.File(out / "patches" / f"{name}.h5", "w") as f:
            d = f.create_dataset("coords", data=np.asarray(all_coords, np.int64))
            d.attrs.update({"patch_size": patch_size, "patch_level": 0, "downsample": downs[0],
                            "downsampled_level_dim": dims[0], "level_dim": dims[0], "name": name})
    wsi.close()
    return len(all_coords)


def _clam_check(coord, cont, holes, patch_size: int) -> bool:
    """CLAM's four_pt contour test plus its hole test (centre strictly inside a hole -> rejected)."""
    import cv2

    cx, cy = coord[0] + patch_size // 2, coord[1] + patch_size // 2
    s = patch_size // 4
    if not any(cv2.pointPolygonTest(cont, (float(px), float(py)), False) >= 0
               for px, py in ((cx - s, cy - s), (cx + s, cy + s), (cx + s, cy - s), (cx - s, cy + s))):
        return False
    centre = (float(coord[0] + patch_size / 2), float(coord[1] + patch_size / 2))
    return not any(cv2.pointPolygonTest(h, centre, False) > 0 for h in holes)


# ------------------------------------------------------------------------------------------------ harness
def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; wall seconds and the peak RSS (MiB) of that process (os.wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {err.strip()[-500:]}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024.0}


def mstar_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "mstar"
    return [str(exe)] if exe.exists() else [sys.executable, "-c", "from mstar_extract.cli import main; main()"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mstar-bench-tile")
    ap.add_argument("--width", type=int, default=30000)
    ap.add_argument("--height", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--clam-a-t", type=float, default=100.0,
                    help="CLAM's a_t tissue-area filter in reference patches (default 100 = CLAM's default; with it "
                         "CLAM drops every tissue piece of this synthetic slide, so 1 shows CLAM's patching cost)")
    ap.add_argument("--clam-baseline", nargs=3, metavar=("SLIDE", "OUT", "A_T"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.clam_baseline:
        slide_arg, out_arg, a_t_arg = args.clam_baseline
        n = clam_baseline(slide_arg, out_arg, a_t=float(a_t_arg))
        print(n)
        return 0

    args.workdir.mkdir(parents=True, exist_ok=True)
    slide = args.workdir / f"large_{args.width}x{args.height}.svs"
    if not slide.exists():
        # built in a child process: this harness stays small, because a child's peak RSS (ru_maxrss) counts
        # the memory of the parent it was forked from
        t0 = time.perf_counter()
        tmp = slide.with_name("." + slide.name + ".building")
        code = ("import sys; from mstar_extract.testing.fixtures import make_large_svs; "
                "make_large_svs(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))")
        subprocess.run([sys.executable, "-c", code, str(tmp), str(args.width), str(args.height)], check=True)
        tmp.rename(slide)
        print(f"built {slide} ({slide.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    env = {**os.environ, "MSTAR_PROGRESS_INTERVAL": "3600"}
    runs: dict[str, list[dict]] = {"mstar": [], "clam": []}
    for i in range(args.repeat):  # alternate, so both see the same machine load
        for key in ("clam", "mstar") if i % 2 else ("mstar", "clam"):
            out = args.workdir / f"out_{key}"
            shutil.rmtree(out, ignore_errors=True)
            if key == "mstar":
                cmd = mstar_cmd() + ["tile", str(slide), str(out), "--workers", "1", "--quiet"]
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--clam-baseline", str(slide), str(out), str(args.clam_a_t)]
            runs[key].append(measure(cmd, env))
    import h5py  # only after every measurement (see above)

    with h5py.File(args.workdir / "out_mstar" / "coords" / f"{slide.stem}.h5", "r") as f:
        n_mstar = int(f["coords"].shape[0])
    clam_h5 = args.workdir / "out_clam" / "patches" / f"{slide.stem}.h5"
    n_clam = 0
    if clam_h5.exists():
        with h5py.File(clam_h5, "r") as f:
            n_clam = int(f["coords"].shape[0])
    summary = {
        "slide": str(slide), "size": [args.width, args.height], "repeat": args.repeat,
        "mstar_wall_s": statistics.median(r["wall_s"] for r in runs["mstar"]),
        "clam_wall_s": statistics.median(r["wall_s"] for r in runs["clam"]),
        "mstar_peak_rss_mib": max(r["peak_rss_mib"] for r in runs["mstar"]),
        "clam_peak_rss_mib": max(r["peak_rss_mib"] for r in runs["clam"]),
        "mstar_patches": n_mstar, "clam_patches": n_clam, "clam_a_t": args.clam_a_t,
        "runs": runs,
    }
    summary["ratio_mstar_over_clam"] = summary["mstar_wall_s"] / summary["clam_wall_s"]
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"slide {slide.name} ({args.width}x{args.height}, 40x), median of {args.repeat} runs, whole process:")
        print(f"  mstar tile        {summary['mstar_wall_s']:.2f} s   "
              f"peak RSS {summary['mstar_peak_rss_mib']:.0f} MiB   {n_mstar} patches")
        print(f"  CLAM-style base   {summary['clam_wall_s']:.2f} s   "
              f"peak RSS {summary['clam_peak_rss_mib']:.0f} MiB   {n_clam} patches (a_t={args.clam_a_t:g})")
        print(f"  ratio mstar/CLAM  {summary['ratio_mstar_over_clam']:.2f}  (< 1 = mstar faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
