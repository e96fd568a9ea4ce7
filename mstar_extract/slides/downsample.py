"""Read a whole slide at a coarse resolution with bounded memory (never level 0 whole).

The coarsest pyramid level that is at least as fine as the wanted resolution is read — whole when it is small,
otherwise in horizontal strips that are downscaled one by one — and resized (area filter) to the wanted size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mstar_extract.slides.base import Slide

STRIP_BYTES = 48 * 1024 * 1024
"""Largest RGB buffer read from the slide at once."""


@dataclass
class Downsampled:
    """An RGB image of the whole slide and its geometry relative to level 0."""

    image: np.ndarray
    """uint8 (h, w, 3)."""
    scale_x: float
    """Level-0 pixels per image pixel along x."""
    scale_y: float
    level: int
    """Pyramid level the pixels came from."""

    @property
    def scale(self) -> float:
        return (self.scale_x + self.scale_y) / 2.0


def read_downsampled(slide: Slide, downsample: float, max_bytes: int = STRIP_BYTES) -> Downsampled:
    """The whole slide at ``downsample`` (level-0 px per output px, >= 1), read level- and strip-wise."""
    import cv2

    downsample = max(float(downsample), 1.0)
    w0, h0 = slide.dimensions
    out_w, out_h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
    level = slide.get_best_level_for_downsample(downsample)
    lv = slide.levels[level]
    fy = lv.height / out_h  # level px per output px (>= ~1)
    row_bytes = lv.width * 3
    if row_bytes * lv.height <= max_bytes:
        img = slide.read_region((0, 0), level, (lv.width, lv.height))
        if img.shape[:2] != (out_h, out_w):
            img = cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA)
        return Downsampled(np.ascontiguousarray(img), w0 / out_w, h0 / out_h, level)

    out = np.empty((out_h, out_w, 3), np.uint8)
    rows_per_strip = max(1, int(max_bytes // (row_bytes * max(fy, 1.0))))
    for r0 in range(0, out_h, rows_per_strip):
        r1 = min(out_h, r0 + rows_per_strip)
        ly0 = int(round(r0 * fy))
        ly1 = min(lv.height, max(ly0 + 1, int(round(r1 * fy))))
        y_level0 = int(round(ly0 * lv.downsample))
        strip = slide.read_region((0, y_level0), level, (lv.width, ly1 - ly0))
        out[r0:r1] = cv2.resize(strip, (out_w, r1 - r0), interpolation=cv2.INTER_AREA)
        del strip
    return Downsampled(out, w0 / out_w, h0 / out_h, level)


def read_at_mpp(slide: Slide, mpp: float, level0_mpp: float, max_bytes: int = STRIP_BYTES) -> Downsampled:
    """The whole slide at about ``mpp`` µm/px (never finer than level 0)."""
    return read_downsampled(slide, mpp / level0_mpp, max_bytes)


def read_max_side(slide: Slide, max_side: int, max_bytes: int = STRIP_BYTES) -> Downsampled:
    """The whole slide with its longer side at most ``max_side`` pixels."""
    w0, h0 = slide.dimensions
    return read_downsampled(slide, max(w0, h0) / max_side, max_bytes)
