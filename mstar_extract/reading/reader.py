"""The fast patch reader (one slide, one process) and the naive per-patch baseline.

:class:`PatchReader` turns a :class:`~mstar_extract.tiling.ReadPlan` into batches of model-ready uint8 patches
(B, S, S, 3). Patches are visited in row-major grid order so neighbours share a batch, and each stored tile is
decoded at most once per batch (in practice once per slide: the tile cache spans a few rows of patches):

* ``tiles`` — the level is a plain tiled TIFF page (Aperio SVS, generic pyramidal TIFF): decode the file's own
  tiles with tifffile/imagecodecs (:mod:`.tiles`), assemble each patch from cached tiles; DICOM WSI frames and
  OME-TIFF levels too (:mod:`.format_sources`);
* ``regions`` — anything else: one ``read_region`` through the slide backend per run of neighbouring patches
  in a row (bounded width), then cut the patches out (:mod:`.regions`).

Both then resize with :func:`~mstar_extract.reading.resize.resize_patch` (PIL bilinear, one step).

``decode="full"`` (the default) gives, for every patch, the uint8 input of the mSTAR reference pipeline
(OpenSlide ``read_region`` -> ``convert('RGB')`` -> torchvision ``Resize(224)``) bit for bit: full JPEG decode,
black outside the level, and patches whose level-0 corner is not on the read level's pixel grid (OpenSlide
resamples those) read one by one through the backend. ``decode="reduced"`` (``--fast-decode``) decodes JPEG
tiles at 1/2, 1/4 or 1/8 size when the footprint allows and snaps off-grid corners (docs/reader.md).

A corrupt tile is retried once; if it still fails the batch raises :class:`~mstar_extract.errors.ReadError`
naming the patch's level-0 coordinate, or, with ``skip_bad_patches``, drops and reports the patch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from mstar_extract.errors import ReadError, SlideError
from mstar_extract.reading.batch import PatchBatch
from mstar_extract.reading.regions import read_region_reference
from mstar_extract.reading.resize import resize_image, resize_patch
from mstar_extract.reading.tiles import TiffTileSource, TileDecodeError
from mstar_extract.slides.base import Slide
from mstar_extract.tiling import ReadPlan

log = logging.getLogger("mstar.reading")

Method = Literal["auto", "tiles", "regions"]
Decode = Literal["full", "reduced"]
DECODES: tuple[str, ...] = ("full", "reduced")
"""``full``: the reference's pixels (default); ``reduced``: ``--fast-decode`` (docs/reader.md)."""
DEFAULT_OUT_SIZE = 224
DEFAULT_MAX_REGION_PX = 4096


def open_backend(path: str | os.PathLike, backend: str = "auto") -> Slide:
    """Open ``path`` with the slide layer (``mstar_extract.slides.open_slide``)."""
    from mstar_extract.slides import open_slide

    return open_slide(path, backend=backend)


def grid_order(coords: np.ndarray) -> np.ndarray:
    """Indices that sort ``coords`` (N, 2) [x, y] row-major (by y, then x): neighbours end up together."""
    coords = np.asarray(coords).reshape(-1, 2)
    return np.lexsort((coords[:, 0], coords[:, 1])).astype(np.int64)


def patches_overlap(coords: np.ndarray, size0: float) -> bool:
    """Whether any two patches of side ``size0`` (level-0 px) with top-left ``coords`` overlap."""
    c = np.asarray(coords).reshape(-1, 2)
    if c.shape[0] < 2:
        return False
    c = c[grid_order(c)]
    same_row = c[1:, 1] == c[:-1, 1]
    if (same_row & (c[1:, 0] - c[:-1, 0] < size0)).any():
        return True
    ys = np.unique(c[:, 1])
    if ys.shape[0] < 2 or np.diff(ys).min() >= size0:
        return False
    # rows closer than a patch: overlap when x ranges of patches in nearby rows intersect
    for y in ys.tolist():
        near = c[(c[:, 1] > y) & (c[:, 1] < y + size0)]
        if near.shape[0]:
            xs = c[c[:, 1] == y][:, 0]
            dx = np.abs(near[:, 0][:, None] - xs[None, :])
            if (dx < size0).any():
                return True
    return False


