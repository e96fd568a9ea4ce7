"""Which files are slides, what their id is, and a cheap structural check that catches empty/truncated files.

Multi-file formats are one slide each: a DICOM WSI series (many ``.dcm`` files, see
:mod:`mstar_extract.slides.dicom`) is represented by its level-0 file, and a MIRAX ``X.mrxs`` by that file (its
data folder ``X/`` beside it is never searched for slides), and a Hamamatsu ``X.vms`` by that file (the JPEG files
it lists are not slides). :func:`slide_identity` gives the file that stands for
a slide and its default id; :func:`group_slide_files` turns the slide-named files of one folder into slides.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mstar_extract.errors import SlideOpenError

OPENSLIDE_EXTENSIONS = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".bif", ".dcm"})
"""Formats OpenSlide reads (Aperio, generic TIFF, Hamamatsu, Leica, MIRAX, Ventana, DICOM)."""
TIFFSLIDE_EXTENSIONS = frozenset({".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif"})
"""TIFF-based formats tiffslide reads."""
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
"""Plain images read whole into memory (small specimens; resolution must be given)."""
SLIDE_EXTENSIONS = frozenset(OPENSLIDE_EXTENSIONS | IMAGE_EXTENSIONS)
"""Every extension ``mstar`` treats as a slide when it searches a folder (lower case, with the dot)."""
MULTI_SUFFIXES = (".ome.tiff", ".ome.tif")
"""Compound extensions removed as a whole when deriving a slide id."""

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def slide_extension(path: str | os.PathLike) -> str:
    """Lower-case slide extension of ``path`` (``.ome.tif`` counts as one), '' if none."""
    name = Path(path).name.lower()
    for multi in MULTI_SUFFIXES:
        if name.endswith(multi) and len(name) > len(multi):
            return multi
    return Path(name).suffix


def is_slide_file(path: str | os.PathLike) -> bool:
    """True if the name has a known slide extension (the file is not opened)."""
    ext = slide_extension(path)
    return ext in SLIDE_EXTENSIONS or ext in MULTI_SUFFIXES


def slide_stem(path: str | os.PathLike) -> str:
    """The default slide id: the file name without its slide extension (``a.ome.tif`` -> ``a``)."""
    name = Path(path).name
    ext = slide_extension(name)
    if ext and (ext in SLIDE_EXTENSIONS or ext in MULTI_SUFFIXES):
        return name[: -len(ext)]
    return name


@dataclass(frozen=True)
class SlideIdentity:
    """The file that stands for a slide, its default id, and why it cannot be one (``error``) if so."""

    path: Path
    slide_id: str
    error: str | None = None


def slide_identity(path: str | os.PathLike) -> SlideIdentity:
    """Default id (and representative file) of the slide at ``path``.

    A plain file: itself and :func:`slide_stem`. Any file of a DICOM WSI series: the series' level-0 file and the
    series' id (:mod:`mstar_extract.slides.dicom`), so all files of one series are one slide. A folder holding one
    DICOM series: the same; a folder holding several gives ``error`` (name one of its files instead).
    """
    path = Path(path)
    if path.is_dir() and slide_extension(path) != ".mrxs":
        return _folder_identity(path)
    if slide_extension(path) == ".dcm" and path.is_file():
        from mstar_extract.slides.dicom import series_of

        series = series_of(path)
        if series is not None:
            return SlideIdentity(series.path, series.slide_id)
    return SlideIdentity(path, slide_stem(path))


def _folder_identity(folder: Path) -> SlideIdentity:
    from mstar_extract.slides.dicom import scan_folder

    series = scan_folder(folder).series
    if len(series) == 1:
        return SlideIdentity(series[0].path, series[0].slide_id)
    if not series:
        return SlideIdentity(folder, folder.name, "is a directory, not a slide file (and holds no DICOM WSI series)")
    ids = ", ".join(s.slide_id for s in series)
    return SlideIdentity(folder, folder.name, f"the folder holds {len(series)} DICOM WSI series ({ids}); "
                         "name one file of the wanted series instead")


def is_mrxs_data_dir(name: str, sibling_files: Sequence[str]) -> bool:
    """True when folder ``name`` is the data folder of a MIRAX slide (``name.mrxs`` lies beside it)."""
    want = f"{name}.mrxs".lower()
    return any(f.lower() == want for f in sibling_files)


def hamamatsu_parts(index: Path) -> set[str]:
    """The image files (lower-case names) that a Hamamatsu ``.vms``/``.vmu`` index file lists (``ImageFile``,
    ``ImageFile(x,y)``, ``MapFile``): parts of that slide, not slides of their own."""
    try:
        text = index.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    parts = set()
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip().split("(")[0] in ("ImageFile", "MapFile") and value.strip():
            parts.add(Path(value.strip()).name.lower())
    return parts


def group_slide_files(folder: Path, names: Sequence[str]) -> list[Path]:
    """The slides among the slide-named files ``names`` directly in ``folder``: every non-DICOM file as it is,
    except the JPEG parts of a Hamamatsu VMS slide; one level-0 file per DICOM WSI series (plus ``.dcm`` files
    that are not WSI instances, which then fail with their reason when opened). Sorted."""
    parts: set[str] = set()
    for n in names:
        if slide_extension(n) in (".vms", ".vmu"):
            parts |= hamamatsu_parts(folder / n)
    out = [folder / n for n in names if slide_extension(n) != ".dcm" and n.lower() not in parts]
    if any(slide_extension(n) == ".dcm" for n in names):
        from mstar_extract.slides.dicom import scan_folder

        scan = scan_folder(folder)
        out.extend(s.path for s in scan.series)
        out.extend(scan.unreadable)
    return sorted(out)


def is_tiff(path: str | os.PathLike) -> bool:
    """True if the file starts with a TIFF/BigTIFF header."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def is_ome_tiff(path: str | os.PathLike) -> bool:
    """True for an OME-TIFF: a ``.ome.tif(f)`` name, or a TIFF whose first ImageDescription is OME-XML."""
    if slide_extension(path) in MULTI_SUFFIXES:
        return True
    if slide_extension(path) not in (".tif", ".tiff") or not is_tiff(path):
        return False
    import tifffile

    try:
        with quiet_tifffile(), tifffile.TiffFile(path) as tf:
            return bool(tf.is_ome)
    except Exception:  # noqa: BLE001 - a broken TIFF is reported by check_tiff_structure
        return False


