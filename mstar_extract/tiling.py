"""Tiling: patch coordinates at a target resolution, in level-0 pixels, and the exact read plan.

:class:`ReadPlan` is the contract between tiling, coordinate files, the reader and the feature store;
:func:`plan_tiles` builds one from a slide and its tissue mask (see docs/tiling.md for the rules).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mstar_extract.slides.base import Slide
    from mstar_extract.tissue.result import TissueMask


@dataclass
class ReadPlan:
    """Exactly how to read every patch of one slide.

    For patch ``i``: read a ``read_size`` x ``read_size`` region at pyramid ``level`` whose top-left corner is
    ``coords[i]`` (level-0 pixels). That region covers ``patch_size_level0`` level-0 pixels, i.e. ``patch_size``
    pixels at the target resolution; the reader resizes it (antialiased) to the model input size.
    """

    coords: np.ndarray
    """(N, 2) int64 ``[x, y]`` top-left corners in level-0 pixels."""
    level: int
    """Pyramid level the pixels are read from."""
    level_downsample: float
    """That level's downsample relative to level 0."""
    read_size: int
    """Square region size in pixels at ``level``."""
    patch_size: int
    """Patch size in pixels at the target resolution (e.g. 256 at 20x)."""
    patch_size_level0: int
    """Patch footprint in level-0 pixels."""
    target_mpp: float
    target_magnification: float | None
    level0_mpp: float | None
    level0_magnification: float | None
    level0_width: int
    level0_height: int
    overlap: int = 0
    """Overlap between neighbouring patches, in pixels at the target resolution."""
    source: str = "mstar"
    """Where the coordinates came from: ``mstar`` (this tool's tiling), ``clam``, ``trident``."""
    settings: dict = field(default_factory=dict)
    """Segmentation/tiling settings used (recorded as JSON in output files)."""
    tissue_fraction: np.ndarray | None = None
    """(N,) float32 tissue fraction of each patch when known (tiling), else None."""

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return int(self.coords.shape[0])


# ------------------------------------------------------------------------------------------------ tiling
NOMINAL_MAGNIFICATIONS = (100.0, 80.0, 60.0, 40.0, 20.0, 10.0, 5.0, 2.5, 1.25, 0.625)
"""Objective magnifications a slide's level-0 resolution snaps to (mpp = 10 / magnification)."""

DEFAULT_MIN_TISSUE = 0.5
"""Default ``--min-tissue``: a patch is kept when at least half of it lies on tissue (see docs/tiling.md)."""


