"""Tissue segmentation of a slide: low-resolution read, pixel detection, morphology, contours with holes.

Steps (every threshold is a :class:`SegmentationParams` field):

1. read the slide at ``seg_mpp`` µm/px (bounded memory, never level 0 whole; bounded time: a level of more than
   ``--max-read-pixels`` is refused before decoding, :mod:`mstar_extract.slides.downsample`);
2. tissue candidates by HSV saturation (median blur, Otsu clipped to [sat_min, sat_max]) plus faint tissue
   (slightly saturated *and* darker than the glass background);
3. pen ink (blue/green/red by hue and saturation, black by darkness and size, and black ink followed from glass
   into the tissue it crosses) and dark artefacts (slide borders, debris) are grown by ``pen_dilate_um`` and removed;
4. closing (``close_um``) bridges gaps, opening (``open_um``) drops slivers;
5. contours with holes (``RETR_CCOMP``): pieces below ``min_tissue_area_um2`` are dropped, holes of at least
   ``min_hole_area_um2`` (or holes left by ink) are excluded, smaller holes are filled.
"""

from __future__ import annotations

import numpy as np

from mstar_extract.slides.base import Slide
from mstar_extract.slides.downsample import read_at_mpp
from mstar_extract.tissue.contours import find_contours, rasterize, to_level0
from mstar_extract.tissue.detect import detect_pixels, disk, odd_px
from mstar_extract.tissue.params import SegmentationParams
from mstar_extract.tissue.result import TissueMask


def segment_image(
    rgb: np.ndarray, mpp: float, params: SegmentationParams | None = None, scale_x: float = 1.0, scale_y: float | None = None
) -> TissueMask:
    """Segment an RGB uint8 image taken at ``mpp`` µm/px; ``scale_x/y`` = level-0 px per image px."""
    import cv2

    params = params or SegmentationParams()
    scale_y = scale_x if scale_y is None else scale_y
    px = detect_pixels(rgb, mpp, params)
    tissue = px.candidate & ~px.remove
    m = tissue.astype(np.uint8)
    c = odd_px(params.close_um, mpp, 1)
    if c > 1:
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, disk(c))
    o = odd_px(params.open_um, mpp, 1)
    if o > 1:
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, disk(o))
    m &= (~px.remove).astype(np.uint8)
    raw = find_contours(m, mpp, params.min_tissue_area_um2, params.min_hole_area_um2, force_hole=px.remove)
    tissue_mask, holes = rasterize(raw, m.shape)
    tissue_mask &= ~px.remove
    stats = dict(px.stats)
    return TissueMask(
        tissue=tissue_mask,
        holes=holes,
        pen=px.pen,
        artefact=px.artefact,
        scale_x=float(scale_x),
        scale_y=float(scale_y),
        mask_mpp=float(mpp),
        contours=to_level0(raw, scale_x, scale_y),
        thumbnail=rgb,
        source="segmented",
        stats=stats,
    )


def segmentation_mpp(slide: Slide, params: SegmentationParams) -> float:
    """The µm/px segmentation runs at for ``slide``.

    A pyramid level whose resolution lies in [``seg_mpp``, ``seg_max_mpp``] is used as stored (no resampling);
    otherwise ``seg_mpp``. Small slides go finer so the longer side keeps >= ``seg_min_side`` pixels; never finer
    than level 0.
    """
    level0_mpp = slide.mpp
    longest_um = max(slide.dimensions) * level0_mpp
    coarsest_allowed = longest_um / max(1, params.seg_min_side)  # coarser than this loses too much detail
    upper = min(params.seg_max_mpp, coarsest_allowed)
    stored = [level0_mpp * d for d in slide.level_downsamples]
    usable = [m for m in stored if params.seg_mpp * (1 - 1e-6) <= m <= upper * 1.05]  # 5%: level sizes are rounded
    if usable:
        return max(usable)
    return max(level0_mpp, min(params.seg_mpp, coarsest_allowed))


def segment_slide(slide: Slide, params: SegmentationParams | None = None) -> TissueMask:
    """Segment ``slide`` at :func:`segmentation_mpp` (raises ResolutionError if the slide has no mpp)."""
    params = params or SegmentationParams()
    level0_mpp = slide.mpp
    ds = read_at_mpp(slide, segmentation_mpp(slide, params), level0_mpp)
    mpp = level0_mpp * ds.scale
    result = segment_image(ds.image, mpp, params, ds.scale_x, ds.scale_y)
    result.stats["read_level"] = ds.level
    return result
