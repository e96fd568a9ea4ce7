"""``mstar tile``: one slide's segmentation + tiling + outputs (:func:`tile_slide`), and the loop over a
process pool (:func:`run_tile`).

Outputs per slide (design §4), each written atomically; the coordinates file is written last, so a complete
``coords/<slide_id>.h5`` means the slide is finished (a rerun skips it unless ``--overwrite``):

* ``qc/<slide_id>.jpg`` — thumbnail with contours, holes, pen regions and the patch grid;
* ``contours/<slide_id>.geojson`` — tissue (and pen) contours, QuPath-compatible, level-0 pixels;
* ``coords/<slide_id>.h5`` — patch coordinates (TRIDENT attrs, or CLAM's with ``--coords-format clam``).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from mstar_extract.console import Reporter
from mstar_extract.errors import MstarError, SlideError
from mstar_extract.pipeline.runner import SlideOutcome, SlideRunner
from mstar_extract.tiling import ReadPlan, TilingParams
from mstar_extract.tissue.params import SegmentationParams

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
    coords_format: str = "trident"
    qc: bool = True
    geojson: bool = True
    debug: bool = False

    def recorded(self) -> dict[str, Any]:
        """The settings as recorded in output files."""
        return {"segmentation": self.segmentation.to_dict(), "tiling": self.tiling.to_dict(),
                "tissue_mask": self.tissue_mask, "coords_format": self.coords_format, "backend": self.backend}


def output_paths(out_dir: str | os.PathLike[str], slide_id: str) -> dict[str, Path]:
    out = Path(out_dir)
    return {"coords": out / "coords" / f"{slide_id}.h5", "qc": out / "qc" / f"{slide_id}.jpg",
            "geojson": out / "contours" / f"{slide_id}.geojson"}


def segment_and_plan(slide: Any, slide_id: str, settings: TileSettings):
    """(TissueMask, ReadPlan) of an open slide: segmentation (or ``--tissue-mask``) then tiling."""
    from mstar_extract.tiling import plan_tiles
    from mstar_extract.tissue import find_mask_file, load_tissue_mask, segment_slide

    slide.mpp  # raises ResolutionError (with how to fix it) before any work
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


def write_tile_outputs(out_dir: str | os.PathLike[str], slide_id: str, slide: Any, mask: Any, plan: ReadPlan,
                       settings: TileSettings) -> dict[str, Path]:
    """QC picture, GeoJSON, then the coordinates file (last = the completion marker)."""
    from mstar_extract.store.coords import write_coords

    paths = output_paths(out_dir, slide_id)
    if settings.qc:
        from mstar_extract.qc import write_qc

        write_qc(paths["qc"], slide, mask, plan, slide_id, settings.tiling.min_tissue)
    if settings.geojson:
        from mstar_extract.tissue.contours import to_level0
        from mstar_extract.tissue.contours import find_contours
        from mstar_extract.tissue.geojson import write_geojson

        pen = to_level0(find_contours(mask.pen, 1.0, 0.0, 0.0), mask.scale_x, mask.scale_y) if mask.pen.any() else []
        write_geojson(paths["geojson"], mask.contours, pen, slide_id)
    write_coords(paths["coords"], plan, slide_id, str(slide.path), settings.coords_format, slide.level_dimensions)
    return paths


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SlideError):
        return exc.reason
    if isinstance(exc, MstarError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory"
    return f"unexpected {type(exc).__name__}: {exc}"


def _open(path: Any, backend: str, mpp: float | None):
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


def open_with_resolution(entry: Any, settings: TileSettings):
    """Open ``entry``'s slide for tiling (``extract`` uses this too, so both get identical coordinates).

    A per-slide ``mpp`` (from a list) always wins; ``--mpp-override`` applies only when the file has no
    resolution metadata of its own (rules: :mod:`mstar_extract.slides.resolution`).
    """
    from mstar_extract.slides import apply_mpp_fallback

    per_slide = getattr(entry, "mpp", None)
    if per_slide:
        return _open(entry.path, settings.backend, per_slide)
    return apply_mpp_fallback(_open(entry.path, settings.backend, None), settings.mpp_override)


def tile_slide(entry: Any, out_dir: str | os.PathLike[str], settings: TileSettings) -> SlideOutcome:
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
        return SlideOutcome.failed(entry, _reason(exc), seconds=round(time.monotonic() - t0, 3))
    n = len(plan)
    return SlideOutcome(
        slide_id=entry.slide_id, path=str(entry.path), status="done" if n else "no_tissue", n_patches=n,
        mpp=level0_mpp, seconds=round(time.monotonic() - t0, 3),
        extra={"level": plan.level, "read_size": plan.read_size, "patch_size_level0": plan.patch_size_level0,
               "target_mpp": plan.target_mpp, "coords": str(paths["coords"]),
               "qc": str(paths["qc"]) if settings.qc else None},
    )


def completed_outcome(entry: Any, out_dir: str | os.PathLike[str]) -> SlideOutcome | None:
    """A ``skipped`` outcome when the slide's coordinates file is already complete, else None."""
    from mstar_extract.store.coords import count_coords, is_complete_coords

    p = output_paths(out_dir, entry.slide_id)["coords"]
    if p.exists() and is_complete_coords(p):
        return SlideOutcome.skipped(entry, "", n_patches=count_coords(p), extra={"coords": str(p)})
    return None


