"""``mstar tile``: one slide's segmentation + tiling + outputs (:func:`tile_slide`), and the loop over a
process pool (:func:`run_tile`).

Outputs per slide (paths: :mod:`mstar_extract.store.layout`; the whole flow: docs/architecture.md), each written
atomically; the coordinates file is written last, so a complete ``coords/<slide_id>.h5`` means the slide is
finished (a rerun skips it unless ``--overwrite``):

* ``qc/<slide_id>.jpg`` — thumbnail with contours, holes, pen regions and the patch grid;
* ``contours/<slide_id>.geojson`` — tissue (and pen) contours, QuPath-compatible, level-0 pixels;
* ``coords/<slide_id>.h5`` — patch coordinates (TRIDENT attrs, or CLAM's with ``--coords-format clam``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mstar_extract.console import Reporter
from mstar_extract.errors import SlideError, UsageError, reason_of
from mstar_extract.pipeline.runner import HELD_BY_OTHERS, SlideOutcome, SlideRunner
from mstar_extract.store.layout import LayoutContext, OutLayout, layout_class, make_layout, validate_slide_id
from mstar_extract.tiling import ReadPlan, TilingParams
from mstar_extract.tissue.params import SegmentationParams

if TYPE_CHECKING:
    from mstar_extract.inputs import SlideEntry
    from mstar_extract.slides.base import Slide
    from mstar_extract.tissue.result import TissueMask

log = logging.getLogger("mstar")


@dataclass(frozen=True)
class TileSettings:
    """Everything that decides one slide's tiling (picklable; sent to worker processes)."""

    segmentation: SegmentationParams = field(default_factory=SegmentationParams)
    tiling: TilingParams = field(default_factory=TilingParams)
    backend: str = "auto"
    mpp_override: float | None = None
    """Level-0 µm/px for slides without resolution metadata (a per-slide list ``mpp`` wins)."""
    tissue_mask: str | None = None
    """``--tissue-mask``: a GeoJSON/mask-image file, or a folder of per-slide files; None = segment."""
    coords_format: str | None = None
    """``trident`` or ``clam`` attributes in the coordinates files; None: the layout's (``trident`` for ``mstar``)."""
    qc: bool = True
    geojson: bool = True
    debug: bool = False
    layout: str = "mstar"
    """Output layout of OUT (:data:`mstar_extract.store.layout.LAYOUTS`)."""

    def __post_init__(self) -> None:
        """Check the layout's name and settle the coordinates format: a layout made for CLAM's or TRIDENT's
        readers fixes it (UsageError when ``--coords-format`` asks for the other one)."""
        fixed = layout_class(self.layout).coords_format
        if fixed is not None and self.coords_format not in (None, fixed):
            raise UsageError(f"--layout {self.layout} writes {fixed} coordinates; --coords-format {self.coords_format} "
                             "contradicts it (leave --coords-format out)")
        object.__setattr__(self, "coords_format", self.coords_format or fixed or "trident")

    def recorded(self) -> dict[str, Any]:
        """The settings as recorded in output files."""
        return {"segmentation": self.segmentation.to_dict(), "tiling": self.tiling.to_dict(),
                "tissue_mask": self.tissue_mask, "coords_format": self.coords_format, "backend": self.backend}


def layout_for(out_dir: str | os.PathLike[str] | OutLayout, settings: TileSettings, model: str | None = None) -> OutLayout:
    """The layout of OUT for a run with these settings (``model``: extract's, for layouts that name folders by it)."""
    if isinstance(out_dir, OutLayout):
        return out_dir
    t = settings.tiling
    context = LayoutContext(magnification=t.target()[1], patch_size=t.patch_size, overlap=t.overlap, model=model)
    return make_layout(out_dir, settings.layout, context)


