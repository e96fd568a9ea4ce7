"""Read a whole slide at a coarse resolution with bounded memory (never level 0 whole) and bounded time.

The coarsest pyramid level that is at least as fine as the wanted resolution is read — whole when it is small,
otherwise in horizontal strips of at most :data:`STRIP_BYTES` that are downscaled one by one — and resized (area
filter) to the wanted size. A level of more than the read limit (``--max-read-pixels``, default 2 gigapixels,
:mod:`mstar_extract.slides.limits`) is refused before any pixel is decoded: that happens only to slides without a
pyramid, where every pixel of level 0 would be decoded. A read of many strips logs its progress (``-v``; every
``MSTAR_PROGRESS_INTERVAL`` seconds, default 30).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from mstar_extract.errors import SlideError
from mstar_extract.slides.base import Slide
from mstar_extract.slides.limits import ENV_MAX_READ_PIXELS, max_read_pixels, megapixels

log = logging.getLogger("mstar")

STRIP_BYTES = 48 * 1024 * 1024
"""Largest RGB buffer read from the slide at once."""
WARN_READ_PIXELS = 250_000_000
"""A read of a level larger than this (a slide without a coarse pyramid level) is announced with a warning."""


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


def check_read_size(slide: Slide, level: int, limit: int | None = None) -> None:
    """Raise :class:`SlideError` when reading ``level`` whole would decode more than the read limit."""
    limit = max_read_pixels() if limit is None else limit
    lv = slide.levels[level]
    n = lv.width * lv.height
    if n <= limit:
        return
    where = ("the slide has no pyramid: its only level is" if slide.level_count == 1
             else f"its coarsest level fine enough, level {level}, is")
    raise SlideError(slide.path, f"{where} {lv.width}x{lv.height} = {megapixels(n)}, more than the "
                                 f"{megapixels(limit)} that segmentation may decode; save the slide with a pyramid "
                                 f"(e.g. vips tiffsave --tile --pyramid), or raise the limit with --max-read-pixels / "
                                 f"{ENV_MAX_READ_PIXELS}")


def read_downsampled(slide: Slide, downsample: float, max_bytes: int = STRIP_BYTES,
                     max_pixels: int | None = None) -> Downsampled:
    """The whole slide at ``downsample`` (level-0 px per output px, >= 1), read level- and strip-wise.

    Raises :class:`SlideError` (before decoding anything) when the level to read has more than ``max_pixels``
    (default: the read limit of :mod:`mstar_extract.slides.limits`)."""
    import cv2

    downsample = max(float(downsample), 1.0)
    w0, h0 = slide.dimensions
    out_w, out_h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
    level = slide.get_best_level_for_downsample(downsample)
    check_read_size(slide, level, max_pixels)
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
    progress = _Progress(slide, level, -(-out_h // rows_per_strip))
    for i, r0 in enumerate(range(0, out_h, rows_per_strip)):
        r1 = min(out_h, r0 + rows_per_strip)
        ly0 = int(round(r0 * fy))
        ly1 = min(lv.height, max(ly0 + 1, int(round(r1 * fy))))
        y_level0 = int(round(ly0 * lv.downsample))
        strip = slide.read_region((0, y_level0), level, (lv.width, ly1 - ly0))
        out[r0:r1] = cv2.resize(strip, (out_w, r1 - r0), interpolation=cv2.INTER_AREA)
        del strip
        progress.step(i + 1)
    return Downsampled(out, w0 / out_w, h0 / out_h, level)


class _Progress:
    """Log lines for a strip-wise read: a warning when it is large, then (``-v``) every progress interval."""

    def __init__(self, slide: Slide, level: int, n_strips: int) -> None:
        lv = slide.levels[level]
        self.slide, self.level, self.n = slide, level, n_strips
        self.t0 = self.last = time.monotonic()
        try:
            self.every = max(0.0, float(os.environ.get("MSTAR_PROGRESS_INTERVAL", "30")))
        except ValueError:
            self.every = 30.0
        if lv.width * lv.height > WARN_READ_PIXELS:
            log.warning("%s: no pyramid level near the segmentation resolution: decoding level %d (%dx%d = %s) in %d "
                        "strips", slide.path, level, lv.width, lv.height, megapixels(lv.width * lv.height), n_strips)

    def step(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every or (done == self.n and now - self.t0 >= self.every):
            self.last = now
            log.info("%s: read %d/%d strips of level %d (%.0f s)", self.slide.path, done, self.n, self.level,
                     now - self.t0)


def read_at_mpp(slide: Slide, mpp: float, level0_mpp: float, max_bytes: int = STRIP_BYTES) -> Downsampled:
    """The whole slide at about ``mpp`` µm/px (never finer than level 0)."""
    return read_downsampled(slide, mpp / level0_mpp, max_bytes)


def read_max_side(slide: Slide, max_side: int, max_bytes: int = STRIP_BYTES) -> Downsampled:
    """The whole slide with its longer side at most ``max_side`` pixels."""
    w0, h0 = slide.dimensions
    return read_downsampled(slide, max(w0, h0) / max_side, max_bytes)
