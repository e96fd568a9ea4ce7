"""Slide backend for plain images (png, jpg, non-pyramidal tif): read whole into memory, one level.

Meant for small specimens. Such files rarely carry a usable resolution, so give one (``mpp=`` /
``--mpp-override`` / a list file's ``mpp`` column); a PNG/JPEG/TIFF physical resolution in cm or inch is used
when plausible (see :mod:`mstar_extract.slides.resolution`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mstar_extract.errors import SlideOpenError
from mstar_extract.slides._pixels import rgba_to_rgb_on_white
from mstar_extract.slides.base import Level, Slide
from mstar_extract.slides.resolution import resolve


def _load(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # large specimens are legitimate here
    try:
        with Image.open(path) as im:
            props: dict[str, str] = {"image.format": str(im.format), "image.mode": str(im.mode)}
            dpi = im.info.get("dpi")
            if dpi:
                props.update({"tiff.XResolution": str(float(dpi[0])), "tiff.YResolution": str(float(dpi[1])),
                              "tiff.ResolutionUnit": "inch"})
            if im.mode not in ("RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
            arr = np.asarray(im)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken images
        raise SlideOpenError(path, f"cannot read image ({type(exc).__name__}: {exc})") from exc
    return rgba_to_rgb_on_white(arr), props


class ImageSlide(Slide):
    """A plain image held in memory as level 0."""

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        self.path = Path(path)
        self.backend = "image"
        self._img, self.properties = _load(self.path)
        h, w = self._img.shape[:2]
        self.vendor = None
        self.levels = (Level(w, h, 1.0),)
        res = resolve(self.properties, mpp)
        self.mpp_x, self.mpp_y, self.mpp_source = res.mpp_x, res.mpp_y, res.source  # type: ignore[assignment]
        self.objective_magnification = res.magnification
        self.associated_images = ()

    def _read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x, y = location
        w, h = size
        H, W = self._img.shape[:2]
        out = np.full((h, w, 3), 255, np.uint8)
        xa, ya, xb, yb = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
        if xa < xb and ya < yb:
            out[ya - y : yb - y, xa - x : xb - x] = self._img[ya:yb, xa:xb]
        return out  # starts white, so areas outside the image stay white

    def close(self) -> None:
        self._img = np.zeros((0, 0, 3), np.uint8)