class ClamReaderNote:
    """One warning line per run when a coordinates file this run writes would be misread by CLAM-style readers
    (:func:`mstar_extract.store.coords.clam_reader_misread`): ``mstar`` layout with TRIDENT attributes only; the
    ``clam`` layout is the way out, and TRIDENT-layout files are not where those readers look."""

    def __init__(self, reporter: Reporter, settings: TileSettings, writes_coords: bool = True) -> None:
        self.reporter = reporter
        self.active = writes_coords and settings.layout == "mstar" and settings.coords_format == "trident"

    def check(self, slide_id: str, patch_size_level0: int | None) -> None:
        if not self.active or patch_size_level0 is None:
            return
        from mstar_extract.store.coords import clam_reader_misread

        why = clam_reader_misread(int(patch_size_level0), "trident")
        if why is not None:
            self.active = False
            self.reporter.warn(f"coords/{slide_id}.h5 (TRIDENT attributes) would be misread by CLAM-style readers: "
                               f"{why}; for CLAM's or the mSTAR repo's scripts use --layout clam")


def check_slide_ids(entries: Sequence[SlideEntry]) -> None:
    """UsageError, before any work, when a slide id cannot name output files (API callers; the CLI checks
    the list as it reads it)."""
    for entry in entries:
        validate_slide_id(entry.slide_id, where=str(entry.path))


def segment_and_plan(slide: Slide, slide_id: str, settings: TileSettings) -> tuple[TissueMask, ReadPlan]:
    """(TissueMask, ReadPlan) of an open slide: segmentation (or ``--tissue-mask``) then tiling."""
    from mstar_extract.tiling import plan_tiles
    from mstar_extract.tissue import find_mask_file, load_tissue_mask, segment_slide

    _ = slide.mpp  # raises ResolutionError (with how to fix it) before any work
    if settings.tissue_mask:
        f = find_mask_file(settings.tissue_mask, slide_id)
        if f is None:
            raise SlideError(slide.path, f"no tissue mask for slide id {slide_id!r} in {settings.tissue_mask}")
        mask = load_tissue_mask(f, slide, settings.segmentation)
    else:
        mask = segment_slide(slide, settings.segmentation)
    plan = plan_tiles(slide, mask, settings.tiling)
    plan.settings = {**settings.recorded(), **plan.settings, "mask": mask.summary()}
    return mask, plan


def write_tile_outputs(out_dir: str | os.PathLike[str] | OutLayout, slide_id: str, slide: Slide, mask: TissueMask,
                       plan: ReadPlan, settings: TileSettings) -> dict[str, Path]:
    """QC picture (and the plain thumbnail of layouts that have one), GeoJSON, then the coordinates file (last =
    the completion marker), where OUT's layout puts them; returns their paths."""
    from mstar_extract.store.coords import write_coords

    layout = layout_for(out_dir, settings)
    files = layout.slide(slide_id)
    paths = {"coords": files.coords, "qc": files.qc, "geojson": files.contours}
    if settings.qc:
        from mstar_extract.qc import write_qc, write_thumbnail

        write_qc(paths["qc"], slide, mask, plan, slide_id, settings.tiling.min_tissue)
        if files.thumbnail is not None:
            paths["thumbnail"] = write_thumbnail(files.thumbnail, slide, mask)
    if settings.geojson:
        from mstar_extract.tissue.contours import find_contours, to_level0
        from mstar_extract.tissue.geojson import write_geojson

        with_pen = layout.geojson_pen and mask.pen.any()
        pen = to_level0(find_contours(mask.pen, 1.0, 0.0, 0.0), mask.scale_x, mask.scale_y) if with_pen else []
        write_geojson(paths["geojson"], mask.contours, pen, slide_id)
    assert settings.coords_format is not None  # TileSettings.__post_init__ always sets it
    write_coords(paths["coords"], plan, slide_id, str(slide.path), settings.coords_format, slide.level_dimensions)
    return paths


def _open(path: str | os.PathLike[str], backend: str, mpp: float | None) -> Slide:
    """``open_slide`` with the tiling preference: under ``auto``, OpenSlide is tried first where it can read the
    format (tiling reads only a few whole low-resolution levels, and OpenSlide starts ~1.5 s faster than
    tiffslide, which imports zarr); any other choice, or OpenSlide refusing the file, falls back to ``auto``."""
    from mstar_extract.errors import SlideOpenError
    from mstar_extract.slides import backend_order, open_slide

    if backend == "auto" and "openslide" in backend_order(path, "auto"):
        try:
            return open_slide(path, backend="openslide", mpp=mpp)
        except SlideOpenError:
            pass
    return open_slide(path, backend=backend, mpp=mpp)


