"""``mstar extract``: tiling, reading and inference of many slides as one pipeline that keeps the model busy.

Three stages overlap (design §2)::

    planner thread      slide k+2: open, segment, tile (or read --coords-dir), write coords + QC
    reader processes    slide k+1 and k: patch batches (uint8, 224 px) into shared memory   (reading.ReaderPool)
    main thread         slide k: pinned copy -> device -> mSTAR ViT-L (AMP) -> features -> bag (atomic)

Per slide the main thread takes the slide's lock (several jobs may share OUT), checks whether a complete and
valid bag already exists (then ``skipped``), and records exactly one outcome in the manifest. The bag
``features/<slide_id>.h5`` is written last and atomically, so it is the completion marker: a run killed at any
moment leaves only complete bags, and a rerun recomputes exactly the slides without one.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mstar_extract.console import Progress, Reporter
from mstar_extract.pipeline.runner import SlideOutcome, SlideRunner
from mstar_extract.pipeline.tile_job import TileSettings, _reason, open_with_resolution, segment_and_plan, write_tile_outputs
from mstar_extract.tiling import ReadPlan

log = logging.getLogger("mstar")

FORMATS = ("h5", "pt", "both")


@dataclass(frozen=True)
class ExtractSettings:
    """Everything ``mstar extract`` needs beyond the tiling settings."""

    tile: TileSettings = field(default_factory=TileSettings)
    model: str = "mstar"
    weights: str = "hf"
    """``hf`` (Hugging Face hub, cached), ``random`` (smoke tests), or a state-dict file."""
    device: str = "auto"
    precision: str | None = None
    """``bf16``/``fp16``/``fp32``; None = bf16 on CUDA, fp32 on CPU."""
    batch_size: int | None = None
    """Patches per forward pass; None = 256 on CUDA, 32 on CPU."""
    compile: bool = False
    dtype: str = "float32"
    """Stored feature dtype: ``float32`` or ``float16``."""
    format: str = "h5"
    """``h5`` (features/<id>.h5), ``pt`` (pt_files/<id>.pt as well as the bag), ``both`` (same as pt)."""
    coords_dir: str | None = None
    """Reuse coordinates from ``mstar tile``, CLAM or TRIDENT instead of segmenting."""
    skip_bad_patches: bool = False
    workers: int = 1
    """Reader worker processes (0 = read in the main process)."""
    lookahead: int = 1
    """How many slides beyond the current one are read ahead."""
    lock_timeout: float = 600.0
    cache_dir: str | None = None
    token: str | None = None
    decode: str = "full"
    """``full``: model inputs bit-identical to the official mSTAR pipeline; ``reduced``: ``--fast-decode``
    (reduced-size JPEG decoding, docs/reader.md). Recorded in every bag as the ``decode`` attr."""


def output_paths(out_dir: str | os.PathLike[str], slide_id: str) -> dict[str, Path]:
    out = Path(out_dir)
    return {"bag": out / "features" / f"{slide_id}.h5", "pt": out / "pt_files" / f"{slide_id}.pt"}


def wants_pt(settings: ExtractSettings) -> bool:
    return settings.format in ("pt", "both")


def check_complete(entry: Any, out_dir: Path, settings: ExtractSettings, encoder: Any) -> SlideOutcome | None:
    """``skipped`` when a complete, valid bag for this model and weights exists (and the .pt when asked);
    ``failed`` when a complete bag of *other* weights is in the way; None when the slide must be computed."""
    from mstar_extract.store.bags import validate_bag

    paths = output_paths(out_dir, entry.slide_id)
    if not paths["bag"].exists():
        return None
    if validate_bag(paths["bag"]) is not None:
        return None  # incomplete or damaged: recompute
    problem = validate_bag(paths["bag"], {"model": encoder.name, "weights_sha256": encoder.weights_sha256,
                                          "feature_dim": encoder.feature_dim})
    if problem is not None:
        return SlideOutcome.failed(entry, f"{paths['bag']} exists from another model or weights ({problem}); "
                                          "use --overwrite or another OUT")
    problem = validate_bag(paths["bag"], expected_settings(settings))
    if problem is not None:
        return SlideOutcome.failed(entry, f"{paths['bag']} exists with other settings ({problem}); "
                                          "use --overwrite or another OUT")
    if wants_pt(settings) and not paths["pt"].exists():
        return None
    import h5py

    with h5py.File(paths["bag"], "r") as f:
        n = int(f["features"].shape[0])
    return SlideOutcome.skipped(entry, "", n_patches=n, extra={"bag": str(paths["bag"])})


def expected_settings(settings: ExtractSettings) -> dict[str, Any]:
    """Bag attributes that a complete bag must share with this run's options to count as done (so one OUT never
    silently mixes patch sizes, resolutions, stored dtypes or decode paths). Coordinates from ``--coords-dir`` bring
    their own geometry, so only the dtype and the decode path are compared then."""
    expect: dict[str, Any] = {"dtype": settings.dtype, "decode": settings.decode}
    if not settings.coords_dir:
        tiling = settings.tile.tiling
        expect.update(patch_size=tiling.patch_size, overlap=tiling.overlap, target_mpp=tiling.target()[0])
    return expect


# ------------------------------------------------------------------------------------------------- planning
@dataclass
class Planned:
    """A slide ready to read: its entry, read plan and level-0 mpp (or an outcome when planning ended it)."""

    entry: Any
    plan: ReadPlan | None = None
    level0_mpp: float | None = None
    outcome: SlideOutcome | None = None
    t0: float = 0.0


def plan_slide(entry: Any, out_dir: Path, settings: ExtractSettings) -> Planned:
    """Open, segment and tile one slide (or read its ``--coords-dir`` file). Never raises for per-slide problems."""
    t0 = time.monotonic()
    try:
        with open_with_resolution(entry, settings.tile) as slide:
            if settings.coords_dir:
                from mstar_extract.store.coords import find_coords_file, read_coords_file

                found = find_coords_file(settings.coords_dir, entry.slide_id)
                if found is None:
                    raise FileNotFoundError(f"no coordinates for slide id {entry.slide_id!r} in {settings.coords_dir}")
                plan = read_coords_file(found, slide)
                plan.settings = {**plan.settings, "coords_file": str(found)}
            else:
                mask, plan = segment_and_plan(slide, entry.slide_id, settings.tile)
                write_tile_outputs(out_dir, entry.slide_id, slide, mask, plan, settings.tile)
            mpp = float(slide.mpp) if slide.mpp_x is not None else plan.level0_mpp
    except Exception as exc:  # noqa: BLE001 - a per-slide failure, one line
        if settings.tile.debug:
            log.exception("planning %s failed", entry.path)
        return Planned(entry, outcome=SlideOutcome.failed(entry, _reason(exc), seconds=round(time.monotonic() - t0, 3)), t0=t0)
    return Planned(entry, plan=plan, level0_mpp=mpp, t0=t0)


# ------------------------------------------------------------------------------------------------- writing
def write_outputs(entry: Any, out_dir: Path, plan: ReadPlan, features: np.ndarray, keep: np.ndarray,
                  encoder: Any, settings: ExtractSettings, n_bad: int) -> Path:
    """The .pt (when asked) and then the bag (last: the completion marker), both atomic."""
    from mstar_extract.store.bags import bag_attrs, write_bag, write_pt

    paths = output_paths(out_dir, entry.slide_id)
    feats = features[keep]
    coords = plan.coords[keep]
    if wants_pt(settings):
        write_pt(paths["pt"], feats)
    attrs = bag_attrs(plan, slide_id=entry.slide_id, slide_path=str(entry.path), model=encoder.name,
                      weights_sha256=encoder.weights_sha256, feature_dim=encoder.feature_dim,
                      precision=encoder.precision, input_size=encoder.input_size, n_bad_patches=int(n_bad),
                      decode=settings.decode)
    write_bag(paths["bag"], feats, coords, attrs, dtype=settings.dtype)
    return paths["bag"]


# ------------------------------------------------------------------------------------------------- the run
class _Features:
    """Collects a slide's features on the device and moves them to the host in groups (few syncs)."""

    def __init__(self, n: int, dim: int) -> None:
        self.out = np.zeros((n, dim), np.float32)
        self.done = np.zeros(n, bool)
        self._pending: list[tuple[np.ndarray, Any]] = []

    def add(self, indices: np.ndarray, feats: Any) -> None:
        self._pending.append((np.asarray(indices).copy(), feats))
        if len(self._pending) >= 16:
            self.flush()

    def flush(self) -> None:
        for idx, f in self._pending:
            self.out[idx] = f.detach().float().cpu().numpy()
            self.done[idx] = True
        self._pending.clear()