@dataclass(frozen=True)
class TilingParams:
    """Target resolution and grid. Give ``magnification`` (default 20x) or ``mpp`` (wins when set)."""

    magnification: float | None = 20.0
    """Target objective magnification (20 -> 0.5 µm/px)."""
    mpp: float | None = None
    """Target µm/px; overrides ``magnification`` when set."""
    patch_size: int = 256
    """Patch side in pixels at the target resolution."""
    overlap: int = 0
    """Overlap of neighbouring patches in pixels at the target resolution (step = patch_size - overlap)."""
    min_tissue: float = DEFAULT_MIN_TISSUE
    """Minimum fraction of the patch on tissue (0..1) for the patch to be kept."""
    exact_mpp: bool = False
    """Scale by the exact mpp ratio instead of snapping level 0 to its nominal objective."""
    snap_tolerance: float = 0.2
    """Relative tolerance for snapping a level-0 magnification (10 / mpp) to a nominal objective."""

    def __post_init__(self) -> None:
        if self.patch_size <= 0:
            raise ValueError("patch size must be positive")
        if not 0 <= self.overlap < self.patch_size:
            raise ValueError(f"overlap must be in [0, patch_size), got {self.overlap}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"min_tissue must be in [0, 1], got {self.min_tissue}")
        if self.mpp is None and self.magnification is None:
            raise ValueError("give a target magnification or mpp")
        if (self.mpp is not None and self.mpp <= 0) or (self.magnification is not None and self.magnification <= 0):
            raise ValueError("target magnification/mpp must be positive")

    def target(self) -> tuple[float, float]:
        """(target mpp, target magnification)."""
        if self.mpp is not None:
            return float(self.mpp), snap_magnification(10.0 / self.mpp, self.snap_tolerance) or 10.0 / self.mpp
        mag = float(self.magnification)  # type: ignore[arg-type]
        return 10.0 / mag, mag

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def snap_magnification(magnification: float, tolerance: float = 0.2) -> float | None:
    """The nominal objective within ``tolerance`` (relative) of ``magnification``, else None.

    >>> snap_magnification(10 / 0.2527), snap_magnification(10 / 0.4990), snap_magnification(31.0)
    (40.0, 20.0, None)
    """
    best = min(NOMINAL_MAGNIFICATIONS, key=lambda m: abs(magnification / m - 1.0))
    return best if abs(magnification / best - 1.0) <= tolerance else None


@dataclass(frozen=True)
class Geometry:
    """How the target grid maps onto level 0."""

    downsample: float
    """Level-0 pixels per target pixel."""
    patch_size_level0: int
    step_level0: float
    level0_magnification: float
    target_mpp: float
    target_magnification: float
    snapped: bool


def grid_geometry(level0_mpp: float, params: TilingParams) -> Geometry:
    """Downsample from level 0 to the target, footprint and step, by the magnification rules.

    Default: level 0's magnification (10 / mpp) snaps to the nominal objective within ``snap_tolerance`` and the
    downsample is the ratio of nominal magnifications (0.2527 µm/px -> 40x -> 20x target = exactly 2), so grids
    of all scanners line up. ``exact_mpp`` (or no nominal objective within tolerance) uses target/level-0 mpp.
    """
    target_mpp, target_mag = params.target()
    mag0 = 10.0 / level0_mpp
    nominal = None if params.exact_mpp else snap_magnification(mag0, params.snap_tolerance)
    if nominal is not None:
        ds = nominal / target_mag if params.mpp is None else nominal * target_mpp / 10.0
        mag0_out = nominal
    else:
        ds = target_mpp / level0_mpp
        mag0_out = mag0
    ps0 = max(1, int(round(params.patch_size * ds)))
    step0 = (params.patch_size - params.overlap) * ds
    return Geometry(ds, ps0, step0, mag0_out, target_mpp, target_mag, nominal is not None)


def choose_level(level_downsamples: tuple[float, ...] | list[float], downsample: float, rel_tol: float = 1e-3) -> int:
    """The coarsest pyramid level whose downsample is <= ``downsample`` (no upsampling ever happens)."""
    best = 0
    for i, d in enumerate(level_downsamples):
        if d <= downsample * (1.0 + rel_tol) and d >= level_downsamples[best]:
            best = i
    return best


def grid_coords(width: int, height: int, patch_size_level0: int, step_level0: float) -> np.ndarray:
    """(N, 2) int64 top-left corners of every patch that lies fully inside ``width`` x ``height``, on a grid
    anchored at the slide origin (so grids of different scans of the same glass coincide physically)."""
    nx = int(np.floor((width - patch_size_level0) / step_level0)) + 1 if width >= patch_size_level0 else 0
    ny = int(np.floor((height - patch_size_level0) / step_level0)) + 1 if height >= patch_size_level0 else 0
    xs = np.round(np.arange(nx) * step_level0).astype(np.int64)
    ys = np.round(np.arange(ny) * step_level0).astype(np.int64)
    xs, ys = xs[xs + patch_size_level0 <= width], ys[ys + patch_size_level0 <= height]
    gx, gy = np.meshgrid(xs, ys)  # row-major: y outer, x inner
    return np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.int64)


