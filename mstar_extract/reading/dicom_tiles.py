"""Direct frame access for DICOM WSI levels: decode the instance's own JPEG / JPEG 2000 frames.

A DICOM WSI pyramid level is one instance file whose pixel data are encapsulated frames (tiles) laid out
``TILED_FULL`` (row-major, one focal plane, one optical path): the same kind of JPEG or JPEG 2000 tiles as in
a TIFF. :class:`DicomFrameSource` builds the file offset of every frame once (pydicom parses the basic offset
table and the fragment items), decodes frames with imagecodecs (libjpeg-turbo / OpenJPEG, the decoders that
OpenSlide uses too) and keeps decoded frames in a small LRU cache, like :mod:`.tiles` does for TIFF pages.

The model's input must be bit-identical to OpenSlide's ``read_region`` of the same area (``docs/reader.md``).
So :meth:`DicomFrameSource.open` checks, on two real frames of the level (the largest, most likely tissue, and
the last, a clipped edge frame), that the decoded pixels equal the open OpenSlide slide's ``read_region`` of
the same box exactly; any difference, and anything this module does not handle (``TILED_SPARSE`` frames,
several focal planes or optical paths, concatenations, other transfer syntaxes, a level made of several
instances), returns None and the reader reads that level through OpenSlide. Frames are decoded at full size
only (no DCT scaling).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mstar_extract.reading.tiles import TileDecodeError, lru_get

log = logging.getLogger("mstar.reading")

JPEG_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"})
"""JPEG Baseline (Process 1), JPEG Extended (Process 2 & 4)."""
JPEG2000_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})
"""JPEG 2000 Image Compression (Lossless Only), JPEG 2000 Image Compression."""
_ITEM_LE = 0xE000FFFE
"""The item tag (FFFE,E000) as its 4 bytes read as one little-endian uint32."""
_PIXEL_DATA = b"\xe0\x7f\x10\x00"

Frame = tuple[tuple[int, int], ...]
"""The (file offset, length) pieces of one frame's compressed bytes (one piece unless it is fragmented)."""


def _decoder(syntax: str) -> Callable[[bytes], np.ndarray] | None:
    import imagecodecs

    if syntax in JPEG_SYNTAXES:
        return imagecodecs.jpeg8_decode
    if syntax in JPEG2000_SYNTAXES:
        return imagecodecs.jpeg2k_decode
    return None


def _fragments(fh: Any, start: int) -> tuple[list[int], list[tuple[int, int]]] | None:
    """Basic offset table and (data offset, length) of every fragment of the encapsulated pixel data element that
    starts at ``start``; None when the pixel data are not encapsulated."""
    from pydicom.encaps import parse_basic_offsets, parse_fragments

    fh.seek(start)
    head = fh.read(12)
    if len(head) < 12 or head[:4] != _PIXEL_DATA or head[8:12] != b"\xff\xff\xff\xff":
        return None
    bot = parse_basic_offsets(fh)
    _, offsets = parse_fragments(fh)
    pieces: list[tuple[int, int]] = []
    for off in offsets:
        fh.seek(off)
        tag_len = np.frombuffer(fh.read(8), "<u4")
        if int(tag_len[0]) != _ITEM_LE:
            return None
        pieces.append((off + 8, int(tag_len[1])))
    return bot, pieces


def _frames(bot: list[int], pieces: list[tuple[int, int]], n_frames: int) -> list[Frame] | None:
    """Group fragments into frames: one fragment per frame, or as the basic offset table says."""
    if len(pieces) == n_frames:
        return [(p,) for p in pieces]
    if len(bot) != n_frames or not pieces:
        return None
    first = pieces[0][0] - 8
    rel = [off - 8 - first for off, _ in pieces]
    bounds = list(bot) + [rel[-1] + 1]
    frames = [tuple(p for r, p in zip(rel, pieces, strict=True) if bounds[k] <= r < bounds[k + 1]) for k in range(n_frames)]
    return frames if all(frames) else None