def default_batch_size(device_type: str) -> int:
    return 256 if device_type == "cuda" else 32


def run_extract(
    entries: Sequence[Any],
    out_dir: str | os.PathLike[str],
    settings: ExtractSettings,
    reporter: Reporter | None = None,
    overwrite: bool = False,
    on_error: str = "skip",
    encoder: Any = None,
) -> int:
    """Extract features for ``entries`` into ``out_dir``; returns the exit code (0, or 1 if any slide failed).

    The model and its weights are resolved before any slide is touched: missing weights stop the run with one
    message (WeightsError) and nothing is written.
    """
    from mstar_extract.models import Encoder
    from mstar_extract.reading import DeviceFeeder, ReaderPool, SlideJob
    from mstar_extract.store.atomic import clean_stale_temps

    reporter = reporter or Reporter()
    out = Path(out_dir)
    if encoder is None:
        encoder = Encoder.create(settings.model, settings.weights, device=settings.device, precision=settings.precision,
                                 compile=settings.compile, cache_dir=settings.cache_dir, token=settings.token)
    batch_size = settings.batch_size or default_batch_size(encoder.device.type)
    reporter.info(f"model {encoder.name} ({encoder.weights.description}) on {encoder.device}, {encoder.precision}, "
                  f"batch {batch_size}, {settings.workers} reader worker(s)")
    out.mkdir(parents=True, exist_ok=True)
    # temp files of other hosts' live jobs sharing OUT (cluster file system) are kept until they are older than the lock timeout
    clean_stale_temps(out, older_than_s=settings.lock_timeout)
    runner = SlideRunner(out, reporter, total=len(entries), command="extract", lock_timeout=settings.lock_timeout)
    feeder = DeviceFeeder(encoder.device)
    pending = iter(entries)
    planning: deque[tuple[Any, Future]] = deque()
    reading: deque[Planned] = deque()
    depth = 1 + max(0, settings.lookahead)
    stop = False
    exhausted = False

    def record(outcome: SlideOutcome) -> None:
        nonlocal stop
        runner.finish(outcome)
        if outcome.status == "failed" and on_error == "fail":
            stop = True

    def take_next() -> None:
        """Start planning the next slide this process may work on."""
        nonlocal exhausted
        while not exhausted and not stop:
            entry = next(pending, None)
            if entry is None:
                exhausted = True
                return
            if getattr(entry, "error", None):
                record(SlideOutcome.failed(entry, str(entry.error), seconds=0.0))
                continue
            if not runner.begin(entry):
                record(SlideOutcome.skipped(entry, "taken by another process"))
                continue
            if not overwrite:
                done = check_complete(entry, out, settings, encoder)
                if done is not None:
                    record(done)
                    continue
            planning.append((entry, planner.submit(plan_slide, entry, out, settings)))
            return

    planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mstar-plan")
    pool = ReaderPool(workers=settings.workers, batch_size=batch_size, out_size=encoder.input_size,
                      skip_bad_patches=settings.skip_bad_patches, lookahead=settings.lookahead, decode=settings.decode)
    streams = pool.results()
    patches = Progress(reporter, None, "extract: patches", "patches", position=1)
    try:
        while True:
            while not stop and len(planning) + len(reading) < depth + 1 and not exhausted:
                take_next()
            # hand planned slides to the readers, keeping `depth` slides submitted
            while planning and len(reading) < depth and (not reading or planning[0][1].done()):
                _entry, fut = planning.popleft()
                planned: Planned = fut.result()
                if planned.outcome is not None:
                    record(planned.outcome)
                    continue
                assert planned.plan is not None
                if len(planned.plan) == 0:
                    _finish_empty(planned, out, encoder, settings, record)
                    continue
                pool.submit(SlideJob(planned.entry.slide_id, str(planned.entry.path), planned.plan, settings.tile.backend))
                reading.append(planned)
            if not reading:
                if planning or (not exhausted and not stop):
                    continue
                break
            planned = reading.popleft()
            record(_infer_slide(planned, next(streams), encoder, feeder, out, settings, patches))
    except KeyboardInterrupt as exc:
        runner.close(interrupted=exc)
        raise
    finally:
        patches.close()
        pool.close()
        planner.shutdown(wait=True, cancel_futures=True)
        runner.release_all()  # an unexpected error must not leave this process's slide locks behind
    if stop:
        reporter.warn("stopped after the first failure (--on-error fail)")
    return runner.close()


