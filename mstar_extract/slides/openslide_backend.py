"""Slide backend on openslide-python (+ openslide-bin): every OpenSlide format."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mstar_extract.errors import ReadError, SlideOpenError
from mstar_extract.slides._pixels import rgba_to_rgb_on_white
from mstar_extract.slides.base import Level, Slide
from mstar_extract.slides.resolution import resolve

if TYPE_CHECKING:
    import openslide


def _open(path: Path) -> openslide.OpenSlide:
    import openslide

    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise SlideOpenError(path, "not a slide format OpenSlide can read") from exc
    except openslide.OpenSlideError as exc:
        raise SlideOpenError(path, f"OpenSlide cannot open it: {exc}") from exc


class OpenSlideSlide(Slide):
    """An OpenSlide handle. After a decode error OpenSlide handles stay in an error state, so this class
    reopens the file and raises :class:`ReadError`; later reads work again."""

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        self.path = Path(path)
        self.backend = "openslide"
        self._osr = _open(self.path)
        self._lock = threading.Lock()
        osr = self._osr
        self.properties = {str(k): str(v) for k, v in osr.properties.items()}
        self.vendor = self.properties.get("openslide.vendor")
        self.levels = tuple(
            Level(int(w), int(h), float(ds)) for (w, h), ds in zip(osr.level_dimensions, osr.level_downsamples, strict=True)
        )
        res = resolve(self.properties, mpp)
        self.mpp_x, self.mpp_y, self.mpp_source = res.mpp_x, res.mpp_y, res.source  # type: ignore[assignment]
        self.objective_magnification = res.magnification
        self.associated_images = tuple(sorted(osr.associated_images))
        # OpenSlide reports bounds of the scanned area for some formats; outside is transparent -> white.

    def _read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        return rgba_to_rgb_on_white(self.read_region_rgba(location, level, size))

    def read_region_rgba(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """OpenSlide's own pixels, (h, w, 4) uint8 RGBA with straight alpha, not composited: areas outside the
        level or the scanned area are transparent (0, 0, 0, 0). ``img[..., :3]`` is what PIL's
        ``read_region(...).convert('RGB')`` gives (the mSTAR/CLAM reference; see docs/reader.md)."""
        import openslide

        try:
            img = self._osr.read_region(location, level, size)
        except openslide.OpenSlideError as exc:
            with self._lock:
                try:
                    self._osr.close()
                finally:
                    self._osr = _open(self.path)
            raise ReadError(
                self.path, f"cannot decode region at level-0 ({location[0]}, {location[1]}), level {level}, "
                f"size {size[0]}x{size[1]}: {exc}"
            ) from exc
        return np.asarray(img)

    def read_associated_image(self, name: str) -> np.ndarray:
        return rgba_to_rgb_on_white(np.asarray(self._osr.associated_images[name]))

    def close(self) -> None:
        self._osr.close()
