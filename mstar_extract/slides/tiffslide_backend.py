"""Slide backend on tiffslide (tifffile + zarr): TIFF-based formats (svs, tif/tiff, ndpi, scn, bif)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from mstar_extract.errors import ReadError, SlideOpenError
from mstar_extract.slides._pixels import rgba_to_rgb_on_white, whiten_outside
from mstar_extract.slides.base import Level, Slide
from mstar_extract.slides.formats import quiet_tifffile
from mstar_extract.slides.resolution import resolve


class _DropAbandonedTasks(logging.Filter):
    """zarr decodes chunks in asyncio tasks; when one chunk is corrupt the others are abandoned and asyncio
    would print 'Task was destroyed but it is pending!' blocks at exit. The ReadError already says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Task was destroyed but it is pending" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_DropAbandonedTasks())
warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)


class TiffSlideSlide(Slide):
    """A tiffslide handle; areas outside a level come back white (tiffslide pads with black)."""

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        import tiffslide

        self.path = Path(path)
        self.backend = "tiffslide"
        ts = None
        try:
            with warnings.catch_warnings(), quiet_tifffile():
                warnings.simplefilter("ignore")
                ts = tiffslide.TiffSlide(self.path)
                props = dict(ts.properties)
                dims, dss = ts.level_dimensions, ts.level_downsamples
                associated = tuple(sorted(ts.associated_images))
        except Exception as exc:  # tifffile/zarr raise many types for non-slides
            if ts is not None:  # opened but unusable: do not leak the file handle
                ts.close()
            raise SlideOpenError(self.path, f"tiffslide cannot open it ({type(exc).__name__}: {exc})") from exc
        self._ts = ts
        self.properties = {str(k): str(v) for k, v in props.items() if v is not None}
        self.vendor = self.properties.get("tiffslide.vendor")
        self.levels = tuple(Level(int(w), int(h), float(ds)) for (w, h), ds in zip(dims, dss, strict=True))
        res = resolve(self.properties, mpp)
        self.mpp_x, self.mpp_y, self.mpp_source = res.mpp_x, res.mpp_y, res.source  # type: ignore[assignment]
        self.objective_magnification = res.magnification
        self.associated_images = associated

    def _read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                arr = self._ts.read_region(location, level, size, as_array=True, padding=True)
        except Exception as exc:  # imagecodecs/zarr errors on corrupt tiles
            raise ReadError(
                self.path, f"cannot decode region at level-0 ({location[0]}, {location[1]}), level {level}, "
                f"size {size[0]}x{size[1]}: {type(exc).__name__}: {exc}"
            ) from exc
        arr = rgba_to_rgb_on_white(np.asarray(arr, dtype=np.uint8))
        if not arr.flags.writeable:
            arr = arr.copy()
        ds = self.levels[level].downsample
        rx0, ry0 = int(location[0] / ds), int(location[1] / ds)  # tiffslide's own transform
        lv = self.levels[level]
        return whiten_outside(arr, rx0, ry0, lv.width, lv.height)

    def read_associated_image(self, name: str) -> np.ndarray:
        return rgba_to_rgb_on_white(np.asarray(self._ts.associated_images[name]))

    def close(self) -> None:
        self._ts.close()
