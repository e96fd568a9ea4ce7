"""Tile access for the formats that :meth:`TiffTileSource.open <mstar_extract.reading.tiles.TiffTileSource.open>`
does not take: DICOM WSI frames (:mod:`.dicom_tiles`) and OME-TIFF pyramid levels (SubIFDs or top-level pages).

An OME-TIFF level is an ordinary tiled TIFF page; only where it sits differs (a pyramid's reduced levels are
SubIFDs of the full-resolution page, which a walk over the top-level pages never meets). So the OME level whose
size is the slide's level size is looked up in tifffile's first series (the one that tiffslide opens too) and
handed to :class:`~mstar_extract.reading.tiles.TiffTileSource`, with the same page checks (8-bit RGB, tiled,
a codec it decodes) as any TIFF page. Both return None for anything else: the reader then reads through the slide
backend.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from mstar_extract.reading.tiles import TiffTileSource

log = logging.getLogger("mstar.reading")


def open_ome_level(path: str | os.PathLike, level_size: tuple[int, int], cache_mb: float = 128) -> TiffTileSource | None:
    """A tile source for the OME-TIFF level of ``path`` whose size is ``level_size`` (w, h), or None."""
    import tifffile

    from mstar_extract.slides.formats import quiet_tifffile

    try:
        with quiet_tifffile():
            tif = tifffile.TiffFile(path)
    except Exception:  # noqa: BLE001 - not a TIFF tifffile can read: use the backend
        return None
    try:
        page = None
        if tif.is_ome and tif.series and tif.series[0].axes == "YXS":
            keyframes = SimpleNamespace(pages=[lvl.keyframe for lvl in tif.series[0].levels])
            page = TiffTileSource._find_page(keyframes, level_size)
        if page is None:
            tif.close()
            return None
        return TiffTileSource(Path(path), tif, page, int(cache_mb * 1024 * 1024))
    except Exception as exc:  # noqa: BLE001
        log.debug("OME tile access unavailable for %s: %s", path, exc)
        tif.close()
        return None


def open_format_source(slide: Any, level: int, cache_mb: float = 128) -> Any:
    """A tile source (``TiffTileSource``-like) for ``level`` of the open ``slide`` when it is a DICOM series or an
    OME-TIFF, else None."""
    if getattr(slide, "vendor", None) == "dicom":
        from mstar_extract.reading.dicom_tiles import DicomFrameSource

        return DicomFrameSource.open(slide, level, cache_mb)
    from mstar_extract.slides.formats import is_ome_tiff

    if is_ome_tiff(slide.path):
        lv = slide.levels[level]
        return open_ome_level(slide.path, (lv.width, lv.height), cache_mb)
    return None