def _mp_context() -> Any:
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def run_tile(
    entries: Sequence[Any],
    out_dir: str | os.PathLike[str],
    settings: TileSettings,
    workers: int = 1,
    reporter: Reporter | None = None,
    overwrite: bool = False,
    on_error: str = "skip",
) -> int:
    """Tile ``entries`` into ``out_dir`` with up to ``workers`` processes; returns the exit code (0, or 1 when
    any slide failed). ``on_error="fail"`` stops starting new slides after the first failure."""
    from mstar_extract.envdefaults import DEFAULT_LOCK_TIMEOUT_S
    from mstar_extract.store.atomic import clean_stale_temps

    reporter = reporter or Reporter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(out, older_than_s=DEFAULT_LOCK_TIMEOUT_S)  # keep other hosts' live temp files
    runner = SlideRunner(out, reporter, total=len(entries), command="tile")
    n_workers = max(1, min(int(workers), len(entries)))
    stop = False

    def ready(entry: Any) -> bool:
        """begin + skip check; True when the slide must be computed."""
        if not runner.begin(entry):  # another live process holds the slide's lock: it is accounted as skipped
            runner.finish(SlideOutcome.skipped(entry, "taken by another process"))
            return False
        if not overwrite and not getattr(entry, "error", None):
            done = completed_outcome(entry, out)
            if done is not None:
                runner.finish(done)
                return False
        return True

    def record(outcome: SlideOutcome) -> None:
        nonlocal stop
        runner.finish(outcome)
        if outcome.status == "failed" and on_error == "fail":
            stop = True

    try:
        if n_workers == 1:
            for entry in entries:
                if stop:
                    break
                if ready(entry):
                    record(tile_slide(entry, out, settings))
        else:
            _run_pool(entries, out, settings, n_workers, ready, record, lambda: stop)
    except KeyboardInterrupt as exc:
        runner.close(interrupted=exc)
        raise
    if stop:
        reporter.warn("stopped after the first failure (--on-error fail)")
    return runner.close()


def _run_pool(entries: Sequence[Any], out: Path, settings: TileSettings, n_workers: int, ready, record, stopped) -> None:
    """Keep ``n_workers`` slides in flight; record outcomes as they complete; survive a dead worker."""
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    pending: Iterable[Any] = iter(entries)
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
                    record(SlideOutcome.failed(entry, _reason(exc)))
            if broken:
                for fut, entry in list(in_flight.items()):
                    record(SlideOutcome.failed(entry, "worker process died (killed, or out of memory)"))
                in_flight.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = ProcessPoolExecutor(max_workers=n_workers, mp_context=_mp_context())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
