"""Direct tile access: decode a tiled TIFF/SVS level's own tiles with tifffile + imagecodecs.

OpenSlide's ``read_region`` costs far more per pixel than decoding the JPEG tiles it is made of (cairo
compositing, premultiplied ARGB, PIL). For files whose level is a plain tiled TIFF page (Aperio SVS and generic
pyramidal TIFF), this module reads each stored tile's bytes, decodes it once (tifffile's decoder: JPEG tables,
YCbCr/RGB photometric handled as in the file) and keeps decoded tiles in a small LRU cache, so neighbouring
patches share the work. Anything else returns ``None`` from :meth:`TiffTileSource.open` and the reader falls back
to the slide backend.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

log = logging.getLogger("mstar.reading")

_SUPPORTED_COMPRESSION = {1, 5, 7, 8, 32946, 50000, 50001}  # none, LZW, JPEG, deflate, zstd, webp
_SUPPORTED_PHOTOMETRIC = {2, 6}  # RGB, YCbCr


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
        self._cache: OrderedDict[int, np.ndarray | None] = OrderedDict()
        self._cache_max = max(4, cache_bytes // (self.tile_w * self.tile_h * 3))
        self.scale = 1
        """Decode at 1/scale (libjpeg DCT scaling); :meth:`read` then works in 1/scale pixels of the level."""
        if scale > 1:
            self.set_scale(scale)
        self.tiles_decoded = 0
        """How many tile decodes happened (for tests and benchmarks)."""

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, level_size: tuple[int, int], cache_mb: float = 128,
             scale: int = 1) -> "TiffTileSource | None":
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
        """Whether tiles can be decoded at 1/``scale`` by libjpeg (JPEG, YCbCr, tile sides divisible)."""
        return (scale in (2, 4, 8) and int(self._page.compression) == 7  # type: ignore[attr-defined]
                and int(self._page.photometric) == 6  # type: ignore[attr-defined]
                and self.tile_w % scale == 0 and self.tile_h % scale == 0)

    def set_scale(self, scale: int) -> bool:
        """Switch to decoding at 1/``scale`` after checking, on a real tile, that the colours agree with a full
        decode + box average (mean |diff| < 2); returns whether the switch happened."""
        if scale == 1 or not self.can_scale(scale):
            return scale == 1
        idx = int(np.argmax(self._counts))  # the largest tile: most likely on tissue
        try:
            full = self._decode_full(idx)
            red = self._decode_reduced(idx, scale)
        except Exception as exc:  # noqa: BLE001
            log.debug("%s: no reduced decoding: %s", self.path, exc)
            return False
        if full is None or red is None:
            return False
        import cv2

        box = cv2.resize(full, (self.tile_w // scale, self.tile_h // scale), interpolation=cv2.INTER_AREA)
        if red.shape != box.shape or float(np.abs(red.astype(np.int16) - box.astype(np.int16)).mean()) >= 2.0:
            log.debug("%s: reduced decoding disagrees with the full decode; not used", self.path)
            return False
        self.scale = scale
        self._cache.clear()
        self._cache_max *= scale * scale
        return True

    def _read_bytes(self, index: int) -> bytes:
        self._fh.seek(int(self._offsets[index]))
        return self._fh.read(int(self._counts[index]))

    def _decode_full(self, index: int) -> np.ndarray | None:
        data = self._read_bytes(index)
        arr, _, _ = self._page.decode(data, index, jpegtables=self._tables)  # type: ignore[attr-defined]
        if arr is None:
            raise ValueError("decoder returned no data")
        return np.asarray(arr).reshape(arr.shape[-3:])

    def _decode_reduced(self, index: int, scale: int) -> np.ndarray:
        import cv2

        data = self._read_bytes(index)
        if self._tables:  # abbreviated stream: splice the shared tables in (tables' EOI, tile's SOI dropped)
            data = bytes(self._tables[:-2]) + data[2:]
        flag = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[scale]
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
        if arr is None:
            raise ValueError("not a decodable JPEG stream")
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)

    # -- pixels -------------------------------------------------------------------------------------------
    def _decode(self, index: int) -> np.ndarray | None:
        """Decoded tile ``index`` (tile_h, tile_w, 3) uint8, None for a tile absent from the file."""
        offset, count = int(self._offsets[index]), int(self._counts[index])
        if count == 0 or offset == 0:
            return None
        last: Exception | None = None
        sc = self.scale
        want = (self.tile_h // sc, self.tile_w // sc, 3)
        for _attempt in range(2):  # a corrupt tile is retried once (re-read from disk, decoded again)
            try:
                arr = self._decode_full(index) if sc == 1 else self._decode_reduced(index, sc)
                if arr is None or arr.shape != want or arr.dtype != np.uint8:
                    got = None if arr is None else (arr.shape, arr.dtype)
                    raise ValueError(f"tile decoded to {got}, expected {want} uint8")
                self.tiles_decoded += 1
                return arr
            except Exception as exc:  # noqa: BLE001
                last = exc
        ty, tx = divmod(index, self.across)
        box = (tx * self.tile_w, ty * self.tile_h, self.tile_w, self.tile_h)
        raise TileDecodeError(box, f"{type(last).__name__}: {last}".strip())

    def tile(self, index: int) -> np.ndarray | None:
        """Tile ``index`` from the cache, decoding it on a miss."""
        cache = self._cache
        if index in cache:
            cache.move_to_end(index)
            return cache[index]
        arr = self._decode(index)
        cache[index] = arr
        if len(cache) > self._cache_max:
            cache.popitem(last=False)
        return arr

    def read(self, x: int, y: int, w: int, h: int, out: np.ndarray | None = None) -> np.ndarray:
        """RGB uint8 (h, w, 3) with top-left (x, y); outside the image = white.

        Units are pixels of the level divided by :attr:`scale` (plain level pixels when scale is 1).

        Raises :class:`TileDecodeError` (naming the tile) when a tile cannot be decoded.
        """
        if out is None:
            out = np.empty((h, w, 3), np.uint8)
        out.fill(255)
        sc = self.scale
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, -(-self.width // sc)), min(y + h, -(-self.height // sc))
        if x0 >= x1 or y0 >= y1:
            return out
        tw, th = self.tile_w // sc, self.tile_h // sc
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            ry0, ry1 = max(y0, ty * th), min(y1, (ty + 1) * th)
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                rx0, rx1 = max(x0, tx * tw), min(x1, (tx + 1) * tw)
                arr = self.tile(ty * self.across + tx)
                if arr is None:
                    continue  # absent (sparse) tile: stays white, as OpenSlide shows it
                out[ry0 - y : ry1 - y, rx0 - x : rx1 - x] = arr[ry0 - ty * th : ry1 - ty * th, rx0 - tx * tw : rx1 - tx * tw]
        return out

    def clear_cache(self) -> None:
        self._cache.clear()

    def close(self) -> None:
        self._cache.clear()
        try:
            self._tif.close()  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001
            pass
