"""Direct tile access: decode a tiled TIFF/SVS level's own tiles, straight into PIL images.

OpenSlide's ``read_region`` costs far more per pixel than decoding the JPEG tiles it is made of (cairo
compositing, premultiplied ARGB, PIL). For files whose level is a plain tiled TIFF page (Aperio SVS and generic
pyramidal TIFF), this module reads each stored tile's bytes, decodes it once and keeps decoded tiles in a small
LRU cache, so neighbouring patches share the work; a patch is assembled on a reused PIL canvas, which the
resize (:mod:`.resize`, PIL bilinear) then reads without any conversion. Anything else returns ``None`` from
:meth:`TiffTileSource.open` and the reader falls back to the slide backend.

Pixels equal OpenSlide's ``read_region(...).convert('RGB')`` (the mSTAR/CLAM reference; tested against OpenSlide
in tests/test_fidelity.py): JPEG tiles (compression 7) are decoded by Pillow's libjpeg-turbo decoder with
OpenSlide's settings (islow IDCT, fancy chroma upsampling, the colour space from the TIFF photometric tag as
libtiff sets it: YCbCr -> RGB for photometric 6, raw components for photometric 2 as in Aperio's RGB-coded
JPEG), shared ``JPEGTables`` spliced in; other compressions go through tifffile/imagecodecs. Pixels outside the
level or in absent (sparse) tiles are black, as OpenSlide's transparent pixels become after ``convert('RGB')``.
``set_scale`` switches to reduced-size decoding (libjpeg DCT scaling, ``--fast-decode``), which is not exact.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

log = logging.getLogger("mstar.reading")

FILL = 0
"""Value of pixels outside the level or in absent tiles (OpenSlide: transparent -> black after convert('RGB'))."""

_SUPPORTED_COMPRESSION = {1, 5, 7, 8, 32946, 50000, 50001}  # none, LZW, JPEG, deflate, zstd, webp
_SUPPORTED_PHOTOMETRIC = {2, 6}  # RGB, YCbCr


T = TypeVar("T")


def lru_get(cache: OrderedDict[int, T], index: int, limit: int, make: Callable[[int], T]) -> T:
    """``cache[index]`` (now the most recently used), or ``make(index)`` stored there on a miss; past ``limit``
    entries the least recently used one is dropped. The tile caches of both tile readers."""
    if index in cache:
        cache.move_to_end(index)
        return cache[index]
    value = make(index)
    cache[index] = value
    if len(cache) > limit:
        cache.popitem(last=False)
    return value


class TileDecodeError(Exception):
    """A stored tile could not be decoded, even on a second try."""

    def __init__(self, tile_box: tuple[int, int, int, int], reason: str) -> None:
        self.tile_box = tile_box
        """(x, y, w, h) of the tile at its level, in pixels of that level."""
        self.reason = reason
        super().__init__(reason)


class TiffTileSource:
    """Reads rectangles of one pyramid level straight from the file's tiles. Not thread-safe; one per process."""

    def __init__(self, path: Path, tif: object, page: object, cache_bytes: int, scale: int = 1) -> None:
        self.path = path
        self._tif = tif
        self._page = page
        self._fh = tif.filehandle  # type: ignore[attr-defined]
        self.width = int(page.imagewidth)  # type: ignore[attr-defined]
        self.height = int(page.imagelength)  # type: ignore[attr-defined]
        self.tile_w = int(page.tilewidth)  # type: ignore[attr-defined]
        self.tile_h = int(page.tilelength)  # type: ignore[attr-defined]
        self.across = -(-self.width // self.tile_w)
        self.down = -(-self.height // self.tile_h)
        self._offsets = page.dataoffsets  # type: ignore[attr-defined]
        self._counts = page.databytecounts  # type: ignore[attr-defined]
        self._tables = page.jpegtables  # type: ignore[attr-defined]
        self._jpeg = int(page.compression) == 7  # type: ignore[attr-defined]
        self._jpegmode = "YCbCr" if int(page.photometric) == 6 else "RGB"  # type: ignore[attr-defined]
        self._cache: OrderedDict[int, Any] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cache_max = max(4, cache_bytes // (self.tile_w * self.tile_h * 4))  # PIL stores RGB in 4 bytes
        self._canvases: dict[tuple[int, int], Any] = {}
        self.direct = False
        """Decode a tile that lies wholly inside the read straight into the canvas, without caching it (set by
        the reader when no two patches overlap: such a tile is then needed by no other patch)."""
        self.scale = 1
        """Decode at 1/scale (libjpeg DCT scaling); :meth:`read` then works in 1/scale pixels of the level."""
        self.tiles_decoded = 0
        """How many tile decodes happened (for tests and benchmarks)."""
        if scale > 1:
            self.set_scale(scale)

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, level_size: tuple[int, int], cache_mb: float = 128,
             scale: int = 1) -> TiffTileSource | None:
        """A source for the tiled page of ``path`` whose size is ``level_size`` (w, h), or None if unsupported."""
        try:
            import tifffile
        except ImportError:  # pragma: no cover - a declared dependency
            return None
        path = Path(path)
        if path.suffix.lower() not in {".svs", ".tif", ".tiff"}:
            return None
        try:
            tif = tifffile.TiffFile(path)
        except Exception:  # noqa: BLE001 - not a TIFF tifffile can read: use the backend
            return None
        try:
            special = any(getattr(tif, f"is_{k}", False) for k in ("ndpi", "bif", "scn", "qpi", "philips", "ome", "lsm", "stk"))
            page = None if special else cls._find_page(tif, level_size)
            if page is None:
                tif.close()
                return None
            return cls(path, tif, page, int(cache_mb * 1024 * 1024), scale)
        except Exception as exc:  # noqa: BLE001
            log.debug("tile access unavailable for %s: %s", path, exc)
            tif.close()
            return None

    @staticmethod
    def _find_page(tif: object, level_size: tuple[int, int]) -> object | None:
        for page in tif.pages:  # type: ignore[attr-defined]
            try:
                if (int(page.imagewidth), int(page.imagelength)) != tuple(level_size):
                    continue
                if not page.is_tiled or page.tiledepth != 1 or page.imagedepth != 1:
                    continue
                if page.bitspersample != 8 or page.samplesperpixel != 3 or page.planarconfig != 1:
                    continue
                if int(page.compression) not in _SUPPORTED_COMPRESSION or int(page.photometric) not in _SUPPORTED_PHOTOMETRIC:
                    continue
                if int(page.predictor) not in (1,) and int(page.compression) == 7:
                    continue
                return page
            except Exception:  # noqa: BLE001 - odd page: skip it
                continue
        return None

    # -- reduced decoding (DCT scaling) -------------------------------------------------------------------
    def can_scale(self, scale: int) -> bool:
        """Whether tiles can be decoded at 1/``scale`` by libjpeg (JPEG tiles, tile sides divisible)."""
        return scale in (2, 4, 8) and self._jpeg and self.tile_w % scale == 0 and self.tile_h % scale == 0

    def set_scale(self, scale: int) -> bool:
        """Switch to decoding at 1/``scale`` after checking, on a real tile, that the colours agree with a full
        decode + box average (mean |diff| < 2); returns whether the switch happened."""
        if scale == 1 or not self.can_scale(scale):
            return scale == 1
        idx = int(np.argmax(self._counts))  # the largest tile: most likely on tissue
        try:
            full = _to_array(self._decode_jpeg(idx, 1))
            red = _to_array(self._decode_jpeg(idx, scale))
        except Exception as exc:  # noqa: BLE001
            log.debug("%s: no reduced decoding: %s", self.path, exc)
            return False
        h, w = self.tile_h // scale, self.tile_w // scale
        box = full.reshape(h, scale, w, scale, 3).mean(axis=(1, 3))
        if red.shape != box.shape or float(np.abs(red.astype(np.float64) - box).mean()) >= 2.0:
            log.debug("%s: reduced decoding disagrees with the full decode; not used", self.path)
            return False
        self.scale = scale
        self._cache.clear()
        self._cache_max = max(4, self._cache_bytes // (w * h * 4))
        return True

    # -- decoding -----------------------------------------------------------------------------------------
    def _read_bytes(self, index: int) -> bytes:
        self._fh.seek(int(self._offsets[index]))
        return self._fh.read(int(self._counts[index]))

    def _decode_jpeg(self, index: int, scale: int, into: Any = None, at: tuple[int, int] = (0, 0)) -> Any:
        """Tile ``index`` decoded by libjpeg-turbo (Pillow) at 1/``scale`` into a new PIL core image, or into the
        core image ``into`` with its top-left at ``at`` (the tile must fit there)."""
        from PIL import Image

        data = self._read_bytes(index)
        if self._tables:  # abbreviated stream: splice the shared tables in (tables' EOI, tile's SOI dropped)
            data = bytes(self._tables[:-2]) + data[2:]
        w, h = -(-self.tile_w // scale), -(-self.tile_h // scale)
        im = Image.core.new("RGB", (w, h)) if into is None else into
        dec = Image.core.jpeg_decoder("RGB", "RGB", self._jpegmode, scale, 0)
        try:
            dec.setimage(im, (at[0], at[1], at[0] + w, at[1] + h))
            consumed, err = dec.decode(data)
        finally:
            dec.cleanup()
        if err < 0:
            raise ValueError(f"JPEG decoder error {err}")
        if consumed >= 0:
            raise ValueError("truncated JPEG data")
        return im

    def _decode_other(self, index: int) -> Any:
        """A non-JPEG tile (LZW, deflate, zstd, webp, none) through tifffile, as a PIL core image."""
        from PIL import Image

        data = self._read_bytes(index)
        arr, _, _ = self._page.decode(data, index, jpegtables=self._tables)  # type: ignore[attr-defined]
        if arr is None:
            raise ValueError("decoder returned no data")
        arr = np.ascontiguousarray(np.asarray(arr).reshape(arr.shape[-3:]))
        if arr.shape != (self.tile_h, self.tile_w, 3) or arr.dtype != np.uint8:
            raise ValueError(f"tile decoded to {arr.shape} {arr.dtype}, expected {(self.tile_h, self.tile_w, 3)} uint8")
        return Image.frombuffer("RGB", (self.tile_w, self.tile_h), arr, "raw", "RGB", 0, 1).im

    def _absent(self, index: int) -> bool:
        return int(self._counts[index]) == 0 or int(self._offsets[index]) == 0

    def _decode(self, index: int, into: Any = None, at: tuple[int, int] = (0, 0)) -> Any:
        """Decoded tile ``index`` (a PIL core image of the tile, at 1/scale), None for a tile absent from the file.
        With ``into`` (JPEG only) the tile is decoded into that core image at ``at`` instead."""
        if self._absent(index):
            return None
        last: Exception | None = None
        for _attempt in range(2):  # a corrupt tile is retried once (re-read from disk, decoded again)
            try:
                if self._jpeg:
                    im = self._decode_jpeg(index, self.scale, into, at)
                else:
                    im = self._decode_other(index)
                self.tiles_decoded += 1
                return im
            except Exception as exc:  # noqa: BLE001
                last = exc
        ty, tx = divmod(index, self.across)
        box = (tx * self.tile_w, ty * self.tile_h, self.tile_w, self.tile_h)
        raise TileDecodeError(box, f"{type(last).__name__}: {last}".strip())

    def tile(self, index: int) -> Any:
        """Tile ``index`` (PIL core image or None) from the cache, decoding it on a miss."""
        return lru_get(self._cache, index, self._cache_max, self._decode)

    # -- pixels -------------------------------------------------------------------------------------------
    def _canvas(self, w: int, h: int) -> Any:
        from PIL import Image

        img = self._canvases.get((w, h))
        if img is None:
            if len(self._canvases) >= 4:
                self._canvases.clear()
            img = self._canvases[(w, h)] = Image.new("RGB", (w, h))
        return img

    def read_image(self, x: int, y: int, w: int, h: int) -> Any:
        """The (w, h) rectangle with top-left (x, y) as a PIL RGB image; outside the level and absent tiles are
        :data:`FILL` (black). Units are pixels of the level divided by :attr:`scale`.

        The image is a canvas reused by the next call of the same size: use it (or copy it) before that.
        Raises :class:`TileDecodeError` (naming the tile) when a tile cannot be decoded.
        """
        canvas = self._canvas(w, h)
        core = canvas.im
        sc = self.scale
        lw, lh = -(-self.width // sc), -(-self.height // sc)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            core.paste(FILL, (0, 0, w, h))  # part of the read lies outside the level
        if x0 >= x1 or y0 >= y1:
            return canvas
        tw, th = self.tile_w // sc, self.tile_h // sc
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                index = ty * self.across + tx
                box = (tx * tw - x, ty * th - y, tx * tw - x + tw, ty * th - y + th)
                if (self.direct and self._jpeg and box[0] >= 0 and box[1] >= 0 and box[2] <= w and box[3] <= h
                        and index not in self._cache and not self._absent(index)):
                    self._decode(index, core, box[:2])  # wholly inside this read, needed by no other patch
                    continue
                im = self.tile(index)
                if im is None:  # absent (sparse) tile: transparent in OpenSlide
                    core.paste(FILL, box)
                else:
                    core.paste(im, box)  # clipped to the canvas
        if x1 < x + w:  # an edge tile's padding beyond the level: outside, black (OpenSlide clips tiles there)
            core.paste(FILL, (x1 - x, 0, w, h))
        if y1 < y + h:
            core.paste(FILL, (0, y1 - y, w, h))
        return canvas

    def read(self, x: int, y: int, w: int, h: int, out: np.ndarray | None = None) -> np.ndarray:
        """RGB uint8 (h, w, 3) of :meth:`read_image` as a numpy array (into ``out`` when given)."""
        arr = _to_array(self.read_image(x, y, w, h).im)
        if out is None:
            return arr
        out[...] = arr
        return out

    def clear_cache(self) -> None:
        self._cache.clear()

    def close(self) -> None:
        self._cache.clear()
        self._canvases.clear()
        try:
            self._tif.close()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001
            pass


def _to_array(core: Any) -> np.ndarray:
    """A PIL core RGB image as a new (h, w, 3) uint8 array."""
    from PIL import Image

    return np.asarray(Image.Image()._new(core))  # wrap the core image without a copy