def _header_ok(ds: Any, level_size: tuple[int, int]) -> str | None:
    """Why this instance's frames cannot be read here (None when they can)."""
    if (int(ds.get("TotalPixelMatrixColumns", 0)), int(ds.get("TotalPixelMatrixRows", 0))) != tuple(level_size):
        return "size differs from the level"
    if str(ds.get("DimensionOrganizationType", "")).upper() != "TILED_FULL":
        return "frames are not TILED_FULL"
    if int(ds.get("TotalPixelMatrixFocalPlanes", 1) or 1) != 1 or int(ds.get("NumberOfOpticalPaths", 1) or 1) != 1:
        return "several focal planes or optical paths"
    if "ConcatenationUID" in ds:
        return "the level is split into concatenated instances"
    if int(ds.get("SamplesPerPixel", 0)) != 3 or int(ds.get("BitsAllocated", 0)) != 8:
        return "not 8-bit RGB"
    across = -(-level_size[0] // int(ds.Columns))
    down = -(-level_size[1] // int(ds.Rows))
    if int(ds.get("NumberOfFrames", 1)) != across * down:
        return "frame count does not match the tile grid"
    return None


class DicomFrameSource:
    """Reads rectangles of one DICOM WSI level straight from its frames. Not thread-safe; one per process.

    Same surface as :class:`~mstar_extract.reading.tiles.TiffTileSource` (``read``, ``tile``, ``scale``,
    ``can_scale``/``set_scale``, ``tiles_decoded``, ``close``), so the patch reader uses either.
    """

    def __init__(self, path: Path, frames: list[Frame], size: tuple[int, int], tile: tuple[int, int],
                 decode: Callable[[bytes], np.ndarray], cache_bytes: int) -> None:
        self.path = path
        self._fh = open(path, "rb")  # owned, closed by close()
        self._frames = frames
        self.width, self.height = size
        self.tile_w, self.tile_h = tile
        self.across = -(-self.width // self.tile_w)
        self.down = -(-self.height // self.tile_h)
        self._decode_bytes = decode
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_max = max(4, cache_bytes // (self.tile_w * self.tile_h * 3))
        self.scale = 1
        """Always 1: DICOM frames are decoded at full size."""
        self.tiles_decoded = 0

    # -- construction -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, slide: Any, level: int, cache_mb: float = 128) -> DicomFrameSource | None:
        """A frame source for ``level`` of the open DICOM ``slide`` (OpenSlide, vendor ``dicom``), or None when
        its frames cannot be read here or do not decode to exactly OpenSlide's pixels."""
        if getattr(slide, "backend", None) != "openslide" or getattr(slide, "vendor", None) != "dicom":
            return None
        lv = slide.levels[level]
        try:
            src = cls._build(Path(slide.path), (lv.width, lv.height), int(cache_mb * 1024 * 1024))
        except Exception as exc:  # noqa: BLE001 - any surprise in the file: OpenSlide reads this level
            log.debug("%s: no DICOM frame access for level %d: %s", slide.path, level, exc)
            return None
        if src is None:
            return None
        if not src.matches_backend(slide, level):
            log.debug("%s: level %d frames decode differently from OpenSlide; OpenSlide reads it", slide.path, level)
            src.close()
            return None
        return src

    @classmethod
    def _build(cls, path: Path, size: tuple[int, int], cache_bytes: int) -> DicomFrameSource | None:
        import pydicom

        from mstar_extract.slides.dicom import series_of

        series = series_of(path)
        if series is None:
            return None
        match = [v for v in series.volumes if (v.width, v.height) == size]
        if len(match) != 1:
            return None
        with open(match[0].path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            why = _header_ok(ds, size)
            decode = _decoder(str(ds.file_meta.get("TransferSyntaxUID", "")))
            if why is not None or decode is None:
                log.debug("%s: frames not read directly: %s", match[0].path, why or "transfer syntax")
                return None
            parsed = _fragments(fh, fh.tell())
        if parsed is None:
            return None
        frames = _frames(parsed[0], parsed[1], int(ds.get("NumberOfFrames", 1)))
        if frames is None:
            return None
        return cls(match[0].path, frames, size, (int(ds.Columns), int(ds.Rows)), decode, cache_bytes)

    def matches_backend(self, slide: Any, level: int) -> bool:
        """Whether two real frames (the largest and the last) decode to exactly ``slide.read_region``'s pixels."""
        ds = slide.levels[level].downsample
        biggest = int(np.argmax([sum(n for _, n in f) for f in self._frames]))
        for index in sorted({biggest, len(self._frames) - 1}):
            ty, tx = divmod(index, self.across)
            x, y = tx * self.tile_w, ty * self.tile_h
            w, h = min(self.tile_w, self.width - x), min(self.tile_h, self.height - y)
            try:
                mine = self.read(x, y, w, h)
                ref = slide.read_region((round(x * ds), round(y * ds)), level, (w, h))
            except Exception as exc:  # noqa: BLE001
                log.debug("%s: frame check failed: %s", self.path, exc)
                return False
            if ref.shape != mine.shape or not np.array_equal(ref, mine):
                return False
        self._cache.clear()
        return True

    # -- reduced decoding: not for DICOM frames --------------------------------------------------------------
    def can_scale(self, scale: int) -> bool:
        return False

    def set_scale(self, scale: int) -> bool:
        return scale == 1

    # -- pixels -------------------------------------------------------------------------------------------
    def _read_bytes(self, index: int) -> bytes:
        parts = []
        for off, n in self._frames[index]:
            self._fh.seek(off)
            parts.append(self._fh.read(n))
        return b"".join(parts)

    def _decode(self, index: int) -> np.ndarray:
        want = (self.tile_h, self.tile_w, 3)
        last: Exception | None = None
        for _attempt in range(2):  # a corrupt frame is retried once (re-read from disk, decoded again)
            try:
                arr = np.asarray(self._decode_bytes(self._read_bytes(index)))
                if arr.shape != want or arr.dtype != np.uint8:
                    raise ValueError(f"frame decoded to {arr.shape} {arr.dtype}, expected {want} uint8")
                self.tiles_decoded += 1
                return arr
            except Exception as exc:  # noqa: BLE001
                last = exc
        ty, tx = divmod(index, self.across)
        raise TileDecodeError((tx * self.tile_w, ty * self.tile_h, self.tile_w, self.tile_h),
                              f"{type(last).__name__}: {last}".strip())

    def tile(self, index: int) -> np.ndarray:
        """Frame ``index`` (row-major) from the cache, decoding it on a miss."""
        return lru_get(self._cache, index, self._cache_max, self._decode)

    def read(self, x: int, y: int, w: int, h: int, out: np.ndarray | None = None) -> np.ndarray:
        """RGB uint8 (h, w, 3) with top-left (x, y) in pixels of the level; outside the level = black, as OpenSlide's
        transparent pixels become after ``convert('RGB')`` (the frames' padding beyond the level's edge is never
        shown). Raises :class:`TileDecodeError`."""
        if out is None:
            out = np.empty((h, w, 3), np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, self.width), min(y + h, self.height)
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            out.fill(0)
        if x0 >= x1 or y0 >= y1:
            return out
        tw, th = self.tile_w, self.tile_h
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            ry0, ry1 = max(y0, ty * th), min(y1, (ty + 1) * th)
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                rx0, rx1 = max(x0, tx * tw), min(x1, (tx + 1) * tw)
                arr = self.tile(ty * self.across + tx)
                out[ry0 - y : ry1 - y, rx0 - x : rx1 - x] = arr[ry0 - ty * th : ry1 - ty * th, rx0 - tx * tw : rx1 - tx * tw]
        return out

    def read_image(self, x: int, y: int, w: int, h: int) -> Any:
        """:meth:`read` as a PIL RGB image (the reader's resize takes PIL images, as the reference does)."""
        from PIL import Image

        return Image.fromarray(self.read(x, y, w, h), "RGB")

    def clear_cache(self) -> None:
        self._cache.clear()

    def close(self) -> None:
        self._cache.clear()
        try:
            self._fh.close()
        except Exception:  # noqa: BLE001
            pass

