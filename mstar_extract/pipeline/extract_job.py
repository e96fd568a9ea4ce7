"""``mstar extract``: tiling, reading and inference of many slides as one pipeline that keeps the model busy.

Three stages overlap (the whole flow, function by function: docs/architecture.md)::

    planner thread      slide k+2: open, segment, tile (or read --coords-dir), write coords + QC   (plan_slide)
    reader processes    slide k+1 and k: patch batches (uint8, 224 px) into shared memory   (reading.ReaderPool)
    main thread         slide k: pinned copy -> device -> mSTAR ViT-L (AMP) -> features (stay on the device)
    writer thread       slide k-1: features to the host, .pt + bag (atomic), manifest row, lock released
                        (pipeline.writer)

:func:`run_extract` checks the slide ids and OUT's settings record (nothing is written when they are wrong),
loads the model, and hands the slides to an :class:`ExtractRun`, whose named steps move each slide through the
stages. One warm-up batch at the full batch size runs before the first lock (out of memory, a failed compile
stop the run there). Per slide the main thread takes the slide's lock (several jobs may share OUT), checks
whether a complete and valid bag already exists (then ``skipped``), and exactly one outcome is recorded in the
manifest. The bag ``features/<slide_id>.h5`` is written last and atomically, so it is the completion marker: a
run killed at any moment leaves only complete bags, and a rerun recomputes exactly the slides without one.
Errors that are not about one slide (OUT full or read-only, the device, the compiler) stop the whole run with
exit code 3 (:mod:`mstar_extract.pipeline.whole_run`), leaving unfinished slides to the next job.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mstar_extract.console import Progress, Reporter
from mstar_extract.errors import EXIT_FAILED, RunError, first_line, reason_of
from mstar_extract.pipeline.runner import HELD_BY_OTHERS, SlideOutcome, SlideRunner
from mstar_extract.pipeline.tile_job import (
    ClamReaderNote,
    TileSettings,
    check_slide_ids,
    layout_for,
    open_with_resolution,
    prepare_out,
    segment_and_plan,
    write_tile_outputs,
)
from mstar_extract.pipeline.whole_run import is_whole_run, whole_run_error, whole_run_reason
from mstar_extract.pipeline.writer import HostFeatures, SlideWriter, WriteJob
from mstar_extract.store.layout import OutLayout, layout_class
from mstar_extract.tiling import ReadPlan

if TYPE_CHECKING:
    from mstar_extract.downstream.aggregator import SlideEncoder
    from mstar_extract.inputs import SlideEntry
    from mstar_extract.models.encoder import Encoder
    from mstar_extract.slides.base import Slide

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
    slide_encoder: str | None = None
    """Stage-1 aggregator file: a slide embedding after each bag (:func:`mstar_extract.downstream.embed.embed_after_bag`)."""


def wants_pt(settings: ExtractSettings) -> bool:
    """``--format pt|both``, or a layout that always has them (``clam``: CLAM's training code reads only those)."""
    return settings.format in ("pt", "both") or layout_class(settings.tile.layout).always_pt


def extract_layout(out_dir: str | os.PathLike[str] | OutLayout, settings: ExtractSettings) -> OutLayout:
    """The layout of OUT for this extraction run."""
    return layout_for(out_dir, settings.tile, model=settings.model)


def _bag_summary(bag: Path) -> tuple[int, float | None]:
    """(rows, level-0 mpp or None) of a complete bag."""
    import math

    import h5py

    with h5py.File(bag, "r") as f:
        n = int(f["features"].shape[0])
        mpp = f.attrs.get("level0_mpp")
    mpp = float(mpp) if mpp is not None else None
    return n, (None if mpp is None or math.isnan(mpp) else mpp)


def check_complete(entry: SlideEntry, layout: OutLayout, settings: ExtractSettings, encoder: Encoder) -> SlideOutcome | None:
    """``skipped`` when a complete, valid bag for this model and weights exists (and the .pt when asked);
    ``failed`` when a complete bag of *other* weights is in the way; None when the slide must be computed."""
    from mstar_extract.store.bags import validate_bag

    bag, pt = layout.bag(entry.slide_id), layout.pt(entry.slide_id)
    if not bag.exists():
        return None
    if validate_bag(bag) is not None:
        return None  # incomplete or damaged: recompute
    problem = validate_bag(bag, {"model": encoder.name, "weights_sha256": encoder.weights_sha256,
                                 "feature_dim": encoder.feature_dim})
    if problem is not None:
        return SlideOutcome.failed(entry, f"{bag} exists from another model or weights ({problem}); "
                                          "use --overwrite or another OUT")
    problem = validate_bag(bag, expected_settings(settings))
    if problem is not None:
        return SlideOutcome.failed(entry, f"{bag} exists with other settings ({problem}); "
                                          "use --overwrite or another OUT")
    if wants_pt(settings) and not pt.exists():
        return None
    n, mpp = _bag_summary(bag)
    return SlideOutcome.skipped(entry, "", n_patches=n, mpp=mpp, extra={"bag": str(bag)})


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

    entry: SlideEntry
    plan: ReadPlan | None = None
    level0_mpp: float | None = None
    outcome: SlideOutcome | None = None
    t0: float = 0.0


def _given_coords(entry: SlideEntry, slide: Slide, coords_dir: str) -> ReadPlan:
    """The read plan of ``--coords-dir``'s file for this slide (a per-slide failure when there is none)."""
    from mstar_extract.errors import SlideError
    from mstar_extract.store.coords import find_coords_file, read_coords_file

    found = find_coords_file(coords_dir, entry.slide_id)
    if found is None:
        raise SlideError(entry.path, f"no coordinates for slide id {entry.slide_id!r} in {coords_dir}")
    plan = read_coords_file(found, slide)
    plan.settings = {**plan.settings, "coords_file": str(found)}
    return plan


def plan_slide(entry: SlideEntry, layout: OutLayout, settings: ExtractSettings) -> Planned:
    """Open, segment and tile one slide (or read its ``--coords-dir`` file). Never raises for per-slide problems."""
    t0 = time.monotonic()
    try:
        with open_with_resolution(entry, settings.tile) as slide:
            if settings.coords_dir:
                plan = _given_coords(entry, slide, settings.coords_dir)
            else:
                mask, plan = segment_and_plan(slide, entry.slide_id, settings.tile)
                write_tile_outputs(layout, entry.slide_id, slide, mask, plan, settings.tile)
            mpp = float(slide.mpp) if slide.mpp_x is not None else plan.level0_mpp
    except Exception as exc:  # a per-slide failure, one line
        if is_whole_run(exc):
            raise  # OUT full or read-only: not this slide's problem (the main thread stops the run)
        if settings.tile.debug:
            log.exception("planning %s failed", entry.path)
        return Planned(entry, outcome=SlideOutcome.failed(entry, reason_of(exc), seconds=round(time.monotonic() - t0, 3)), t0=t0)
    return Planned(entry, plan=plan, level0_mpp=mpp, t0=t0)


# ------------------------------------------------------------------------------------------------- writing
def write_outputs(entry: SlideEntry, layout: OutLayout, plan: ReadPlan, features: np.ndarray, keep: np.ndarray,
                  encoder: Encoder, settings: ExtractSettings, n_bad: int) -> Path:
    """The .pt (when asked) and then the bag (last: the completion marker), both atomic; returns the bag's path."""
    from mstar_extract.store.bags import bag_attrs, write_bag, write_pt

    bag = layout.bag(entry.slide_id)
    feats = features[keep]
    coords = plan.coords[keep]
    if wants_pt(settings):
        write_pt(layout.pt(entry.slide_id), feats)
    attrs = bag_attrs(plan, slide_id=entry.slide_id, slide_path=str(entry.path), model=encoder.name,
                      weights_sha256=encoder.weights_sha256, feature_dim=encoder.feature_dim,
                      precision=encoder.precision, input_size=encoder.input_size, n_bad_patches=int(n_bad),
                      decode=settings.decode)
    write_bag(bag, feats, coords, attrs, dtype=settings.dtype, features_attrs=layout.features_attrs(entry.slide_id))
    return bag


# ------------------------------------------------------------------------------------------------- inference
def default_batch_size(device_type: str) -> int:
    return 256 if device_type == "cuda" else 32


def embed_slide(n: int, stream: Any, encoder: Encoder, feeder: Any, patches: Progress) -> HostFeatures:
    """Run the model over one slide's batch stream. The features are on their way to the host when this returns
    (:class:`~mstar_extract.pipeline.writer.HostFeatures`, sealed): nothing here waits for the device."""
    feats = HostFeatures(n, encoder.feature_dim, encoder.device)
    for batch in stream:
        if len(batch):
            # the feeder gives (B, 3, S, S) on the device; the encoder takes the (B, S, S, 3) view of it
            feats.add(batch.indices, encoder.embed(feeder(batch.pixels).permute(0, 2, 3, 1)))
            patches.update(len(batch))
    feats.seal()
    return feats


def collect_features(job: WriteJob) -> tuple[np.ndarray, np.ndarray]:
    """``(features (n, D) float32, keep (n,) bool)`` of a finished slide (waits for its copies only); ``keep`` is
    False for patches the reader dropped (``--skip-bad-patches``). RuntimeError when a patch was never read."""
    assert job.features is not None
    features, done = job.features.result()
    bad = np.zeros(len(features), bool)
    if job.n_bad:
        bad[np.asarray(job.bad_indices, dtype=np.int64)] = True
    missing = int((~done & ~bad).sum())
    if missing:
        raise RuntimeError(f"{missing} patches were never read (reader bug)")
    return features, done & ~bad


# ------------------------------------------------------------------------------------------------- the run
class ExtractRun:
    """One extraction run over a slide list: the state the stages share, and the steps that move a slide from one
    stage to the next.

    State: ``pending`` (slides not looked at yet), ``planning`` (slides whose :func:`plan_slide` runs or ran on
    the planner thread), ``reading`` (slides handed to the reader pool, oldest first: the pool yields their batch
    streams in that order), the :class:`~mstar_extract.pipeline.writer.SlideWriter` (finished slides on their way
    to disk, and every outcome, in order), the :class:`SlideRunner` (locks, manifest, events, exit code) and
    ``stop`` (set by ``--on-error fail``). At most ``depth = 1 + lookahead`` slides are with the readers, one more
    is planned, two wait for the writer.

    Steps, called by :meth:`run` until every slide has an outcome:

    * :meth:`warm_up` — one batch at the full batch size through the model (and the compiler) before any lock;
    * :meth:`take_next` — lock the next slide; skip it when its outputs are complete; else start planning it;
    * :meth:`hand_to_readers` — move planned slides to the reader pool (a slide without tissue goes to the writer
      for its empty bag, a failed plan its outcome);
    * :meth:`infer_next` — run the model over the oldest slide's batches and hand it to the writer;
    * :meth:`write_slide` (writer thread) — its features to the host, its bag, its outcome.
    """

    def __init__(self, entries: Sequence[SlideEntry], layout: OutLayout, settings: ExtractSettings, encoder: Encoder,
                 reporter: Reporter, overwrite: bool = False, on_error: str = "skip",
                 runner: SlideRunner | None = None, slide_encoder: SlideEncoder | None = None) -> None:
        from mstar_extract.reading import DeviceFeeder

        self.layout, self.settings, self.encoder, self.reporter = layout, settings, encoder, reporter
        self.slide_encoder = slide_encoder
        self.overwrite, self.on_error = overwrite, on_error
        self.batch_size = settings.batch_size or default_batch_size(encoder.device.type)
        self.runner = runner or SlideRunner(layout.root, reporter, total=len(entries), command="extract",
                                            lock_timeout=settings.lock_timeout)
        self.feeder = DeviceFeeder(encoder.device)
        self.entries = list(entries)
        self.pending = iter(self.entries)
        self.planning: deque[Future] = deque()
        self.reading: deque[Planned] = deque()
        self.depth = 1 + max(0, settings.lookahead)
        self.note = ClamReaderNote(reporter, settings.tile, writes_coords=not settings.coords_dir)
        self.stop = False
        self.exhausted = False
        self.warm = False
        self.planner: ThreadPoolExecutor | None = None
        self.pool: Any = None
        self.streams: Any = None
        self.writer: SlideWriter | None = None
        self.patches: Progress | None = None

    # -- start and end ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """The warm-up batch (unless every slide already has a bag), then the planner thread, the reader pool, the
        writer thread and the patch progress bar."""
        from mstar_extract.reading import ReaderPool

        if self.overwrite or any(not getattr(e, "error", None) and not self.layout.bag(e.slide_id).exists()
                                 for e in self.entries):
            self.warm_up()
        s = self.settings
        self.planner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mstar-plan")
        self.pool = ReaderPool(workers=s.workers, batch_size=self.batch_size, out_size=self.encoder.input_size,
                               skip_bad_patches=s.skip_bad_patches, lookahead=s.lookahead, decode=s.decode)
        self.streams = self.pool.results()
        self.writer = SlideWriter(self.write_slide, self.record_now)
        self.patches = Progress(self.reporter, None, "extract: patches", "patches", position=1)

    def warm_up(self) -> None:
        """One batch of ``batch_size`` blank patches through the model (compiled for that size with ``--compile``):
        what cannot work on this machine at this batch size fails here, once, as a whole-run error."""
        if self.warm or self.encoder.warmed_batch == self.batch_size:  # (bench extract warms up before its clock)
            self.warm = True
            return
        try:
            seconds = self.encoder.warm_up(self.batch_size)
        except Exception as exc:  # nothing here is about a slide
            if self.settings.tile.debug:
                log.exception("warm-up batch failed")
            reason = whole_run_reason(exc) or first_line(exc, with_type=True)
            raise RunError(f"warm-up batch of {self.batch_size} patches on {self.encoder.device} failed: {reason} "
                           "(no slide was touched)") from exc
        self.warm = True
        log.info("warm-up batch of %d patches: %.2f s%s", self.batch_size, seconds,
                 " (compiled)" if self.encoder.compile else "")

    def close_writer(self, drain: bool) -> None:
        """End the writer thread (``drain``: write what it was handed); a second signal abandons the queue."""
        if self.writer is None:
            return
        try:
            self.writer.close(drain=drain)
        except BaseException:
            self.writer.close(drain=False)
            raise

    def shut_down(self) -> None:
        """Stop the stages and release this process's slide locks (also after an unexpected error)."""
        if self.writer is not None:
            self.writer.close(drain=False)
        if self.patches is not None:
            self.patches.close()
        if self.pool is not None:
            self.pool.close()
        if self.planner is not None:
            self.planner.shutdown(wait=True, cancel_futures=True)
        self.runner.release_all()

    def record(self, outcome: SlideOutcome) -> None:
        """Record a slide's one outcome after every slide handed to the writer before it."""
        assert self.writer is not None
        self.writer.record(outcome)

    def record_now(self, outcome: SlideOutcome) -> None:
        """(writer thread) Manifest row, event, lock released; ``--on-error fail`` stops after a failure.
        With ``--slide-encoder`` a slide whose bag is complete gets its slide embedding first, under its lock."""
        if self.slide_encoder is not None:
            from mstar_extract.downstream.embed import embed_after_bag

            outcome = embed_after_bag(self.slide_encoder, self.layout, outcome)
        self.runner.finish(outcome)
        if outcome.status == "failed" and self.on_error == "fail":
            self.stop = True

    # -- the steps -------------------------------------------------------------------------------------------
    def take_next(self) -> None:
        """Start planning the next slide this process may work on (recording the ones it skips on the way)."""
        assert self.planner is not None
        while not self.exhausted and not self.stop:
            entry = next(self.pending, None)
            if entry is None:
                self.exhausted = True
                return
            if getattr(entry, "error", None):
                self.record(SlideOutcome.failed(entry, str(entry.error), seconds=0.0))
                continue
            if not self.runner.begin(entry):
                self.record(SlideOutcome.skipped(entry, HELD_BY_OTHERS))
                continue
            if not self.overwrite:
                done = check_complete(entry, self.layout, self.settings, self.encoder)
                if done is not None:
                    self.record(done)
                    continue
            self.planning.append(self.planner.submit(plan_slide, entry, self.layout, self.settings))
            return

    def hand_to_readers(self) -> None:
        """Submit planned slides to the readers while fewer than ``depth`` are there; wait for a plan only when
        the readers have nothing else to do."""
        from mstar_extract.reading import SlideJob

        while self.planning and len(self.reading) < self.depth and (not self.reading or self.planning[0].done()):
            planned: Planned = self.planning.popleft().result()
            if planned.outcome is not None:
                self.record(planned.outcome)
                continue
            assert planned.plan is not None
            if len(planned.plan) == 0:
                assert self.writer is not None
                self.writer.write(WriteJob(planned))  # no tissue: the writer writes its empty bag
                continue
            entry = planned.entry
            self.note.check(entry.slide_id, planned.plan.patch_size_level0)
            self.pool.submit(SlideJob(entry.slide_id, str(entry.path), planned.plan, self.settings.tile.backend))
            self.reading.append(planned)

    def infer_next(self) -> None:
        """The oldest slide with the readers: the model over its batches, then to the writer (a per-slide problem
        is its ``failed`` outcome; a device error stops the run)."""
        planned = self.reading.popleft()
        stream = next(self.streams)
        assert planned.plan is not None and self.patches is not None and self.writer is not None
        self.warm_up()  # no-op after the first time (skipped at the start when every slide had a bag)
        t_read = time.monotonic()
        try:
            feats = embed_slide(len(planned.plan), stream, self.encoder, self.feeder, self.patches)
        except Exception as exc:  # per-slide failure, one line
            if is_whole_run(exc):
                raise
            if self.settings.tile.debug:
                log.exception("extracting %s failed", planned.entry.path)
            self.record(SlideOutcome.failed(planned.entry, reason_of(exc),
                                            seconds=round(time.monotonic() - planned.t0, 3)))
            return
        self.writer.write(WriteJob(planned, feats, n_bad=int(stream.n_bad), bad_indices=list(stream.bad_indices),
                                   bad_reasons=list(stream.bad_reasons), read_seconds=time.monotonic() - t_read))

    def loop(self) -> None:
        """The steps, until every slide is with the writer."""
        assert self.writer is not None
        while True:
            self.writer.check()
            while not self.stop and not self.exhausted and len(self.planning) + len(self.reading) < self.depth + 1:
                self.take_next()
            self.hand_to_readers()
            if not self.reading:
                if self.planning or (not self.exhausted and not self.stop):
                    continue
                return
            self.infer_next()

    def run(self) -> int:
        """Start, loop over the steps, let the writer finish; returns the exit code (:meth:`SlideRunner.close`).

        Ctrl-C/SIGTERM or an error: the writer first writes the slides it was handed (their bags are complete),
        then the stages stop and this process's locks are released; the caller prints the summary
        (:func:`run_extract`)."""
        try:
            self.start()
            self.loop()
            self.close_writer(drain=True)
            assert self.writer is not None
            self.writer.check()
        except BaseException:
            self.close_writer(drain=True)
            raise
        finally:
            self.shut_down()
        if self.stop:
            self.reporter.warn("stopped after the first failure (--on-error fail)")
        return self.runner.close()

    # -- one slide (writer thread) ---------------------------------------------------------------------------
    def write_slide(self, job: WriteJob) -> SlideOutcome:
        """A finished slide's features to the host, its .pt and bag; its outcome (``done``, ``no_tissue``, or
        ``failed`` for a problem of this slide's outputs). A whole-run error (OUT full) is raised."""
        planned = job.planned
        entry, plan = planned.entry, planned.plan
        assert plan is not None
        try:
            if job.features is None:  # no tissue: a valid empty bag (0, D)
                features, keep = np.zeros((0, self.encoder.feature_dim), np.float32), np.zeros(0, bool)
            else:
                features, keep = collect_features(job)
            bag = write_outputs(entry, self.layout, plan, features, keep, self.encoder, self.settings, job.n_bad)
        except Exception as exc:  # per-slide failure, one line
            if is_whole_run(exc):
                raise
            if self.settings.tile.debug:
                log.exception("writing %s failed", entry.path)
            what = "writing the empty bag: " if job.features is None else ""
            return SlideOutcome.failed(entry, what + reason_of(exc), seconds=round(time.monotonic() - planned.t0, 3))
        seconds = round(time.monotonic() - planned.t0, 3)
        if job.features is None:
            return SlideOutcome(entry.slide_id, str(entry.path), "no_tissue", n_patches=0, mpp=planned.level0_mpp,
                                seconds=seconds)
        kept = int(keep.sum())
        extra: dict[str, Any] = {"bag": str(bag)}
        if job.n_bad:
            extra["bad_patches"] = job.bad_reasons[:5]
        return SlideOutcome(entry.slide_id, str(entry.path), "done", n_patches=kept, mpp=planned.level0_mpp,
                            seconds=seconds, patches_per_s=round(kept / max(job.read_seconds, 1e-9), 2),
                            n_bad_patches=int(job.n_bad), extra=extra)


@contextmanager
def summary_on_stop(runner: SlideRunner) -> Iterator[None]:
    """A run that stops early still ends with its summary (JSONL event and line), from the moment the model starts
    loading: after Ctrl-C/SIGTERM (re-raised: exit 130/143) and after a whole-run error (re-raised as
    :class:`RunError`: exit 3, :mod:`mstar_extract.pipeline.whole_run`)."""
    try:
        yield
    except KeyboardInterrupt as exc:
        runner.close(interrupted=exc)
        raise
    except Exception as exc:
        err = whole_run_error(exc, escaped=True)
        if err is None:
            raise
        runner.close(run_error=err)
        if err is exc:
            raise
        raise err from exc


def check_before_work(entries: Sequence[SlideEntry], out_dir: str | os.PathLike[str] | OutLayout,
                      settings: ExtractSettings, overwrite: bool = False) -> OutLayout:
    """What can be checked before the model is loaded, writing nothing: the slide ids, and OUT's settings record
    against every setting of this run but the weights' checksum. Returns OUT's layout; UsageError otherwise."""
    from mstar_extract.pipeline.record import run_record
    from mstar_extract.store.record import check_record

    layout = extract_layout(out_dir, settings)
    check_slide_ids(entries)
    check_record(layout, run_record(settings.tile, settings), overwrite)
    return layout


def run_extract(
    entries: Sequence[SlideEntry],
    out_dir: str | os.PathLike[str],
    settings: ExtractSettings,
    reporter: Reporter | None = None,
    overwrite: bool = False,
    on_error: str = "skip",
    encoder: Encoder | None = None,
    failed_code: int = EXIT_FAILED,
) -> int:
    """Extract features for ``entries`` into ``out_dir``; returns the exit code (0, or ``failed_code`` if any slide
    failed: 1, or 0 for a torchrun rank, see :mod:`mstar_extract.pipeline.launch`).

    Before any slide is touched: the slide ids and OUT's settings record are checked (UsageError, nothing
    written), then the model and its weights are resolved (missing weights stop the run with one WeightsError
    message); then OUT records this run's settings and :class:`ExtractRun` does the work. A whole-run error
    raises :class:`RunError` (exit 3) after the summary.
    """
    from mstar_extract.models import Encoder
    from mstar_extract.pipeline.record import run_record

    reporter = reporter or Reporter()
    layout = check_before_work(entries, out_dir, settings, overwrite)
    runner = SlideRunner(layout.root, reporter, total=len(entries), command="extract",
                         lock_timeout=settings.lock_timeout, failed_code=failed_code)
    with summary_on_stop(runner):
        if encoder is None:
            encoder = Encoder.create(settings.model, settings.weights, device=settings.device,
                                     precision=settings.precision, compile=settings.compile,
                                     cache_dir=settings.cache_dir, token=settings.token)
        slide_encoder = load_slide_encoder(settings, encoder)
        run = ExtractRun(entries, layout, settings, encoder, reporter, overwrite=overwrite, on_error=on_error,
                         runner=runner, slide_encoder=slide_encoder)
        reporter.info(f"model {encoder.name} ({encoder.weights.description}) on {encoder.device}, "
                      f"{encoder.precision}, batch {run.batch_size}, {settings.workers} reader worker(s)")
        # temp files of other hosts' live jobs sharing OUT (a cluster file system) are kept until older than the
        # lock timeout
        prepare_out(entries, layout, run_record(settings.tile, settings, encoder.weights_sha256), overwrite,
                    settings.lock_timeout)
        code = run.run()
    if slide_encoder is not None:
        from mstar_extract.downstream.embed import finish_table

        finish_table(layout, reporter)
    return code


def load_slide_encoder(settings: ExtractSettings, encoder: Encoder) -> SlideEncoder | None:
    """``--slide-encoder``'s aggregator on the model's device, checked against the model before any work (a
    UsageError when it was trained on other patch features); None without the option."""
    if not settings.slide_encoder:
        return None
    from mstar_extract.downstream.aggregator import SlideEncoder
    from mstar_extract.errors import UsageError

    slide_encoder = SlideEncoder.load(settings.slide_encoder, encoder.device)
    problem = slide_encoder.extractor_problem(encoder.name, encoder.weights_sha256, encoder.feature_dim)
    if problem is not None:
        raise UsageError(f"--slide-encoder: {problem}")
    return slide_encoder