def check_file(path: Path) -> int:
    """Raise :class:`SlideOpenError` for a missing, unreadable, empty or unsupported file; return its size."""
    if not path.exists():
        raise SlideOpenError(path, "file not found")
    if path.is_dir() and slide_extension(path) != ".mrxs":
        raise SlideOpenError(path, _folder_identity(path).error or "is a directory, not a slide file")
    ext = slide_extension(path)
    if not is_slide_file(path):
        known = " ".join(sorted(e.lstrip(".") for e in SLIDE_EXTENSIONS))
        raise SlideOpenError(path, f"unsupported file extension '{ext or '(none)'}' (known: {known})")
    try:
        size = path.stat().st_size
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise SlideOpenError(path, f"cannot read file: {exc.strerror or exc}") from exc
    if size == 0:
        raise SlideOpenError(path, "empty file (0 bytes)")
    return size


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def quiet_tifffile() -> Iterator[list[str]]:
    """Collect (instead of printing) tifffile's warnings/errors while the block runs; yields the list."""
    logger = logging.getLogger("tifffile")
    handler = _Collect()
    old = logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.propagate = old


def check_tiff_structure(path: Path, size: int) -> None:
    """For TIFF-based files: every page's image data must lie inside the file (catches truncated copies).

    Costs one pass over the IFDs (tags only, no pixel decoding).
    """
    if not is_tiff(path):
        return
    import tifffile

    try:
        with quiet_tifffile() as problems, tifffile.TiffFile(path) as tf:
            end = 0
            n_pages = 0
            for page in tf.pages:
                n_pages += 1
                offsets = getattr(page, "dataoffsets", ()) or ()
                counts = getattr(page, "databytecounts", ()) or ()
                for off, cnt in zip(offsets, counts, strict=False):  # a damaged file may list more of one
                    if cnt and off + cnt > end:
                        end = off + cnt
            if n_pages == 0:
                raise SlideOpenError(path, "TIFF file has no images")
    except SlideOpenError:
        raise
    except Exception as exc:  # tifffile raises many types for broken files
        raise SlideOpenError(path, f"corrupt TIFF structure ({type(exc).__name__}: {exc})") from exc
    if end > size:
        raise SlideOpenError(
            path, f"truncated file: {size} bytes but its image data extends to byte {end} (incomplete copy?)"
        )
    if problems:
        raise SlideOpenError(path, f"corrupt TIFF structure: {problems[0].split('> ', 1)[-1]} (truncated or damaged file?)")
