#!/usr/bin/env python
"""Our reader vs the naive per-patch ``read_region`` loop, on the same coordinates, in one run.

Builds (once, cached in --slide-dir) a 40x Aperio SVS with tissue (default 16000 x 12000 px, 0.25 µm/px, JPEG
tiles), tiles it with mstar's defaults (20x, 256-px patches -> 512-px reads at level 0), then times:

* naive: one OpenSlide ``read_region`` per patch + the same resize to 224 (what CLAM/TRIDENT/mSTAR's script do);
* ours, ``--workers`` reader process(es) (default 1) through :class:`ReaderPool`, and in-process (workers=0).

Rounds are interleaved (naive, pool, in-process, repeated) and the median is reported, as wall-clock patches/s and
as patches per CPU-second (robust on a shared, loaded machine). Also checks the pixels against the naive ones.
Usage: ``python benchmarks/reader_vs_naive.py [--slide-dir DIR] [--width 16000 --height 12000] [--json]``
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slide-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mstar-bench")
    ap.add_argument("--slide", type=Path, default=None, help="use this 40x slide instead of building one")
    ap.add_argument("--width", type=int, default=16000)
    ap.add_argument("--height", type=int, default=12000)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-patches", type=int, default=0, help="use only the first N patches (0 = all)")
    ap.add_argument("--no-dct", action="store_true", help="decode JPEG tiles at full size (exact pixels)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np

    from mstar_extract.pipeline.tile_job import TileSettings, segment_and_plan
    from mstar_extract.reading import PatchReader, ReaderPool, SlideJob, read_patches_naive
    from mstar_extract.slides import open_slide

    path = args.slide or build_slide(args.slide_dir, args.width, args.height)
    with open_slide(path, backend="openslide") as slide:
        _, plan = segment_and_plan(slide, path.stem, TileSettings(backend="openslide"))
        dims = slide.dimensions
    if args.max_patches:
        plan.coords = plan.coords[: args.max_patches]
    print(f"{path.name}: {dims[0]}x{dims[1]} px, {len(plan)} patches of {plan.patch_size} px at 20x "
          f"(level {plan.level}, {plan.read_size}-px reads) -> 224 px", file=sys.stderr)

    n = len(plan)
    wall: dict[str, list[float]] = {"naive": [], "pool": [], "inproc": []}
    cpu: dict[str, list[float]] = {"naive": [], "pool": [], "inproc": []}
    dct = not args.no_dct
    ours = np.empty((n, 224, 224, 3), np.uint8)
    method = "?"
    with ReaderPool(workers=args.workers, batch_size=args.batch_size, dct_scaling=dct) as pool:
        pool.wait_ready(120)
        for r in range(args.rounds):  # interleaved rounds: a load change on a shared machine hits all three
            c, t = time.process_time(), time.perf_counter()
            naive = read_patches_naive(plan, path, backend="openslide")
            wall["naive"].append(time.perf_counter() - t)
            cpu["naive"].append(time.process_time() - c)

            c, t, wc = time.process_time(), time.perf_counter(), _cpu_of(pool.pids)
            pool.submit(SlideJob(f"{path.stem}-{r}", str(path), plan, "openslide"))
            for stream in pool.results():
                for batch in stream:
                    ours[batch.indices] = batch.pixels
            wall["pool"].append(time.perf_counter() - t)
            cpu["pool"].append(time.process_time() - c + _cpu_of(pool.pids) - wc)

            c, t = time.process_time(), time.perf_counter()
            with PatchReader(plan, path, "openslide", batch_size=args.batch_size, dct_scaling=dct) as reader:
                method = f"{reader.method}, decode scale 1/{reader.decode_scale}"
                for batch in reader:
                    ours[batch.indices] = batch.pixels
            wall["inproc"].append(time.perf_counter() - t)
            cpu["inproc"].append(time.process_time() - c)
    diff = int(np.abs(ours.astype(np.int16) - naive.astype(np.int16)).max()) if n else 0
    mean_diff = float(np.abs(ours.astype(np.int16) - naive.astype(np.int16)).mean()) if n else 0.0

    def pps(xs: list[float]) -> float:
        return n / float(np.median(xs)) if xs else 0.0

    res = {
        "slide": str(path), "n_patches": n, "read_level": plan.level, "read_size": plan.read_size, "rounds": args.rounds,
        "ours_method": method, "workers": args.workers, "batch_size": args.batch_size, "cpu_count": os.cpu_count(),
        "wall_patches_per_s": {k: pps(v) for k, v in wall.items()},
        "cpu_patches_per_s": {k: pps(v) for k, v in cpu.items()},
        "max_abs_pixel_diff": diff, "mean_abs_pixel_diff": mean_diff,
    }
    w, cp = res["wall_patches_per_s"], res["cpu_patches_per_s"]
    res["ratio_pool_vs_naive"] = w["pool"] / w["naive"]
    res["ratio_pool_vs_naive_cpu"] = cp["pool"] / cp["naive"]
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{'':26s} {'wall patches/s':>15s} {'ratio':>7s} {'CPU patches/s':>15s} {'ratio':>7s}")
        for key, label in (("naive", "naive read_region loop"), ("pool", f"ours, {args.workers} worker process"),
                           ("inproc", "ours, in-process")):
            print(f"{label:26s} {w[key]:15.1f} {w[key] / w['naive']:7.2f} {cp[key]:15.1f} {cp[key] / cp['naive']:7.2f}")
        print(f"path: {method}; median of {args.rounds} interleaved rounds; CPU = process time (worker + main for "
              f"the pool); pixel |ours - naive|: max {diff}, mean {mean_diff:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