def row_regions(lc: np.ndarray, size: int, max_px: int) -> list[tuple[int, int, int, int, list[int]]]:
    """Group patches (level coords ``lc``, already in grid order) into row regions for one read each.

    A region holds consecutive patches with the same y whose x's touch or overlap (no gap wider than 0) and
    whose total width stays <= ``max_px``. Returns (x, y, w, h, positions) with positions into ``lc``.
    """
    regions: list[tuple[int, int, int, int, list[int]]] = []
    cur: list[int] = []
    for k in range(lc.shape[0]):
        x, y = int(lc[k, 0]), int(lc[k, 1])
        if cur:
            x0, y0 = int(lc[cur[0], 0]), int(lc[cur[0], 1])
            px = int(lc[cur[-1], 0])
            if y == y0 and px <= x <= px + size and x + size - x0 <= max_px:
                cur.append(k)
                continue
            regions.append((x0, y0, int(lc[cur[-1], 0]) + size - x0, size, cur))
        cur = [k]
    if cur:
        x0, y0 = int(lc[cur[0], 0]), int(lc[cur[0], 1])
        regions.append((x0, y0, int(lc[cur[-1], 0]) + size - x0, size, cur))
    return regions


class PatchReader:
    """Reads every patch of a :class:`ReadPlan` as model-ready uint8 batches. Use as a context manager.

    Iterating yields :class:`PatchBatch` objects in row-major grid order; ``batch.indices`` are plan rows.
    ``slide`` is a path (opened with ``backend``; the reader owns it) or an already open :class:`Slide`.
    After iteration, ``bad_indices``/``n_bad`` list the patches dropped with ``skip_bad_patches``.
    """

    def __init__(
        self,
        plan: ReadPlan,
        slide: str | os.PathLike | Slide,
        backend: str = "auto",
        out_size: int = DEFAULT_OUT_SIZE,
        batch_size: int = 64,
        *,
        method: Method = "auto",
        skip_bad_patches: bool = False,
        tile_cache_mb: float = 128,
        max_region_px: int = DEFAULT_MAX_REGION_PX,
        decode: Decode = "full",
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if decode not in DECODES:
            raise ValueError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
        self.decode: str = decode
        self.plan = plan
        self.backend = backend
        self.out_size = int(out_size)
        self.batch_size = int(batch_size)
        self.skip_bad_patches = skip_bad_patches
        self.max_region_px = int(max_region_px)
        self._owns_slide = not isinstance(slide, Slide)
        self._slide: Slide | None = None if self._owns_slide else slide  # type: ignore[assignment]
        self.path = Path(slide) if self._owns_slide else Path(slide.path)  # type: ignore[arg-type, union-attr]
        self._tiles: TiffTileSource | None = None
        self.bad: list[tuple[int, str]] = []
        self._last_out: np.ndarray = np.empty((0, self.out_size, self.out_size, 3), np.uint8)
        if method not in ("auto", "tiles", "regions"):
            raise ValueError(f"unknown read method {method!r}")
        if method in ("auto", "tiles"):
            size = self._level_size()
            self._tiles = TiffTileSource.open(self.path, size, cache_mb=tile_cache_mb)
            if self._tiles is None:  # DICOM frames, OME-TIFF levels
                from mstar_extract.reading.format_sources import open_format_source

                self._tiles = open_format_source(self.slide, plan.level, tile_cache_mb)
            if self._tiles is None and method == "tiles":
                raise ValueError(f"{self.path}: level {plan.level} is not a tiled TIFF page that tifffile can decode")
        self.method: str = "tiles" if self._tiles is not None else "regions"
        if self._tiles is not None:
            self._tiles.direct = not patches_overlap(plan.coords, plan.read_size * plan.level_downsample)
        self._warned_off_grid = False
        if self._tiles is not None and decode == "reduced":
            self._choose_scale()
        log.debug("%s: reading level %d with the %s path", self.path, plan.level, self.method)

    def _choose_scale(self) -> None:
        """``--fast-decode``: the largest DCT scale (8, 4, 2) that keeps the footprint >= the model input and
        divides every patch corner (so no patch moves by a fraction of a reduced pixel), if the tiles allow it."""
        assert self._tiles is not None
        r = self.plan.read_size
        lc, _ = self._level_coords(self.plan.coords)
        g = int(np.gcd.reduce(np.abs(lc).reshape(-1))) if lc.size else 0
        for sc in (8, 4, 2):
            if (r % sc == 0 and r // sc >= self.out_size and (g == 0 or g % sc == 0) and self._tiles.can_scale(sc)
                    and self._tiles.set_scale(sc)):
                return

    # -- slide handle ---------------------------------------------------------------------------------------
    def _level_size(self) -> tuple[int, int]:
        lv = self.slide.levels[self.plan.level]
        return lv.width, lv.height

    @property
    def slide(self) -> Slide:
        """The open slide (opened on first use when the reader was given a path)."""
        if self._slide is None:
            self._slide = open_backend(self.path, self.backend)
        return self._slide

    def _reopen(self) -> None:
        """After a failed read: OpenSlide handles are unusable after an error, so open the file again."""
        if not self._owns_slide:
            return
        if self._slide is not None:
            try:
                self._slide.close()
            except Exception:  # noqa: BLE001
                pass
        self._slide = None

    def close(self) -> None:
        if self._tiles is not None:
            self._tiles.close()
            self._tiles = None
        if self._owns_slide and self._slide is not None:
            self._slide.close()
            self._slide = None

    def __enter__(self) -> PatchReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- iteration ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.plan)

    @property
    def decode_scale(self) -> int:
        """1, or 2/4/8 when JPEG tiles are decoded at reduced size (libjpeg DCT scaling, see docs/reader.md)."""
        return self._tiles.scale if self._tiles is not None else 1

    @property
    def n_bad(self) -> int:
        return len(self.bad)

    @property
    def bad_indices(self) -> np.ndarray:
        return np.array([i for i, _ in self.bad], dtype=np.int64)

    def chunks(self) -> list[np.ndarray]:
        """The plan rows of each batch, in order (grid order cut into ``batch_size`` pieces)."""
        order = grid_order(self.plan.coords)
        return [order[i : i + self.batch_size] for i in range(0, order.shape[0], self.batch_size)]

    def __iter__(self) -> Iterator[PatchBatch]:
        for chunk in self.chunks():
            yield self.read_batch(chunk)

    def read_batch(self, indices: np.ndarray, out: np.ndarray | None = None) -> PatchBatch:
        """Read the patches of plan rows ``indices`` (best in grid order) into ``out`` (B, S, S, 3) uint8."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        coords = self.plan.coords[indices]
        ok, msgs = self.read_coords(coords, out, _keep=True)
        pixels = self._last_out
        if ok.all():
            return PatchBatch(indices, pixels[: len(indices)], coords)
        bad_pos = np.flatnonzero(~ok)
        good_pos = np.flatnonzero(ok)
        m = good_pos.shape[0]
        if m:
            pixels[:m] = pixels[good_pos]
        bad_rows = indices[bad_pos]
        for row, msg in zip(bad_rows.tolist(), msgs, strict=True):
            self.bad.append((int(row), msg))
        return PatchBatch(indices[good_pos], pixels[:m], coords[good_pos], bad_rows, msgs)

    def read_coords(self, coords: np.ndarray, out: np.ndarray | None = None, *,
                    _keep: bool = False) -> tuple[np.ndarray, list[str]]:
        """Low level: read patches with level-0 top-left ``coords`` (B, 2) into ``out[k]`` (B, S, S, 3) uint8.

        Returns ``ok`` (B,) bool and one message per failed patch; failed rows of ``out`` are undefined.
        Raises :class:`ReadError` on the first failed patch unless ``skip_bad_patches`` (then logs a warning).
        """
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        n, s = coords.shape[0], self.out_size
        if out is None:
            out = np.empty((n, s, s, 3), np.uint8)
        elif out.shape[0] < n or out.shape[1:] != (s, s, 3) or out.dtype != np.uint8:
            raise ValueError(f"out buffer {out.shape} {out.dtype} cannot hold {n} patches of {s}x{s}x3 uint8")
        if _keep:
            self._last_out = out
        lc, off_grid = self._level_coords(coords)
        ok = np.ones(n, dtype=bool)
        reasons: dict[int, str] = {}
        on = np.flatnonzero(~off_grid)
        if on.shape[0] == n:
            self._read_fast(coords, lc, out, ok, reasons)
        else:
            sub_ok = np.ones(on.shape[0], dtype=bool)
            sub_out = np.empty((on.shape[0], s, s, 3), np.uint8)
            sub_reasons: dict[int, str] = {}
            self._read_fast(coords[on], lc[on], sub_out, sub_ok, sub_reasons)
            out[on], ok[on] = sub_out, sub_ok
            reasons.update({int(on[k]): v for k, v in sub_reasons.items()})
            for k in np.flatnonzero(off_grid).tolist():
                self._read_single(coords[k], k, out, ok, reasons)
        bad_pos = np.flatnonzero(~ok)
        if bad_pos.size and not self.skip_bad_patches:
            k = int(bad_pos[0])
            raise ReadError(self.path, self._bad_message(coords[k], reasons[k], len(bad_pos)))
        msgs = [self._bad_message(coords[k], reasons[k], 1) for k in bad_pos.tolist()]
        for msg in msgs:
            log.warning("%s: dropped patch: %s", self.path, msg)
        return ok, msgs

    def _bad_message(self, xy: np.ndarray, reason: str, count: int) -> str:
        more = f" ({count - 1} more patches of this batch also failed)" if count > 1 else ""
        hint = "" if self.skip_bad_patches else "; --skip-bad-patches drops such patches instead"
        return (f"cannot decode the patch at level-0 (x={int(xy[0])}, y={int(xy[1])}) (level {self.plan.level}, "
                f"{self.plan.read_size} px): {reason}{more}{hint}")

    def _level_coords(self, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Level pixel corners (rounded) and which patches are off the level's pixel grid and must be read one
        by one for exact pixels (``decode="full"`` at a level whose downsample does not divide the corner)."""
        ds = float(self.plan.level_downsample)
        if self.plan.level == 0 or ds == 1:
            return coords, np.zeros(coords.shape[0], dtype=bool)
        lf = coords / ds  # OpenSlide's own level position (a double); fractional -> it resamples
        lc = np.rint(lf).astype(np.int64)
        if self.decode != "full":
            return lc, np.zeros(coords.shape[0], dtype=bool)
        off = (lf != lc).any(axis=1)
        if off.any() and not self._warned_off_grid:
            self._warned_off_grid = True
            log.info("%s: %d patch corner(s) are not on level %d's pixel grid (downsample %.6g): read one by one "
                     "through the slide backend for exact pixels (slower; --fast-decode snaps them)",
                     self.path, int(off.sum()), self.plan.level, ds)
        return lc, off

    def _read_fast(self, coords: np.ndarray, lc: np.ndarray, out: np.ndarray, ok: np.ndarray,
                   reasons: dict[int, str]) -> None:
        if self.method == "tiles":
            self._read_tiles(lc, out, ok, reasons)
        else:
            self._read_regions(coords, lc, out, ok, reasons)

    def _read_single(self, xy: np.ndarray, k: int, out: np.ndarray, ok: np.ndarray, reasons: dict[int, str]) -> None:
        patch, reason = self._read_one_with_retry((int(xy[0]), int(xy[1])), self.plan.read_size, self.plan.level)
        if patch is None:
            ok[k] = False
            reasons[k] = reason
        else:
            resize_patch(patch, self.out_size, out=out[k])

    # -- the two paths --------------------------------------------------------------------------------------
    def _read_tiles(self, lc: np.ndarray, out: np.ndarray, ok: np.ndarray, reasons: dict[int, str]) -> None:
        assert self._tiles is not None
        sc = self._tiles.scale
        r = self.plan.read_size // sc
        for k in range(lc.shape[0]):
            try:
                img = self._tiles.read_image(int(lc[k, 0]) // sc, int(lc[k, 1]) // sc, r, r)
            except TileDecodeError as exc:
                ok[k] = False
                tx, ty, _, _ = exc.tile_box
                reasons[k] = f"corrupt tile at level-{self.plan.level} pixel ({tx}, {ty}): {exc.reason}"
                continue
            resize_image(img, self.out_size, out=out[k])

    def _read_regions(self, c0: np.ndarray, lc: np.ndarray, out: np.ndarray, ok: np.ndarray, reasons: dict[int, str]) -> None:
        r, level = self.plan.read_size, self.plan.level
        for x, _y, w, h, members in row_regions(lc, r, self.max_region_px):
            loc0 = (int(c0[members[0], 0]), int(c0[members[0], 1]))
            try:
                region = self._backend_read(loc0, level, (w, h)) if len(members) > 1 else None
            except Exception as exc:  # noqa: BLE001 - fall back to reading this region's patches one by one
                log.debug("%s: region read failed (%s); reading its patches one by one", self.path, exc)
                self._reopen()
                region = None
            for k in members:
                if region is not None:
                    ox = int(lc[k, 0]) - x
                    resize_patch(region[:, ox : ox + r], self.out_size, out=out[k])
                    continue
                patch, reason = self._read_one_with_retry((int(c0[k, 0]), int(c0[k, 1])), r, level)
                if patch is None:
                    ok[k] = False
                    reasons[k] = reason
                else:
                    resize_patch(patch, self.out_size, out=out[k])

    def _backend_read(self, loc0: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        img = read_region_reference(self.slide, loc0, level, size)
        if img.shape != (size[1], size[0], 3) or img.dtype != np.uint8:
            raise ValueError(f"backend returned {img.shape} {img.dtype} for a {size} read")
        return img

    def _read_one_with_retry(self, loc: tuple[int, int], r: int, level: int) -> tuple[np.ndarray | None, str]:
        """Read one patch through the backend; on failure reopen the slide and retry once."""
        reason = ""
        for _attempt in range(2):
            try:
                return self._backend_read(loc, level, (r, r)), ""
            except Exception as exc:  # noqa: BLE001
                reason = exc.reason if isinstance(exc, SlideError) else f"{type(exc).__name__}: {exc}"
                self._reopen()
        return None, reason


def read_patches_naive(
    plan: ReadPlan,
    slide: str | os.PathLike | Slide,
    backend: str = "auto",
    out_size: int = DEFAULT_OUT_SIZE,
    indices: np.ndarray | None = None,
) -> np.ndarray:
    """The baseline that CLAM/TRIDENT/mSTAR code does: one ``read_region`` per patch (the reference's pixels:
    alpha dropped, black outside the level), then the same one-step PIL resize.

    Returns (N, S, S, 3) uint8 in the order of ``indices`` (default: plan order). Errors propagate.
    """
    own = not isinstance(slide, Slide)
    sl: Slide = open_backend(slide, backend) if own else slide  # type: ignore[arg-type, assignment]
    try:
        rows = np.arange(len(plan)) if indices is None else np.asarray(indices, dtype=np.int64)
        out = np.empty((rows.shape[0], out_size, out_size, 3), np.uint8)
        r = plan.read_size
        for k, i in enumerate(rows.tolist()):
            x, y = plan.coords[i]
            img = read_region_reference(sl, (int(x), int(y)), plan.level, (r, r))
            resize_patch(img, out_size, out=out[k])
        return out
    finally:
        if own:
            sl.close()
