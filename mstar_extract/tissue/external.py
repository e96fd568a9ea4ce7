"""``--tissue-mask``: use a given tissue outline instead of segmenting — a GeoJSON (QuPath/TRIDENT contours in
level-0 pixels) or a mask image (non-zero = tissue, any size with the slide's aspect ratio; scaled to the slide).

``--tissue-mask`` may name one file (used for every slide) or a folder holding one file per slide:
``<slide_id>.geojson`` / ``.json`` / ``.png`` / ``.tif`` / ``.tiff`` / ``.jpg`` (also under
``contours_geojson/``, TRIDENT's layout).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mstar_extract.errors import SlideError
from mstar_extract.slides.base import Slide
from mstar_extract.slides.downsample import read_downsampled
from mstar_extract.tissue.contours import find_contours, rasterize_level0, to_level0
from mstar_extract.tissue.geojson import read_geojson_contours
from mstar_extract.tissue.params import SegmentationParams
from mstar_extract.tissue.result import TissueMask

GEOJSON_EXT = (".geojson", ".json")
IMAGE_EXT = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
MAX_MASK_SIDE = 8192


def find_mask_file(spec: str | os.PathLike[str], slide_id: str) -> Path | None:
    """The mask file for ``slide_id``: ``spec`` itself when it is a file, else a per-slide file in the folder."""
    p = Path(spec)
    if p.is_file():
        return p
    if p.is_dir():
        for sub in ("", "contours_geojson", "masks"):
            for ext in GEOJSON_EXT + IMAGE_EXT:
                for stem in (slide_id, f"{slide_id}_tissue", f"{slide_id}_mask"):
                    c = (p / sub / f"{stem}{ext}") if sub else (p / f"{stem}{ext}")
                    if c.is_file():
                        return c
    return None


def _grid_scale(slide: Slide, params: SegmentationParams) -> tuple[float, float | None]:
    """(level-0 px per mask px, mask µm/px or None) for rasterising an outline on ``slide``."""
    w0, h0 = slide.dimensions
    try:
        mpp = float(slide.mpp)
    except SlideError:
        mpp = None
    if mpp is not None:
        from mstar_extract.tissue.segment import segmentation_mpp

        ds = max(1.0, segmentation_mpp(slide, params) / mpp)
    else:
        ds = max(1.0, max(w0, h0) / 2048.0)
    return ds, (mpp * ds if mpp is not None else None)


def load_tissue_mask(path: str | os.PathLike[str], slide: Slide, params: SegmentationParams | None = None) -> TissueMask:
    """A :class:`TissueMask` of ``slide`` from a GeoJSON or mask-image file (raises SlideError if unusable)."""
    import cv2

    params = params or SegmentationParams()
    path = Path(path)
    w0, h0 = slide.dimensions
    ds, mask_mpp = _grid_scale(slide, params)
    thumb = read_downsampled(slide, ds)
    sx, sy = thumb.scale_x, thumb.scale_y
    shape = thumb.image.shape[:2]
    if path.suffix.lower() in GEOJSON_EXT:
        try:
            contours = read_geojson_contours(path)
        except Exception as exc:  # noqa: BLE001 - one line for the user
            raise SlideError(slide.path, f"tissue mask {path}: {exc}") from None
        tissue, holes = rasterize_level0(contours, shape, sx, sy)
        source = "geojson"
    elif path.suffix.lower() in IMAGE_EXT:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise SlideError(slide.path, f"tissue mask {path}: not a readable image")
        m = (img.reshape(img.shape[0], img.shape[1], -1)[..., :3] > 0).any(axis=2)
        mh, mw = m.shape
        if abs((w0 / mw) / (h0 / mh) - 1.0) > 0.05:
            raise SlideError(slide.path, f"tissue mask {path}: {mw}x{mh} does not have the slide's aspect ratio ({w0}x{h0})")
        m = cv2.resize(np.asarray(m, dtype=np.float32), (shape[1], shape[0]), interpolation=cv2.INTER_AREA) >= 0.5
        raw = find_contours(m, 1.0, 0.0, 0.0)
        contours = to_level0(raw, sx, sy)
        filled = np.zeros(shape, np.uint8)
        for o, _ in raw:
            cv2.drawContours(filled, [o.reshape(-1, 1, 2).astype(np.int32)], -1, 1, thickness=cv2.FILLED)
        tissue = m
        holes = filled.astype(bool) & ~m
        source = "mask-image"
    else:
        raise SlideError(slide.path, f"tissue mask {path}: unknown type (use .geojson/.json or an image: {', '.join(IMAGE_EXT)})")
    empty = np.zeros(shape, bool)
    return TissueMask(tissue=tissue, holes=holes, pen=empty, artefact=empty.copy(), scale_x=sx, scale_y=sy,
                      mask_mpp=mask_mpp, contours=contours, thumbnail=thumb.image, source=source,
                      stats={"mask_file": str(path)})
