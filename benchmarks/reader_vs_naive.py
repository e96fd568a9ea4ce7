#!/usr/bin/env python
"""Our reader, exact and ``--fast-decode``, vs the naive per-patch loop of the reference, on the same coordinates.

Builds (once, cached in --slide-dir) a 40x Aperio SVS with tissue (default 24000 x 16000 px, 0.25 µm/px, JPEG
tiles), tiles it with mstar's defaults (20x, 256-px patches -> 512-px reads at level 0), then times:

* naive: the mSTAR reference per patch — OpenSlide ``read_region`` -> ``convert('RGB')`` -> torchvision
  ``Resize(224)`` (PIL bilinear), written in :mod:`mstar_extract.testing.official` without the reader's code;
* exact: our reader with ``--workers`` reader process(es) (default 1), ``decode="full"`` (the default);
* fast: the same with ``decode="reduced"`` (``--fast-decode``).

Rounds are interleaved (naive, exact, fast, repeated) and the median is reported, as wall-clock patches/s and as
patches per CPU-second (worker + main process; robust on a shared, loaded machine). The uint8 inputs of each path
are compared with the naive ones: exact must be identical (max |diff| 0).
Usage: ``python benchmarks/reader_vs_naive.py [--slide-dir DIR] [--width 24000 --height 16000] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def build_slide(folder: Path, width: int, height: int) -> Path:
    from mstar_extract.testing.fixtures import make_large_svs

    path = folder / f"bench40x_{width}x{height}.svs"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        tmp = path.with_name(path.name + ".tmp.svs")
        make_large_svs(tmp, width=width, height=height, mpp=0.25, seed=3, quality=75)
        os.replace(tmp, path)
        print(f"built {path} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    return path


def _cpu_of(pids: list[int]) -> float:
    """User + system CPU seconds of processes (Linux /proc; 0 elsewhere)."""
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            pass
    return total


def _time_pool(pool, path: Path, plan, tag: str, out) -> tuple[float, float]:
    from mstar_extract.reading import SlideJob

    c, t, wc = time.process_time(), time.perf_counter(), _cpu_of(pool.pids)
    pool.submit(SlideJob(tag, str(path), plan, "openslide"))
    for stream in pool.results():
        for batch in stream:
            out[batch.indices] = batch.pixels
    return time.perf_counter() - t, time.process_time() - c + _cpu_of(pool.pids) - wc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slide-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mstar-bench")
    ap.add_argument("--slide", type=Path, default=None, help="use this 40x slide instead of building one")
    ap.add_argument("--width", type=int, default=24000)
    ap.add_argument("--height", type=int, default=16000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-patches", type=int, default=0, help="use only the first N patches (0 = all)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np

    from mstar_extract.pipeline.tile_job import TileSettings, segment_and_plan
    from mstar_extract.reading import ReaderPool
    from mstar_extract.slides import open_slide
    from mstar_extract.testing.official import compare_uint8, reference_uint8

    path = args.slide or build_slide(args.slide_dir, args.width, args.height)
    with open_slide(path, backend="openslide") as slide:
        _, plan = segment_and_plan(slide, path.stem, TileSettings(backend="openslide"))
        dims = slide.dimensions
    if args.max_patches:
        plan.coords = plan.coords[: args.max_patches]
    n = len(plan)
    print(f"{path.name}: {dims[0]}x{dims[1]} px, {n} patches of {plan.patch_size} px at 20x "
          f"(level {plan.level}, {plan.read_size}-px reads) -> 224 px", file=sys.stderr)

    keys = ("naive", "exact", "fast")
    wall: dict[str, list[float]] = {k: [] for k in keys}
    cpu: dict[str, list[float]] = {k: [] for k in keys}
    px = {k: np.empty((n, 224, 224, 3), np.uint8) for k in ("exact", "fast")}
    naive = np.empty((0,))
    with ReaderPool(workers=args.workers, batch_size=args.batch_size, decode="full") as exact, \
            ReaderPool(workers=args.workers, batch_size=args.batch_size, decode="reduced") as fast:
        exact.wait_ready(120)
        fast.wait_ready(120)
        for r in range(args.rounds):  # interleaved rounds: a load change on a shared machine hits all three
            c, t = time.process_time(), time.perf_counter()
            naive = reference_uint8(path, plan.coords, plan.level, plan.read_size)
            wall["naive"].append(time.perf_counter() - t)
            cpu["naive"].append(time.process_time() - c)
            for key, pool in (("exact", exact), ("fast", fast)):
                w, cp = _time_pool(pool, path, plan, f"{path.stem}-{key}-{r}", px[key])
                wall[key].append(w)
                cpu[key].append(cp)
    diffs = {k: compare_uint8(px[k], naive) for k in px}

    def pps(xs: list[float]) -> float:
        return n / float(np.median(xs)) if xs else 0.0

    res = {
        "slide": str(path), "width": dims[0], "height": dims[1], "n_patches": n, "read_level": plan.level,
        "read_size": plan.read_size, "rounds": args.rounds, "workers": args.workers, "batch_size": args.batch_size,
        "cpu_count": os.cpu_count(),
        "wall_patches_per_s": {k: pps(v) for k, v in wall.items()},
        "cpu_patches_per_s": {k: pps(v) for k, v in cpu.items()},
        "vs_naive": {k: {"max_abs": d.max_abs, "mean_abs": d.mean_abs} for k, d in diffs.items()},
    }
    w, cp = res["wall_patches_per_s"], res["cpu_patches_per_s"]
    res["ratio_wall"] = {k: w[k] / w["naive"] for k in keys}
    res["ratio_cpu"] = {k: cp[k] / cp["naive"] for k in keys}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        labels = {"naive": "naive read_region + PIL loop", "exact": f"exact, {args.workers} worker",
                  "fast": f"--fast-decode, {args.workers} worker"}
        print(f"{'':32s} {'wall patches/s':>15s} {'x naive':>8s} {'CPU patches/s':>14s} {'x naive':>8s} "
              f"{'max|d|':>7s} {'mean|d|':>8s}")
        for k in keys:
            d = diffs.get(k)
            dm = f"{d.max_abs:7d} {d.mean_abs:8.3f}" if d else f"{'ref':>7s} {'ref':>8s}"
            print(f"{labels[k]:32s} {w[k]:15.1f} {w[k] / w['naive']:8.2f} {cp[k]:14.1f} {cp[k] / cp['naive']:8.2f} {dm}")
        print(f"median of {args.rounds} interleaved rounds; CPU = process time (worker + main for the pool); "
              f"|d| = uint8 grey levels vs the naive reference")
    return 0 if diffs["exact"].identical else 1


if __name__ == "__main__":
    sys.exit(main())
