"""Slide reading: one typed surface (:class:`Slide`) over OpenSlide, tiffslide and plain images.

>>> with open_slide("slide.svs") as slide:            # doctest: +SKIP
...     patch = slide.read_region((x, y), 0, (256, 256))   # uint8 RGB (256, 256, 3)

``backend="auto"`` tries, per file: for svs/tif/tiff tiffslide, then OpenSlide (then the plain-image reader
for ``.tif``); for OME-TIFF (``.ome.tif(f)``, or a ``.tif`` whose description is OME-XML) tiffslide only (then
the plain-image reader), because OpenSlide does not see an OME pyramid's SubIFD levels; for vendor TIFF variants
whose geometry OpenSlide models better (ndpi, scn, bif) OpenSlide, then tiffslide; other OpenSlide formats
(mrxs, vms, vmu, dcm) OpenSlide only; png/jpg the plain-image reader.
Why tiffslide first for svs/tif: it decoded tiled JPEG regions 1-3x faster per CPU core than OpenSlide on
this machine (``docs/backends.md``). ``mpp`` is an explicit per-slide resolution in µm/px; it wins over the file's
metadata; :func:`apply_mpp_fallback` applies a run-wide ``--mpp-override`` only to slides without metadata
(see :mod:`mstar_extract.slides.resolution` for the full precedence).

A folder that holds one DICOM WSI series opens as that series (:mod:`mstar_extract.slides.dicom`).
Before any backend sees a file, :func:`open_slide` rejects missing, empty, unsupported and truncated files
with one clear :class:`~mstar_extract.errors.SlideOpenError` line; the plain-image reader also refuses, from the
header, an image larger than the pixel limit (:mod:`mstar_extract.slides.limits`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

from mstar_extract.errors import SlideOpenError, UsageError
from mstar_extract.slides.base import Level, MppSource, Slide
from mstar_extract.slides.formats import (
    IMAGE_EXTENSIONS,
    OPENSLIDE_EXTENSIONS,
    SLIDE_EXTENSIONS,
    check_file,
    check_tiff_structure,
    is_ome_tiff,
    is_slide_file,
    is_tiff,
    slide_extension,
    slide_identity,
    slide_stem,
)

__all__ = [
    "BACKENDS", "Level", "MppSource", "SLIDE_EXTENSIONS", "Slide", "apply_mpp_fallback", "backend_order", "is_slide_file",
    "open_slide", "slide_extension", "slide_identity", "slide_stem",
]

log = logging.getLogger("mstar")

BACKENDS = ("auto", "openslide", "tiffslide", "image")
AUTO_TIFF_ORDER = ("tiffslide", "openslide")
"""Order ``auto`` tries for svs/tif/tiff (measured: docs/backends.md)."""
_OPENSLIDE_FIRST = frozenset({".ndpi", ".scn", ".bif"})
_PLAIN_IMAGES = frozenset({".png", ".jpg", ".jpeg"})
_TIFF_BASED = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".ome.tif", ".ome.tiff"})


def _factory(name: str) -> Callable[[Path, float | None], Slide]:
    if name == "openslide":
        from mstar_extract.slides.openslide_backend import OpenSlideSlide

        return OpenSlideSlide
    if name == "tiffslide":
        from mstar_extract.slides.tiffslide_backend import TiffSlideSlide

        return TiffSlideSlide
    if name == "image":
        from mstar_extract.slides.image_backend import ImageSlide

        return ImageSlide
    raise UsageError(f"unknown backend '{name}' (choose from {', '.join(BACKENDS)})")


def backend_order(path: str | os.PathLike, backend: str = "auto") -> tuple[str, ...]:
    """The backends :func:`open_slide` tries for ``path``, in order."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise UsageError(f"unknown backend '{backend}' (choose from {', '.join(BACKENDS)})")
        return (backend,)
    ext = slide_extension(path)
    if ext in _PLAIN_IMAGES:
        return ("image",)
    if ext in _OPENSLIDE_FIRST:
        return ("openslide", "tiffslide")
    if is_ome_tiff(path):
        return ("tiffslide", "image")
    if ext in _TIFF_BASED:
        return AUTO_TIFF_ORDER + (("image",) if ext in IMAGE_EXTENSIONS or ext.startswith(".ome") else ())
    if ext in OPENSLIDE_EXTENSIONS:
        return ("openslide",)
    return ("openslide", "tiffslide")


def open_slide(path: str | os.PathLike, backend: str = "auto", mpp: float | None = None) -> Slide:
    """Open a slide with ``backend`` (auto|openslide|tiffslide|image); ``mpp`` overrides the resolution.

    Raises :class:`SlideOpenError` (missing, empty, not a slide, truncated, unsupported) with one line, or
    :class:`UsageError` for a bad ``backend``/``mpp`` argument.
    """
    path = Path(path)
    if path.is_dir() and slide_extension(path) != ".mrxs":
        ident = slide_identity(path)  # a folder holding one DICOM WSI series: its level-0 file
        path = ident.path if ident.error is None else path
    if mpp is not None and not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise UsageError(f"mpp override must be a positive number of µm per pixel, got {mpp!r}")
    order = backend_order(path, backend)
    size = check_file(path)
    ext = slide_extension(path)
    tiff = is_tiff(path)
    if ext in _TIFF_BASED and not tiff and backend in ("auto", "tiffslide"):
        raise SlideOpenError(path, f"not a {ext.lstrip('.').upper()} slide: the file does not start with a TIFF header")
    if tiff:
        check_tiff_structure(path, size)
    reasons: list[str] = []
    for name in order:
        try:
            slide = _factory(name)(path, mpp)
        except SlideOpenError as exc:
            reasons.append(exc.reason if len(order) == 1 else f"{name}: {exc.reason}")
            continue
        _log_override(slide)
        return slide
    raise SlideOpenError(path, "; ".join(reasons) if reasons else "no backend can read it")


def apply_mpp_fallback(slide: Slide, mpp: float | None) -> Slide:
    """``--mpp-override``: give ``slide`` this level-0 µm/px when its file has no resolution metadata (none at
    all, or only an estimate from the objective power); a slide with real metadata keeps it. Returns ``slide``."""
    if mpp and (slide.mpp_x is None or slide.mpp_y is None or slide.mpp_source == "objective"):
        slide.mpp_x = slide.mpp_y = float(mpp)
        slide.mpp_source = "override"
    return slide


def _log_override(slide: Slide) -> None:
    if slide.mpp_source != "override":
        return
    from mstar_extract.slides.resolution import resolve

    meta = resolve(slide.properties)
    if meta.source == "metadata" and meta.mpp_x and slide.mpp_x and abs(meta.mpp_x - slide.mpp_x) > 0.1 * meta.mpp_x:
        log.warning("%s: mpp override %.4g replaces the file's own %.4g µm/px", slide.path, slide.mpp_x, meta.mpp_x)
