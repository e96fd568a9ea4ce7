"""Slide backend for plain images (png, jpg, non-pyramidal tif): one level, decoded whole into memory.

Meant for small specimens. Such files rarely carry a usable resolution, so give one (``mpp=`` /
``--mpp-override`` / a list file's ``mpp`` column); a PNG/JPEG/TIFF physical resolution in cm or inch is used
when plausible (see :mod:`mstar_extract.slides.resolution`).

Opening reads the header only (PIL's ``Image.open`` is lazy): the size is checked against the plain-image pixel
limit (:mod:`mstar_extract.slides.limits`) and the resolution is known before any pixel is decoded; the pixels
are decoded on the first read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mstar_extract.errors import SlideOpenError
from mstar_extract.slides._pixels import rgba_to_rgb_on_white
from mstar_extract.slides.base import Level, Slide
from mstar_extract.slides.limits import ENV_MAX_IMAGE_PIXELS, max_image_pixels, megapixels
from mstar_extract.slides.resolution import resolve


@contextlib.contextmanager
def _pil_image(path: Path) -> Iterator[Any]:
    """``PIL.Image.open(path)`` without PIL's own bomb check (ours, :func:`check_image_size`, is configurable)."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            yield im
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _header(path: Path) -> tuple[tuple[int, int], dict[str, str]]:
    """(width, height) and properties from the image's header; no pixel is decoded."""
    try:
        with _pil_image(path) as im:
            props: dict[str, str] = {"image.format": str(im.format), "image.mode": str(im.mode)}
            dpi = im.info.get("dpi")
            if dpi:
                props.update({"tiff.XResolution": str(float(dpi[0])), "tiff.YResolution": str(float(dpi[1])),
                              "tiff.ResolutionUnit": "inch"})
            return (int(im.size[0]), int(im.size[1])), props
    except Exception as exc:  # PIL raises many types for broken images
        raise SlideOpenError(path, f"cannot read image ({type(exc).__name__}: {exc})") from exc


def check_image_size(path: Path, width: int, height: int, limit: int | None = None) -> None:
    """Raise :class:`SlideOpenError` when a plain image is larger than the plain-image pixel limit."""
    limit = max_image_pixels() if limit is None else limit
    if width * height > limit:
        raise SlideOpenError(
            path, f"image is {width}x{height} = {megapixels(width * height)}, more than the "
                  f"{megapixels(limit)} limit for plain images, which are decoded whole into memory (about "
                  f"{width * height * 7 / 2**30:.1f} GB); convert it to a tiled pyramidal TIFF, or raise the limit "
                  f"with --max-image-pixels / {ENV_MAX_IMAGE_PIXELS}")


def _decode(path: Path) -> np.ndarray:
    try:
        with _pil_image(path) as im:
            if im.mode not in ("RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
            arr = np.asarray(im)
    except Exception as exc:  # PIL raises many types for broken images
        raise SlideOpenError(path, f"cannot read image ({type(exc).__name__}: {exc})") from exc
    return rgba_to_rgb_on_white(arr)


class ImageSlide(Slide):
    """A plain image: level 0, decoded into memory on the first read."""

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        self.path = Path(path)
        self.backend = "image"
        (w, h), self.properties = _header(self.path)
        check_image_size(self.path, w, h)
        self._img: np.ndarray | None = None
        self.vendor = None
        self.levels = (Level(w, h, 1.0),)
        res = resolve(self.properties, mpp)
        self.mpp_x, self.mpp_y, self.mpp_source = res.mpp_x, res.mpp_y, res.source  # type: ignore[assignment]
        self.objective_magnification = res.magnification
        self.associated_images = ()

    def _pixels(self) -> np.ndarray:
        if self._img is None:
            img = _decode(self.path)
            if img.shape[1::-1] != self.dimensions:
                raise SlideOpenError(self.path, f"decoded image is {img.shape[1]}x{img.shape[0]}, its header says "
                                                f"{self.dimensions[0]}x{self.dimensions[1]}")
            self._img = img
        return self._img

    def _read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        x, y = location
        w, h = size
        img = self._pixels()
        H, W = img.shape[:2]
        out = np.full((h, w, 3), 255, np.uint8)
        xa, ya, xb, yb = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
        if xa < xb and ya < yb:
            out[ya - y : yb - y, xa - x : xb - x] = img[ya:yb, xa:xb]
        return out  # starts white, so areas outside the image stay white

    def close(self) -> None:
        self._img = np.zeros((0, 0, 3), np.uint8)
