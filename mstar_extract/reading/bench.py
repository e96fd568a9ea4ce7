"""Reader throughput measurement (used by ``mstar bench read`` and ``benchmarks/reader_vs_naive.py``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mstar_extract.errors import SlideError
from mstar_extract.reading.pool import ReaderPool, SlideJob
from mstar_extract.reading.reader import DEFAULT_OUT_SIZE, read_patches_naive


@dataclass
class ReadBenchResult:
    """What ``mstar bench read --json`` prints (plus per-slide rows)."""

    patches_per_s: float
    n_patches: int
    seconds: float
    workers: int
    batch_size: int
    method: str
    startup_seconds: float = 0.0
    decode: str = "full"
    device: str = "cpu"
    precision: None = None
    slides: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"benchmark": "read", "patches_per_s": self.patches_per_s, "device": self.device,
                "batch_size": self.batch_size, "workers": self.workers, "precision": self.precision,
                "n_patches": self.n_patches, "seconds": self.seconds, "method": self.method, "decode": self.decode,
                "startup_seconds": self.startup_seconds, "cpu_count": os.cpu_count(), "slides": self.slides}


def bench_read(jobs: Sequence[SlideJob], workers: int = 1, batch_size: int = 256, out_size: int = DEFAULT_OUT_SIZE,
               method: str = "auto", decode: str = "full",
               on_slide: Callable[[dict[str, Any]], None] | None = None) -> ReadBenchResult:
    """Time producing every model-ready uint8 patch of ``jobs`` with a :class:`ReaderPool`.

    ``method="naive"`` times :func:`read_patches_naive` (one ``read_region`` per patch) in this process instead.
    ``decode`` is ``full`` (the reference's pixels) or ``reduced`` (``--fast-decode``).
    The clock starts when the pool's workers are up (``startup_seconds`` reports that part) and stops after the
    last batch; each batch's pixels are touched (checksum) so nothing is skipped lazily.
    """
    rows: list[dict[str, Any]] = []
    total = 0
    if method == "naive":
        t0 = time.perf_counter()
        for job in jobs:
            ts = time.perf_counter()
            row: dict[str, Any] = {"slide_id": job.slide_id, "n_patches": len(job.plan), "error": None}
            try:
                px = read_patches_naive(job.plan, job.path, job.backend, out_size)
                total += px.shape[0]
            except SlideError as exc:
                row["error"] = str(exc)
            row["seconds"] = time.perf_counter() - ts
            rows.append(row)
            if on_slide:
                on_slide(row)
        dt = time.perf_counter() - t0
        return ReadBenchResult(total / dt if dt > 0 else 0.0, total, dt, 0, batch_size, "naive", slides=rows,
                               decode="full")
    ts0 = time.perf_counter()
    with ReaderPool(workers=workers, batch_size=batch_size, out_size=out_size, method=method,
                    decode=decode) as pool:
        pool.wait_ready()
        startup = time.perf_counter() - ts0
        t0 = time.perf_counter()
        for job in jobs:
            pool.submit(job)
        for stream in pool.results():
            ts = time.perf_counter()
            row = {"slide_id": stream.slide_id, "n_patches": stream.n_patches, "error": None}
            n = 0
            check = 0
            try:
                for batch in stream:
                    n += len(batch)
                    check += int(batch.pixels[:, ::37, ::37].sum(dtype=np.int64)) if len(batch) else 0
            except SlideError as exc:
                row["error"] = str(exc)
            total += n
            row["seconds"] = time.perf_counter() - ts
            row["read"] = n
            rows.append(row)
            if on_slide:
                on_slide(row)
        dt = time.perf_counter() - t0
    return ReadBenchResult(total / dt if dt > 0 else 0.0, total, dt, workers, batch_size, method, startup, slides=rows,
                           decode=decode)
