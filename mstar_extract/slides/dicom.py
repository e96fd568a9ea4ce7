"""DICOM whole-slide images: which ``.dcm`` files form one slide, and that slide's id.

A DICOM WSI is a *series* (one ``SeriesInstanceUID``) of several instance files: one per pyramid level
(``ImageType`` value 3 = ``VOLUME``) plus ``LABEL``, ``OVERVIEW`` and ``THUMBNAIL`` instances, which are the
slide's associated images, never slides of their own. OpenSlide opens the whole series from any one of its
files (it looks for the other instances of the same series in the same folder), so a slide is represented by
one file: the largest ``VOLUME`` instance (level 0), which any OpenSlide-based code can open directly.

Slide id rule (documented in ``docs/backends.md``), per folder (files directly in it, not in sub-folders):

1. the folder holds ONE slide series → the folder's name (``idc/…/<SeriesInstanceUID>/`` or ``case_17/``);
2. it holds several → each series' ``ContainerIdentifier`` (the slide's barcode) when that is set, is not a
   placeholder such as ``Unknown``, and is unique among the folder's series;
3. otherwise the ``SeriesInstanceUID``.

A list file's ``slide_id`` column overrides the rule. Files that are not DICOM, or DICOM of another kind than
VL Whole Slide Microscopy, are reported back as ``unreadable`` so that they fail later with one clear line;
a series without any ``VOLUME`` instance (only a label, say) is not a slide and is skipped with a warning.

Headers are read with pydicom (pixel data never); a folder's scan is cached per process while the folder's
modification time stays the same.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

log = logging.getLogger("mstar")

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
"""VL Whole Slide Microscopy Image Storage."""
PYRAMID_FLAVOR = "VOLUME"
ASSOCIATED_FLAVORS = frozenset({"LABEL", "OVERVIEW", "THUMBNAIL"})
PLACEHOLDER_IDS = frozenset({"", "unknown", "none", "n/a", "na", "-", "?", "null"})
"""Container identifiers that writers put in when they know none (wsidicomizer writes ``Unknown``)."""
_HEADER_TAGS = ["SOPClassUID", "SeriesInstanceUID", "ImageType", "TotalPixelMatrixColumns",
                "TotalPixelMatrixRows", "Columns", "Rows", "ContainerIdentifier"]


@dataclass(frozen=True)
class DicomInstance:
    """The discovery facts of one ``.dcm`` file of a WSI series."""

    path: Path
    series_uid: str
    flavor: str
    """``ImageType`` value 3: ``VOLUME`` (a pyramid level), ``LABEL``, ``OVERVIEW`` or ``THUMBNAIL``."""
    width: int
    height: int
    container_id: str | None


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM WSI series = one slide: its instances, its id and the file that stands for it."""

    uid: str
    folder: Path
    instances: tuple[DicomInstance, ...]
    slide_id: str

    @property
    def volumes(self) -> tuple[DicomInstance, ...]:
        """The pyramid-level instances, largest first."""
        vols = [i for i in self.instances if i.flavor == PYRAMID_FLAVOR]
        return tuple(sorted(vols, key=lambda i: (-i.width * i.height, str(i.path))))

    @property
    def path(self) -> Path:
        """The file that stands for the slide: the level-0 (largest ``VOLUME``) instance."""
        return self.volumes[0].path

    @property
    def container_id(self) -> str | None:
        ids = {i.container_id for i in self.instances if i.container_id}
        return ids.pop() if len(ids) == 1 else None


@dataclass(frozen=True)
class FolderScan:
    """What :func:`scan_folder` found directly in one folder."""

    series: tuple[DicomSeries, ...]
    unreadable: tuple[Path, ...]
    """``.dcm`` files that are not DICOM WSI instances (they fail later, when opened, with their reason)."""


def is_dicom_name(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(".dcm")


def read_instance(path: Path) -> DicomInstance | None:
    """The discovery facts of ``path``, or None when it is not a DICOM VL Whole Slide Microscopy instance."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for non-DICOM/broken files
        log.debug("%s: not readable as DICOM: %s", path, exc)
        return None
    if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS or not ds.get("SeriesInstanceUID"):
        return None
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    flavor = image_type[2] if len(image_type) > 2 else PYRAMID_FLAVOR
    width = int(ds.get("TotalPixelMatrixColumns") or ds.get("Columns") or 0)
    height = int(ds.get("TotalPixelMatrixRows") or ds.get("Rows") or 0)
    container = str(ds.get("ContainerIdentifier") or "").strip() or None
    return DicomInstance(path, str(ds.SeriesInstanceUID), flavor, width, height, container)


def _usable_container(cid: str | None) -> TypeGuard[str]:
    return cid is not None and cid.strip().lower() not in PLACEHOLDER_IDS and "/" not in cid


def _assign_ids(folder: Path, groups: dict[str, list[DicomInstance]]) -> tuple[DicomSeries, ...]:
    """Apply the slide id rule of the module docstring to the slide series of one folder."""
    if len(groups) == 1:
        uid, insts = next(iter(groups.items()))
        return (DicomSeries(uid, folder, tuple(insts), folder.name),)
    out: list[DicomSeries] = []
    draft = [DicomSeries(uid, folder, tuple(insts), uid) for uid, insts in groups.items()]
    counts: dict[str, int] = {}
    for s in draft:
        cid = s.container_id
        if _usable_container(cid):
            counts[cid] = counts.get(cid, 0) + 1
    for s in draft:
        cid = s.container_id
        sid = cid if cid is not None and _usable_container(cid) and counts.get(cid) == 1 else s.uid
        out.append(DicomSeries(s.uid, folder, s.instances, sid))
    return tuple(sorted(out, key=lambda s: s.slide_id))


@functools.lru_cache(maxsize=256)
def _scan_cached(folder: Path, _mtime_ns: int) -> FolderScan:
    by_series: dict[str, list[DicomInstance]] = {}
    unreadable: list[Path] = []
    names = sorted(n for n in os.listdir(folder) if is_dicom_name(n) and not n.startswith("."))
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        inst = read_instance(path)
        if inst is None:
            unreadable.append(path)
        else:
            by_series.setdefault(inst.series_uid, []).append(inst)
    slides: dict[str, list[DicomInstance]] = {}
    for uid, insts in by_series.items():
        if any(i.flavor == PYRAMID_FLAVOR for i in insts):
            slides[uid] = insts
        else:
            kinds = ", ".join(sorted({i.flavor.lower() for i in insts}))
            log.warning("%s: DICOM series %s holds no pyramid (VOLUME) image, only %s: not a slide", folder, uid, kinds)
    return FolderScan(_assign_ids(folder, slides) if slides else (), tuple(unreadable))


def scan_folder(folder: str | os.PathLike) -> FolderScan:
    """The DICOM WSI series whose files lie directly in ``folder`` (cached while the folder is unchanged)."""
    folder = Path(os.path.abspath(folder))
    try:
        mtime = folder.stat().st_mtime_ns
    except OSError:
        return FolderScan((), ())
    return _scan_cached(folder, mtime)


def series_of(path: str | os.PathLike) -> DicomSeries | None:
    """The slide series that the ``.dcm`` file ``path`` belongs to, or None (not a WSI instance, or a series
    without pyramid images)."""
    path = Path(os.path.abspath(path))
    scan = scan_folder(path.parent)
    for series in scan.series:
        if any(i.path == path for i in series.instances):
            return series
    return None
