"""Regions through the slide backend, with the pixels the reference pipeline sees.

The mSTAR/CLAM reference reads ``openslide.read_region(...)`` and calls ``.convert('RGB')`` on it: PIL drops
the alpha channel, it does not composite. OpenSlide returns transparent ``(0, 0, 0, 0)`` pixels outside the
level (patches that cross the slide border) and outside the scanned area (sparse tiles, MRXS gaps), so the
reference sees **black** there. The slide layer composites onto white (right for tissue detection and
thumbnails); this module gives the reader the reference's pixels instead:

* a backend with ``read_region_rgba`` (OpenSlide): its RGBA with the alpha dropped, exactly as PIL does;
* any other backend (tiffslide, plain images): its RGB, with the area outside the level set to black.
"""

from __future__ import annotations

import numpy as np

from mstar_extract.slides.base import Slide

OUTSIDE = 0
"""Grey level of pixels outside the level / scanned area: OpenSlide's transparent pixel after convert('RGB')."""


def level_box(location: tuple[int, int], level: int, size: tuple[int, int], slide: Slide) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the part of a ``size`` read at level-0 ``location`` that lies inside the
    level, in pixels of the read (empty boxes have right <= left or bottom <= top)."""
    lv = slide.levels[level]
    x, y = int(location[0] / lv.downsample), int(location[1] / lv.downsample)  # the backends' own transform
    w, h = int(size[0]), int(size[1])
    return max(0, -x), max(0, -y), min(w, lv.width - x), min(h, lv.height - y)


def blacken_outside(arr: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Set the pixels of ``arr`` (h, w, 3) outside ``box`` (left, top, right, bottom) to :data:`OUTSIDE`."""
    h, w = arr.shape[:2]
    left, top, right, bottom = box
    if right <= left or bottom <= top:
        arr[...] = OUTSIDE
        return arr
    if top > 0:
        arr[:top] = OUTSIDE
    if bottom < h:
        arr[bottom:] = OUTSIDE
    if left > 0:
        arr[:, :left] = OUTSIDE
    if right < w:
        arr[:, right:] = OUTSIDE
    return arr


def read_region_reference(slide: Slide, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 (h, w, 3) of ``size`` at ``level`` (top-left at level-0 ``location``) as
    ``openslide.read_region(...).convert('RGB')`` gives it: alpha dropped, outside the level black.

    Raises what the backend raises (:class:`~mstar_extract.errors.ReadError` for a corrupt region)."""
    rgba = getattr(slide, "read_region_rgba", None)
    if rgba is not None:
        arr = rgba((int(location[0]), int(location[1])), int(level), (int(size[0]), int(size[1])))
        return np.ascontiguousarray(arr[..., :3])
    arr = slide.read_region(location, level, size)
    if not arr.flags.writeable:
        arr = arr.copy()
    return blacken_outside(arr, level_box(location, level, size, slide))
