#!/usr/bin/env python
"""The pipeline's share of model-only throughput (``mstar bench extract`` / ``mstar bench model``), for one or
more checkouts of mstar, measured interleaved on the same machine.

Builds (once, cached in --slide-dir) four 20x SVS slides with tissue (~1,200 patches of 128 px in all), then
repeats ``--rounds`` times, for each checkout in turn: ``mstar bench model`` (synthetic batches, ``--seconds``),
``mstar bench extract`` over the slides and ``mstar bench model`` again (the model-only figure is the mean of the
two around the extract), each a fresh process of that checkout's code (``PYTHONPATH``).
Reports per checkout the medians of both throughputs and of their ratio (the share), with the 1-minute load
average at each measurement (the machine may be shared). ``bench extract`` leaves out the model's warm-up batch
where the checkout reports it (``warmup_seconds``), as ``bench model`` leaves out its own; the share with the
warm-up counted is printed too.

Usage::

    python benchmarks/pipeline_share.py --checkout before=/path/to/old --checkout after=. \\
        [--model timm:regnetx_002] [--device cpu] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path


def build_slides(folder: Path) -> Path:
    from mstar_extract.testing.fixtures import make_svs
    from mstar_extract.testing.scene import random_scene

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        path = folder / f"b{i}.svs"
        if not path.is_file():
            scene = random_scene(3000.0, 2400.0, seed=30 + i, n_blobs=2, holes=False, pen=False, dust=False,
                                 faint=False)
            make_svs(path, scene, mpp=0.5, magnification=20, levels=(1, 4, 16), associated=False)
    return folder


def bench(checkout: Path, args: list[str]) -> dict:
    """One ``mstar bench ... --json`` of ``checkout``'s code, with the load average before it."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "MSTAR_PROGRESS_INTERVAL": "3600"}
    load = os.getloadavg()[0]
    # cwd: ``python -m`` puts the working folder first on sys.path, before PYTHONPATH
    r = subprocess.run([sys.executable, "-m", "mstar_extract", "bench", *args, "--json", "-q"], capture_output=True,
                       text=True, env=env, cwd=checkout, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{checkout}: mstar bench {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return {**json.loads(r.stdout), "load1": load}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkout", action="append", required=True, metavar="NAME=PATH",
                    help="A checkout of mstar to measure (repeatable).")
    ap.add_argument("--slide-dir", default="/tmp/mstar-bench-share")
    ap.add_argument("--model", default="timm:regnetx_002")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    checkouts = {name: Path(path).resolve() for name, path in (c.split("=", 1) for c in a.checkout)}
    slides = build_slides(Path(a.slide_dir))
    common = ["--model", a.model, "--device", a.device, "--batch-size", str(a.batch_size)]
    rows: dict[str, list[dict]] = {name: [] for name in checkouts}
    for rnd in range(a.rounds):
        for name, path in checkouts.items():
            before = bench(path, ["model", *common, "--seconds", str(a.seconds)])
            ext = bench(path, ["extract", str(slides), *common, "--workers", str(a.workers), "--patch-size", "128"])
            after = bench(path, ["model", *common, "--seconds", str(a.seconds)])
            model_pps = (before["patches_per_s"] + after["patches_per_s"]) / 2  # around the extract: less drift
            warm = ext.get("warmup_seconds") or 0.0
            row = {"round": rnd, "model_pps": model_pps, "extract_pps": ext["patches_per_s"],
                   "share": ext["patches_per_s"] / model_pps, "n_patches": ext["n_patches"],
                   "extract_s": ext["seconds"], "warmup_s": warm,
                   "share_with_warmup": ext["n_patches"] / (ext["seconds"] + warm) / model_pps,
                   "load1": (before["load1"] + ext["load1"] + after["load1"]) / 3}
            rows[name].append(row)
            print(json.dumps({"checkout": name, **row}), file=sys.stderr, flush=True)
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in
                      ("model_pps", "extract_pps", "share", "share_with_warmup", "load1")}
               for name, rs in rows.items()}
    if a.json:
        print(json.dumps({"summary": summary, "rounds": rows}, indent=2))
    else:
        print(f"{'checkout':<10} {'model p/s':>10} {'extract p/s':>12} {'share':>7} {'share+warm-up':>14} {'load1':>6}")
        for name, m in summary.items():
            print(f"{name:<10} {m['model_pps']:>10.1f} {m['extract_pps']:>12.1f} {m['share']:>7.1%} "
                  f"{m['share_with_warmup']:>14.1%} {m['load1']:>6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
