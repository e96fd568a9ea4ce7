"""Huge-image test files written in seconds with little memory ("image bombs" and pyramid-less slides).

- :func:`write_png_bomb` — a real PNG of ``width x height`` pixels of one colour: every row compresses to the same
  deflate bytes after a full flush, so a 30000 x 30000 RGB PNG (2.7 GB of pixels) is a 3.4 MB file written
  without ever holding its pixels.
- :func:`write_sparse_tiff` — a tiled, JPEG-compressed TIFF without a pyramid whose tiles are all empty
  (byte count 0, "sparse", as tifffile and libtiff allow): a 100000 x 100000 slide in 300 KB.
- :func:`write_flat_tiff` — a tiled JPEG TIFF without a pyramid whose every tile holds the same H&E texture crop:
  a large slide that readers must decode pixel by pixel.

Each file carries a resolution (px per cm; a PNG may have none), so it passes the resolution check and reaches
the pixel limits.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png_bomb(path: str | os.PathLike, width: int, height: int, rgb: tuple[int, int, int] = (236, 200, 222),
                   mpp: float | None = 0.5) -> Path:
    """A valid ``width x height`` RGB PNG of one colour, with a pHYs resolution of ``mpp`` µm/px (none if None)."""
    row = b"\x00" + bytes(rgb) * width  # filter type 0, then the pixels
    comp = zlib.compressobj(9)
    first = comp.compress(row) + comp.flush(zlib.Z_FULL_FLUSH)  # zlib header + the first row
    again = comp.compress(row) + comp.flush(zlib.Z_FULL_FLUSH)  # any later row: the same bytes after a full flush
    adler = 1
    for _ in range(height):
        adler = zlib.adler32(row, adler)
    idat = first + again * (height - 1) + b"\x03\x00" + struct.pack(">I", adler)  # empty final block, checksum
    phys = _chunk(b"pHYs", struct.pack(">IIB", round(1e6 / mpp), round(1e6 / mpp), 1)) if mpp else b""
    path = Path(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + phys + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def write_sparse_tiff(path: str | os.PathLike, width: int, height: int, tile: int = 512, mpp: float = 0.25) -> Path:
    """A ``width x height`` tiled JPEG TIFF, one level, every tile empty (offset and byte count 0)."""
    import tifffile

    n = math.ceil(width / tile) * math.ceil(height / tile)
    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**32 - 2**25) as tw:
        tw.write((b"" for _ in range(n)), shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile),
                 compression="jpeg", photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path


def write_flat_tiff(path: str | os.PathLike, width: int, height: int, tile: int = 512, mpp: float = 0.25) -> Path:
    """A ``width x height`` tiled JPEG TIFF, one level (no pyramid), every tile the same H&E texture crop."""
    import cv2
    import tifffile

    from mstar_extract.testing.scene import TEXTURE_PATH

    bgr = cv2.imread(str(TEXTURE_PATH))
    if bgr is None:
        raise FileNotFoundError(f"{TEXTURE_PATH}: cannot read the texture image")
    texture = bgr[:, :, ::-1]
    reps = (math.ceil(tile / texture.shape[0]), math.ceil(tile / texture.shape[1]), 1)
    crop = np.ascontiguousarray(np.tile(texture, reps)[:tile, :tile])
    n = math.ceil(width / tile) * math.ceil(height / tile)
    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2**32 - 2**25) as tw:
        tw.write((crop for _ in range(n)), shape=(height, width, 3), dtype=np.uint8, tile=(tile, tile),
                 compression="jpeg", compressionargs={"level": 80}, photometric="rgb",
                 resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path