def open_with_resolution(entry: SlideEntry, settings: TileSettings) -> Slide:
    """Open ``entry``'s slide for tiling (``extract`` uses this too, so both get identical coordinates).

    A per-slide ``mpp`` (from a list) always wins; ``--mpp-override`` applies only when the file has no
    resolution metadata of its own (rules: :mod:`mstar_extract.slides.resolution`).
    """
    from mstar_extract.slides import apply_mpp_fallback

    per_slide = getattr(entry, "mpp", None)
    if per_slide:
        return _open(entry.path, settings.backend, per_slide)
    return apply_mpp_fallback(_open(entry.path, settings.backend, None), settings.mpp_override)


def tile_slide(entry: SlideEntry, out_dir: str | os.PathLike[str], settings: TileSettings) -> SlideOutcome:
    """Segment and tile one slide and write its outputs. Never raises for per-slide problems: an unreadable
    slide, missing resolution, a bad tissue mask or any unexpected error becomes a ``failed`` outcome."""
    t0 = time.monotonic()
    if getattr(entry, "error", None):
        return SlideOutcome.failed(entry, str(entry.error), seconds=0.0)
    try:
        with open_with_resolution(entry, settings) as slide:
            mask, plan = segment_and_plan(slide, entry.slide_id, settings)
            paths = write_tile_outputs(out_dir, entry.slide_id, slide, mask, plan, settings)
            level0_mpp = float(slide.mpp)
    except Exception as exc:  # noqa: BLE001 - per-slide failure, one line
        if settings.debug:
            import traceback

            traceback.print_exc()
        return SlideOutcome.failed(entry, reason_of(exc), seconds=round(time.monotonic() - t0, 3))
    n = len(plan)
    return SlideOutcome(
        slide_id=entry.slide_id, path=str(entry.path), status="done" if n else "no_tissue", n_patches=n,
        mpp=level0_mpp, seconds=round(time.monotonic() - t0, 3),
        extra={"level": plan.level, "read_size": plan.read_size, "patch_size_level0": plan.patch_size_level0,
               "target_mpp": plan.target_mpp, "coords": str(paths["coords"]),
               "qc": str(paths["qc"]) if settings.qc else None},
    )


def completed_outcome(entry: SlideEntry, out_dir: str | os.PathLike[str] | OutLayout,
                      settings: TileSettings | None = None) -> SlideOutcome | None:
    """A ``skipped`` outcome (with the patch count and level-0 mpp found in the file) when the slide's
    coordinates file is already complete, else None."""
    from mstar_extract.store.coords import coords_summary

    p = layout_for(out_dir, settings or TileSettings()).coords(entry.slide_id)
    found = coords_summary(p) if p.exists() else None
    if found is None:
        return None
    n, mpp = found
    return SlideOutcome.skipped(entry, "", n_patches=n, mpp=mpp, extra={"coords": str(p)})


def _mp_context() -> Any:
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def prepare_out(entries: Sequence[SlideEntry], layout: OutLayout, record: dict[str, dict[str, Any]], overwrite: bool,
                clean_older_than_s: float) -> None:
    """Everything a run does to OUT before its first slide: check the slide ids and OUT's settings record
    (UsageError, nothing written), record the settings, and remove temp files of killed runs (other hosts' live
    temp files are kept until they are ``clean_older_than_s`` old)."""
    from mstar_extract.store.atomic import clean_stale_temps
    from mstar_extract.store.record import check_record, record_settings

    check_slide_ids(entries)
    check_record(layout, record, overwrite)
    record_settings(layout, record, overwrite)
    clean_stale_temps(layout.root, older_than_s=clean_older_than_s)


class _TileRun:
    """One ``mstar tile`` run's bookkeeping: which slides to compute, and stopping after a failure."""

    def __init__(self, runner: SlideRunner, layout: OutLayout, settings: TileSettings, overwrite: bool,
                 on_error: str) -> None:
        self.runner, self.layout, self.settings = runner, layout, settings
        self.overwrite, self.on_error = overwrite, on_error
        self.stop = False
        self.note = ClamReaderNote(runner.reporter, settings)

    def ready(self, entry: SlideEntry) -> bool:
        """Lock the slide and check for complete outputs; True when the slide must be computed."""
        if not self.runner.begin(entry):  # another live process holds the slide's lock: accounted as skipped
            self.runner.finish(SlideOutcome.skipped(entry, HELD_BY_OTHERS))
            return False
        if not self.overwrite and not getattr(entry, "error", None):
            done = completed_outcome(entry, self.layout, self.settings)
            if done is not None:
                self.runner.finish(done)
                return False
        return True

    def record(self, outcome: SlideOutcome) -> None:
        self.runner.finish(outcome)
        if outcome.status == "done":
            self.note.check(outcome.slide_id, outcome.extra.get("patch_size_level0"))
        if outcome.status == "failed" and self.on_error == "fail":
            self.stop = True


