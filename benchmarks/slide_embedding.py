#!/usr/bin/env python
"""Time and peak memory of one slide embedding (the stage-1 TransMIL at the paper's size: 1024 -> 512, 8 heads,
256 landmarks) over all N patches of a slide, on the CPU or a GPU; each N runs in a fresh process.

    python benchmarks/slide_embedding.py --patches 1000 5000 20000 50000 [--device cpu|cuda] [--threads 2]

Prints one JSON line per N: seconds of the forward (after one warm-up on 256 patches) and the process's peak
resident memory (CPU) or peak CUDA memory. Results: docs/downstream.md, "Slide embeddings".
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(n: int, device: str, threads: int) -> dict:
    import numpy as np
    import torch

    from mstar_extract.downstream.aggregator import SlideEncoder
    from mstar_extract.pretrain.stage1.transmil import TransMIL

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    enc = SlideEncoder(TransMIL().eval().to(device), None, "", None, torch.device(device))  # type: ignore[arg-type]
    x = np.random.default_rng(0).normal(size=(n, 1024)).astype(np.float32)
    enc.embed(x[:256])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    emb = enc.embed(x)
    seconds = time.perf_counter() - t0
    out = {"patches": n, "device": device, "threads": threads, "seconds": round(seconds, 3), "dim": int(emb.shape[0]),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "rss_before_mb": round(base)}
    if device.startswith("cuda"):
        out["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patches", type=int, nargs="+", default=[1000, 5000, 20000])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.device, a.threads)))
        return
    for n in a.patches:
        subprocess.run([sys.executable, __file__, "--one", str(n), "--device", a.device, "--threads", str(a.threads)],
                       check=True)


if __name__ == "__main__":
    main()
