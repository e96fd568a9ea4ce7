"""Whole-pipeline throughput (``mstar bench extract``): the real ``mstar extract`` run, timed.

The encoder is built and warmed up first (one batch at the batch size, compiling with ``--compile``; its load
and warm-up times are reported apart as ``model_load_seconds`` and ``warmup_seconds``, as ``bench model`` leaves
out its warm-up); then
:func:`~mstar_extract.pipeline.extract_job.run_extract` runs over the slides into ``out`` (a temporary folder
unless given) with ``overwrite=True``, so every slide is computed. The clock covers everything a user waits
for after the model is loaded: reader start-up, segmentation, tiling, reading, inference and writing bags.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mstar_extract.console import Reporter
from mstar_extract.pipeline.extract_job import ExtractSettings, default_batch_size, run_extract

if TYPE_CHECKING:
    from mstar_extract.inputs import SlideEntry
    from mstar_extract.models.encoder import Encoder


def _manifest_rows(out: Path, slide_ids: set[str]) -> list[dict[str, Any]]:
    """This run's rows of ``out``'s manifest (slides of an earlier run in a kept ``--out`` are not counted)."""
    from mstar_extract.manifest import latest_rows, read_parts

    keys = ("slide_id", "status", "error", "n_patches", "seconds", "patches_per_s", "n_bad_patches")
    return [{k: getattr(r, k) for k in keys} for r in latest_rows(read_parts(out)) if r.slide_id in slide_ids]


def _warm_up(encoder: Encoder, settings: ExtractSettings) -> float | None:
    """Seconds of the warm-up batch (before the clock); None when it failed: the run's own warm-up then meets
    the error again and stops with its one line (exit 3)."""
    try:
        return float(encoder.warm_up(settings.batch_size or default_batch_size(encoder.device.type)))
    except Exception:  # noqa: BLE001
        return None


def bench_extract(entries: Sequence[SlideEntry], settings: ExtractSettings, reporter: Reporter | None = None,
                  out: str | Path | None = None, keep: bool = False) -> dict[str, Any]:
    """Run the extraction pipeline over ``entries`` and return its throughput.

    ``out``: where the outputs go (default: a temporary folder, deleted afterwards unless ``keep``).
    Returns ``benchmark="extract", patches_per_s`` (patches written / pipeline seconds), ``device``,
    ``batch_size``, ``workers``, ``precision``, ``compile``, ``model``, ``n_slides``, ``n_patches``,
    ``seconds``, ``model_load_seconds``, ``exit_code``, ``out`` (None when deleted) and per-slide ``slides``
    rows from the manifest (status, n_patches, seconds, patches_per_s, error).
    """
    import torch

    from mstar_extract.models import Encoder

    reporter = reporter or Reporter()
    t_load = time.perf_counter()
    encoder = Encoder.create(settings.model, settings.weights, device=settings.device, precision=settings.precision,
                             compile=settings.compile, cache_dir=settings.cache_dir, token=settings.token)
    load_s = time.perf_counter() - t_load
    warmup_s = _warm_up(encoder, settings)
    tmp = None
    if out is None:
        tmp = Path(tempfile.mkdtemp(prefix="mstar-bench-extract-"))
        out_dir = tmp
    else:
        out_dir = Path(out)
    try:
        t0 = time.perf_counter()
        code = run_extract(entries, out_dir, settings, reporter, overwrite=True, on_error="skip", encoder=encoder)
        if encoder.device.type == "cuda":
            torch.cuda.synchronize(encoder.device)
        seconds = time.perf_counter() - t0
        rows = _manifest_rows(out_dir, {str(e.slide_id) for e in entries})
    finally:
        if tmp is not None and not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    n_patches = sum(r["n_patches"] or 0 for r in rows if r["status"] == "done")
    dev = encoder.device
    return {
        "benchmark": "extract",
        "patches_per_s": n_patches / seconds if seconds > 0 else 0.0,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "batch_size": settings.batch_size or default_batch_size(dev.type),
        "workers": settings.workers,
        "precision": encoder.precision,
        "compile": encoder.compile,
        "model": encoder.name,
        "weights": encoder.weights.description,
        "n_slides": len(entries),
        "n_patches": n_patches,
        "seconds": seconds,
        "model_load_seconds": load_s,
        "warmup_seconds": warmup_s,
        "exit_code": code,
        "out": None if (tmp is not None and not keep) else str(out_dir),
        "torch": torch.__version__,
        "slides": rows,
    }