def _finish_empty(planned: Planned, out: Path, encoder: Any, settings: ExtractSettings, record: Any) -> None:
    """A slide without tissue: a valid empty bag (0, D) and status ``no_tissue``."""
    assert planned.plan is not None
    entry = planned.entry
    try:
        write_outputs(entry, out, planned.plan, np.zeros((0, encoder.feature_dim), np.float32), np.zeros(0, bool),
                      encoder, settings, 0)
    except Exception as exc:  # noqa: BLE001
        record(SlideOutcome.failed(entry, f"writing the empty bag: {_reason(exc)}"))
        return
    record(SlideOutcome(entry.slide_id, str(entry.path), "no_tissue", n_patches=0, mpp=planned.level0_mpp,
                        seconds=round(time.monotonic() - planned.t0, 3)))


def _infer_slide(planned: Planned, stream: Any, encoder: Any, feeder: Any, out: Path, settings: ExtractSettings,
                 patches: Progress) -> SlideOutcome:
    """Run the model over one slide's batches and write its bag; any per-slide problem becomes ``failed``."""
    entry, plan = planned.entry, planned.plan
    assert plan is not None
    n = len(plan)
    t_read = time.monotonic()
    try:
        feats = _Features(n, encoder.feature_dim)
        for batch in stream:
            if len(batch):
                # the feeder gives (B, 3, S, S) on the device; the encoder takes the (B, S, S, 3) view of it
                feats.add(batch.indices, encoder.embed(feeder(batch.pixels).permute(0, 2, 3, 1)))
                patches.update(len(batch))
        feats.flush()
        bad = np.zeros(n, bool)
        if stream.n_bad:
            bad[np.asarray(stream.bad_indices, dtype=np.int64)] = True
        keep = feats.done & ~bad
        missing = int((~feats.done & ~bad).sum())
        if missing:
            raise RuntimeError(f"{missing} patches were never read (reader bug)")
        bag = write_outputs(entry, out, plan, feats.out, keep, encoder, settings, int(bad.sum()))
    except Exception as exc:  # noqa: BLE001 - per-slide failure, one line
        if settings.tile.debug:
            log.exception("extracting %s failed", entry.path)
        return SlideOutcome.failed(entry, _reason(exc), seconds=round(time.monotonic() - planned.t0, 3))
    seconds = time.monotonic() - planned.t0
    kept = int(keep.sum())
    extra: dict[str, Any] = {"bag": str(bag)}
    if stream.n_bad:
        extra["bad_patches"] = stream.bad_reasons[:5]
    return SlideOutcome(entry.slide_id, str(entry.path), "done", n_patches=kept, mpp=planned.level0_mpp,
                        seconds=round(seconds, 3), patches_per_s=round(kept / max(time.monotonic() - t_read, 1e-9), 2),
                        n_bad_patches=int(stream.n_bad), extra=extra)
