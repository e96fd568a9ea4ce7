#!/usr/bin/env python
"""How fast segmentation reads a slide without a pyramid, strip by strip (the bound behind ``--max-read-pixels``).

Builds (once, cached in --slide-dir) a tiled JPEG TIFF without a pyramid (default 12288 x 12288 px, 0.25 µm/px,
every tile an H&E texture crop; :func:`mstar_extract.testing.bombs.write_flat_tiff`), then reads it the way
segmentation does (:func:`mstar_extract.slides.downsample.read_downsampled` at 8 µm/px: level 0 in 48 MB strips,
each downscaled) with OpenSlide and with tiffslide, alternating, ``--repeat`` times. Reports the median as
megapixels of level 0 per wall-clock second and per CPU-second (all threads; robust on a shared, loaded machine),
and what the 2-gigapixel default of ``--max-read-pixels`` costs at that rate.
Usage: ``python benchmarks/strip_read.py [--slide-dir DIR] [--side 12288] [--repeat 3] [--json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def measure(path: Path, backend: str) -> tuple[float, float]:
    """(wall s, CPU s) of one segmentation-style read of ``path`` with ``backend``."""
    from mstar_extract.slides import open_slide
    from mstar_extract.slides.downsample import read_downsampled

    with open_slide(path, backend=backend, mpp=0.25) as slide:
        t0, c0 = time.perf_counter(), time.process_time()
        read_downsampled(slide, 32.0)
        return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slide-dir", type=Path, default=Path("/tmp/mstar-bench"))
    ap.add_argument("--side", type=int, default=12288)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from mstar_extract.slides.limits import DEFAULT_MAX_READ_PIXELS
    from mstar_extract.testing.bombs import write_flat_tiff

    args.slide_dir.mkdir(parents=True, exist_ok=True)
    path = args.slide_dir / f"flat_{args.side}.tif"
    if not path.is_file():
        write_flat_tiff(path, args.side, args.side)
    mpx = args.side * args.side / 1e6
    runs: dict[str, list[tuple[float, float]]] = {"openslide": [], "tiffslide": []}
    for _ in range(args.repeat):
        for backend in runs:
            runs[backend].append(measure(path, backend))
    doc = {"slide": str(path), "megapixels": mpx}
    for backend, rs in runs.items():
        wall, cpu = statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs)
        doc[backend] = {"mpx_per_s": round(mpx / wall, 1), "mpx_per_cpu_s": round(mpx / cpu, 1),
                        "default_limit_cpu_s": round(DEFAULT_MAX_READ_PIXELS / 1e6 / (mpx / cpu))}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        for backend in runs:
            d = doc[backend]
            print(f"{backend:9s} {d['mpx_per_s']:7.1f} Mpx/s wall  {d['mpx_per_cpu_s']:7.1f} Mpx per CPU-s  "
                  f"-> 2 gigapixels = {d['default_limit_cpu_s']} CPU-s")


if __name__ == "__main__":
    main()