def run_tile(
    entries: Sequence[SlideEntry],
    out_dir: str | os.PathLike[str],
    settings: TileSettings,
    workers: int = 1,
    reporter: Reporter | None = None,
    overwrite: bool = False,
    on_error: str = "skip",
    lock_timeout: float | None = None,
) -> int:
    """Tile ``entries`` into ``out_dir`` with up to ``workers`` processes; returns the exit code (0; 1 when
    any slide failed; 4 when slides held by other processes were not done, see :mod:`.runner`).
    ``on_error="fail"`` stops starting new slides after the first failure. ``lock_timeout``: seconds after which
    another process's slide lock counts as stale (default 600). SIGTERM ends the run like Ctrl-C (locks
    released). Raises UsageError before any work for a bad slide id or settings that differ from OUT's record."""
    from mstar_extract.envdefaults import DEFAULT_LOCK_TIMEOUT_S
    from mstar_extract.locks import sigterm_as_interrupt

    with sigterm_as_interrupt():
        return _run_tile(entries, out_dir, settings, workers, reporter or Reporter(), overwrite, on_error,
                         DEFAULT_LOCK_TIMEOUT_S if lock_timeout is None else float(lock_timeout))


def _run_tile(entries: Sequence[SlideEntry], out_dir: str | os.PathLike[str], settings: TileSettings, workers: int,
              reporter: Reporter, overwrite: bool, on_error: str, lock_timeout: float) -> int:
    from mstar_extract.pipeline.record import run_record

    layout = layout_for(out_dir, settings)
    prepare_out(entries, layout, run_record(settings), overwrite, lock_timeout)
    out = layout.root
    runner = SlideRunner(out, reporter, total=len(entries), command="tile", lock_timeout=lock_timeout)
    run = _TileRun(runner, layout, settings, overwrite, on_error)
    n_workers = max(1, min(int(workers), len(entries)))
    try:
        if n_workers == 1:
            for entry in entries:
                if run.stop:
                    break
                if run.ready(entry):
                    run.record(tile_slide(entry, out, settings))
        else:
            _run_pool(entries, out, settings, n_workers, run.ready, run.record, lambda: run.stop)
    except KeyboardInterrupt as exc:
        run.runner.close(interrupted=exc)
        raise
    if run.stop:
        reporter.warn("stopped after the first failure (--on-error fail)")
    return run.runner.close()


def _run_pool(entries: Sequence[SlideEntry], out: Path, settings: TileSettings, n_workers: int,
              ready: Callable[[SlideEntry], bool], record: Callable[[SlideOutcome], None], stopped: Callable[[], bool]) -> None:
    """Keep ``n_workers`` slides in flight; record outcomes as they complete; survive a dead worker."""
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    pending: Iterator[SlideEntry] = iter(entries)
    in_flight: dict[Future, Any] = {}
    pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=_mp_context())
    try:
        exhausted = False
        while True:
            while not exhausted and not stopped() and len(in_flight) < n_workers:
                entry = next(pending, None)
                if entry is None:
                    exhausted = True
                    break
                if ready(entry):
                    in_flight[pool.submit(tile_slide, entry, out, settings)] = entry
            if not in_flight:
                break
            finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            broken = False
            for fut in finished:
                entry = in_flight.pop(fut)
                try:
                    record(fut.result())
                except BrokenProcessPool:
                    broken = True
                    record(SlideOutcome.failed(entry, "worker process died (killed, or out of memory)"))
                except Exception as exc:  # noqa: BLE001
                    record(SlideOutcome.failed(entry, reason_of(exc)))
            if broken:
                for entry in list(in_flight.values()):
                    record(SlideOutcome.failed(entry, "worker process died (killed, or out of memory)"))
                in_flight.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=_mp_context())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