def tissue_fractions(coords: np.ndarray, patch_size_level0: int, mask: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """Fraction of each patch's footprint covered by ``mask`` (bool, mask pixel = scale_x x scale_y level-0 px),
    computed exactly on the mask grid with an integral image (partial mask pixels weighted by overlap)."""
    if len(coords) == 0:
        return np.zeros(0, np.float64)
    m = mask.astype(np.float64)
    integral = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.float64)
    integral[1:, 1:] = m.cumsum(0).cumsum(1)
    H, W = m.shape

    def cum(xf: np.ndarray, yf: np.ndarray) -> np.ndarray:
        """Integral of the mask over [0, xf) x [0, yf) in fractional mask pixels (bilinear in the integral)."""
        xf = np.clip(xf, 0, W)
        yf = np.clip(yf, 0, H)
        x0 = np.floor(xf).astype(np.int64)
        y0 = np.floor(yf).astype(np.int64)
        x1, y1 = np.minimum(x0 + 1, W), np.minimum(y0 + 1, H)
        ax, ay = xf - x0, yf - y0
        return (integral[y0, x0] * (1 - ax) * (1 - ay) + integral[y0, x1] * ax * (1 - ay)
                + integral[y1, x0] * (1 - ax) * ay + integral[y1, x1] * ax * ay)

    x0 = coords[:, 0] / scale_x
    y0 = coords[:, 1] / scale_y
    x1 = (coords[:, 0] + patch_size_level0) / scale_x
    y1 = (coords[:, 1] + patch_size_level0) / scale_y
    area = (x1 - x0) * (y1 - y0)
    inside = cum(x1, y1) - cum(x0, y1) - cum(x1, y0) + cum(x0, y0)
    return np.clip(inside / area, 0.0, 1.0)


def centres_in(coords: np.ndarray, patch_size_level0: int, mask: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """Whether each patch's centre falls on a ``True`` pixel of ``mask``."""
    if len(coords) == 0:
        return np.zeros(0, bool)
    cx = ((coords[:, 0] + patch_size_level0 / 2.0) / scale_x).astype(np.int64)
    cy = ((coords[:, 1] + patch_size_level0 / 2.0) / scale_y).astype(np.int64)
    cx = np.clip(cx, 0, mask.shape[1] - 1)
    cy = np.clip(cy, 0, mask.shape[0] - 1)
    return mask[cy, cx].astype(bool)


def plan_tiles(slide: Slide, mask_result: TissueMask, params: TilingParams | None = None) -> ReadPlan:
    """Patch grid at the target resolution over ``slide``'s tissue (``mask_result``: a TissueMask).

    Keeps patches with tissue fraction >= ``min_tissue`` whose centre is not in a hole; raises
    :class:`~mstar_extract.errors.ResolutionError` when the slide has no mpp. The plan's level is the coarsest
    whose downsample does not exceed the target downsample; ``read_size`` is the footprint at that level.
    """
    params = params or TilingParams()
    level0_mpp = float(slide.mpp)
    geo = grid_geometry(level0_mpp, params)
    if geo.downsample < 1.0 - 1e-6:
        from mstar_extract.errors import SlideError

        raise SlideError(
            slide.path,
            f"target {geo.target_magnification:g}x ({geo.target_mpp:g} µm/px) is finer than the slide's level 0 "
            f"({geo.level0_magnification:g}x, {level0_mpp:g} µm/px); patches would be upsampled — "
            "choose a lower --magnification or a larger --mpp",
        )
    w0, h0 = slide.dimensions
    level = choose_level(slide.level_downsamples, geo.downsample)
    level_ds = float(slide.level_downsamples[level])
    read_size = max(1, int(round(geo.patch_size_level0 / level_ds)))
    coords = grid_coords(w0, h0, geo.patch_size_level0, geo.step_level0)
    frac = tissue_fractions(coords, geo.patch_size_level0, mask_result.tissue, mask_result.scale_x, mask_result.scale_y)
    keep = frac >= max(params.min_tissue, 1e-9)
    if mask_result.holes.any():
        keep &= ~centres_in(coords, geo.patch_size_level0, mask_result.holes, mask_result.scale_x, mask_result.scale_y)
    settings = {"tiling": params.to_dict(), "snapped": geo.snapped, "downsample": geo.downsample,
                "mpp_source": getattr(slide, "mpp_source", None)}  # metadata / override / objective (estimate)
    return ReadPlan(
        coords=coords[keep],
        level=level,
        level_downsample=level_ds,
        read_size=read_size,
        patch_size=params.patch_size,
        patch_size_level0=geo.patch_size_level0,
        target_mpp=geo.target_mpp,
        target_magnification=geo.target_magnification,
        level0_mpp=level0_mpp,
        level0_magnification=geo.level0_magnification,
        level0_width=int(w0),
        level0_height=int(h0),
        overlap=params.overlap,
        source="mstar",
        settings=settings,
        tissue_fraction=frac[keep].astype(np.float32),
    )
