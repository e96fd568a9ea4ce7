"""Coordinate files ``coords/<slide_id>.h5`` (path: :mod:`mstar_extract.store.layout`; format: README "Output
layout" and docs/tiling.md): write (TRIDENT or CLAM semantics) and read back any of mstar / TRIDENT / CLAM files
as an exact :class:`~mstar_extract.tiling.ReadPlan`.

Formats (dataset ``coords``, (N, 2) int64 level-0 top-left ``[x, y]``; attributes on the dataset):

* ``trident`` (default): ``patch_size`` (px at target), ``patch_size_level0``, ``target_magnification``,
  ``level0_magnification``, ``level0_width``, ``level0_height``, ``overlap``, ``name``, ``savetodir`` — what
  TRIDENT's ``coords_to_h5`` writes (its files are called ``<id>_patches.h5``).
* ``clam``: ``patch_level``, ``patch_size`` (px *at patch_level*), ``downsample`` (x, y), ``level_dim``,
  ``downsampled_level_dim``, ``name``, ``save_path`` — what CLAM's ``create_patches_fp.py`` writes
  (``patches/<id>.h5``).

Files written by mstar carry, in both formats, the exact read plan as extra ``mstar_*`` attributes
(``mstar_level``, ``mstar_level_downsample``, ``mstar_read_size``, ``mstar_patch_size``, ``mstar_target_mpp``,
``mstar_level0_mpp`` ...), and root attributes ``mstar_format`` (``trident``/``clam``), ``slide_id``,
``slide_path``, ``settings`` (JSON) and ``mstar_extract_version``; a per-patch ``tissue_fraction`` dataset too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mstar_extract.errors import MstarError, first_line
from mstar_extract.store.atomic import atomic_buffer
from mstar_extract.tiling import ReadPlan, choose_level

FORMATS = ("trident", "clam")


class CoordsFormatError(MstarError):
    """A coordinates file is not readable as mstar, TRIDENT or CLAM coordinates."""


def _none_nan(v: float | None) -> float:
    return float("nan") if v is None else float(v)


def _trident_attrs(a: Any, plan: ReadPlan, slide_id: str, path: Path) -> None:
    """TRIDENT's ``coords_to_h5`` attributes (``savetodir``: the folder above ``patches/``, as TRIDENT writes it)."""
    a["patch_size"] = int(plan.patch_size)
    a["patch_size_level0"] = int(plan.patch_size_level0)
    a["target_magnification"] = _none_nan(plan.target_magnification)
    a["level0_magnification"] = _none_nan(plan.level0_magnification)
    a["level0_width"] = int(plan.level0_width)
    a["level0_height"] = int(plan.level0_height)
    a["overlap"] = int(plan.overlap)
    a["name"] = slide_id
    a["savetodir"] = str(path.parent.parent if path.parent.name == "patches" else path.parent)


def _clam_attrs(a: Any, plan: ReadPlan, slide_id: str, level_dimensions: tuple[tuple[int, int], ...] | None,
                path: Path) -> None:
    """CLAM's ``process_contour`` attributes (``save_path``: the ``patches`` folder, as CLAM writes it)."""
    if level_dimensions is not None and plan.level < len(level_dimensions):
        lw, lh = level_dimensions[plan.level]
    else:
        lw = int(round(plan.level0_width / plan.level_downsample))
        lh = int(round(plan.level0_height / plan.level_downsample))
    a["patch_size"] = int(plan.read_size)
    a["patch_level"] = int(plan.level)
    a["downsample"] = np.array([plan.level0_width / lw, plan.level0_height / lh], dtype=np.float64)
    a["level_dim"] = np.array([lw, lh], dtype=np.int64)
    a["downsampled_level_dim"] = np.array([lw, lh], dtype=np.int64)
    a["name"] = slide_id
    a["save_path"] = str(path.parent)


def _read_plan_attrs(a: Any, plan: ReadPlan) -> None:
    """The exact read plan, in both formats (what :func:`read_coords_file` reads back as ``mstar``)."""
    a["mstar_level"] = int(plan.level)
    a["mstar_level_downsample"] = float(plan.level_downsample)
    a["mstar_read_size"] = int(plan.read_size)
    a["mstar_patch_size"] = int(plan.patch_size)
    a["mstar_patch_size_level0"] = int(plan.patch_size_level0)
    a["mstar_target_mpp"] = float(plan.target_mpp)
    a["mstar_level0_mpp"] = _none_nan(plan.level0_mpp)
    a["mstar_overlap"] = int(plan.overlap)


def write_coords(
    path: str | os.PathLike[str],
    plan: ReadPlan,
    slide_id: str,
    slide_path: str = "",
    fmt: str = "trident",
    level_dimensions: tuple[tuple[int, int], ...] | None = None,
) -> Path:
    """Write ``plan`` to ``path`` atomically in ``fmt`` (``trident`` or ``clam``); returns the path.

    ``level_dimensions`` (the slide's) gives CLAM's ``level_dim``; without it it is derived from the downsample.
    """
    import h5py

    from mstar_extract import __version__

    if fmt not in FORMATS:
        raise ValueError(f"unknown coords format {fmt!r}; choose from {', '.join(FORMATS)}")
    path = Path(path)
    coords = np.asarray(plan.coords, dtype=np.int64).reshape(-1, 2)
    with atomic_buffer(path) as tmp:  # built in memory: a full disk is one OSError (store.atomic.disk_problem)
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("coords", data=coords, maxshape=(None, 2), chunks=(max(1, min(len(coords), 4096)), 2))
            if fmt == "trident":
                _trident_attrs(ds.attrs, plan, slide_id, path)
            else:
                _clam_attrs(ds.attrs, plan, slide_id, level_dimensions, path)
            _read_plan_attrs(ds.attrs, plan)
            if plan.tissue_fraction is not None and len(plan.tissue_fraction) == len(coords):
                f.create_dataset("tissue_fraction", data=np.asarray(plan.tissue_fraction, np.float32))
            r = f.attrs
            r["mstar_format"] = fmt
            r["slide_id"] = slide_id
            r["slide_path"] = str(slide_path)
            r["n_patches"] = int(len(coords))
            r["level0_width"] = int(plan.level0_width)
            r["level0_height"] = int(plan.level0_height)
            r["source"] = plan.source
            r["settings"] = json.dumps(plan.settings, sort_keys=True, default=str)
            r["mstar_extract_version"] = __version__
    return path


def is_complete_coords(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a readable coordinates file (files are written atomically: readable = complete)."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            ds = f.get("coords")
            return ds is not None and ds.ndim == 2 and ds.shape[1] == 2
    except (OSError, ValueError, KeyError):
        return False


def count_coords(path: str | os.PathLike[str]) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["coords"].shape[0])


def coords_summary(path: str | os.PathLike[str]) -> tuple[int, float | None] | None:
    """``(n_patches, level-0 mpp or None)`` of a complete coordinates file, or None when it is not one."""
    if not is_complete_coords(path):
        return None
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["coords"].shape[0]), _fnan(_attr(f["coords"].attrs, "mstar_level0_mpp"))


def _attr(a: Any, key: str, default: Any = None) -> Any:
    if key not in a:
        return default
    v = a[key]
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray) and v.shape == ():
        return v.item()
    if isinstance(v, np.generic):
        return v.item()
    return v


def _fnan(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if f != f else f


def detect_format(attrs: Any, root_attrs: Any = None) -> str:
    """``mstar``, ``trident`` or ``clam`` from a ``coords`` dataset's attributes."""
    if "mstar_read_size" in attrs and "mstar_level" in attrs:
        return "mstar"
    if "patch_size_level0" in attrs:
        return "trident"
    if "patch_level" in attrs and "patch_size" in attrs:
        return "clam"
    raise KeyError("no mstar, TRIDENT (patch_size_level0) or CLAM (patch_level, patch_size) attributes")


def _need(a: Any, key: str, path: Path, fmt: str) -> Any:
    """Attribute ``key`` that format ``fmt`` requires; CoordsFormatError when it is missing or empty."""
    v = _attr(a, key)
    if v is None:
        raise CoordsFormatError(f"{path}: {fmt} coordinates without the {key!r} attribute")
    return v


@dataclass
class _CoordsFile:
    """What every format shares: the file, its coordinates and attributes, and the slide (or None)."""

    path: Path
    coords: np.ndarray
    attrs: Any
    """Attributes of the ``coords`` dataset."""
    settings: dict[str, Any]
    tissue_fraction: np.ndarray | None
    width: int | None
    height: int | None
    """Level-0 size: the slide's, else the file's (None when unknown)."""
    slide: Any
    slide_mpp: float | None

    def need(self, key: str, fmt: str) -> Any:
        return _need(self.attrs, key, self.path, fmt)


def _open_coords(path: Path, f: Any, slide: Any) -> _CoordsFile:
    if "coords" not in f:
        raise CoordsFormatError(f"{path}: no 'coords' dataset")
    ds = f["coords"]
    if ds.ndim != 2 or ds.shape[1] != 2:
        raise CoordsFormatError(f"{path}: 'coords' must be (N, 2), got {ds.shape}")
    settings: dict = {}
    raw = _attr(f.attrs, "settings")
    if raw:
        try:
            settings = json.loads(raw)
        except (TypeError, ValueError):
            settings = {}
    a = ds.attrs
    w0 = _attr(a, "level0_width", _attr(f.attrs, "level0_width"))
    h0 = _attr(a, "level0_height", _attr(f.attrs, "level0_height"))
    if slide is not None:
        w0, h0 = slide.dimensions
    return _CoordsFile(
        path=path, coords=np.asarray(ds[()], dtype=np.int64).reshape(-1, 2), attrs=a, settings=settings,
        tissue_fraction=np.asarray(f["tissue_fraction"][()], np.float32) if "tissue_fraction" in f else None,
        width=w0, height=h0, slide=slide, slide_mpp=_slide_mpp(slide),
    )


def _mstar_plan(c: _CoordsFile, origin: str) -> ReadPlan:
    """A file written by mstar: the exact read plan is in its ``mstar_*`` attributes."""
    target_mpp = float(c.need("mstar_target_mpp", "mstar"))
    plan = ReadPlan(
        coords=c.coords, level=int(c.need("mstar_level", "mstar")),
        level_downsample=float(c.need("mstar_level_downsample", "mstar")),
        read_size=int(c.need("mstar_read_size", "mstar")), patch_size=int(c.need("mstar_patch_size", "mstar")),
        patch_size_level0=int(c.need("mstar_patch_size_level0", "mstar")), target_mpp=target_mpp,
        target_magnification=_fnan(_attr(c.attrs, "target_magnification")) or 10.0 / target_mpp,
        level0_mpp=_fnan(_attr(c.attrs, "mstar_level0_mpp")),
        level0_magnification=_fnan(_attr(c.attrs, "level0_magnification")),
        level0_width=int(c.width or 0), level0_height=int(c.height or 0),
        overlap=int(_attr(c.attrs, "mstar_overlap", 0)),
        source="mstar", settings={**c.settings, "written_as": origin}, tissue_fraction=c.tissue_fraction,
    )
    if c.slide is not None:
        _check_level(c.path, plan, c.slide)
    return plan


def _trident_plan(c: _CoordsFile) -> ReadPlan:
    """TRIDENT: ``patch_size`` at the target, ``patch_size_level0``; the read level is chosen on the slide."""
    ps = int(c.need("patch_size", "TRIDENT"))
    ps0 = int(c.need("patch_size_level0", "TRIDENT"))
    tmag = _fnan(_attr(c.attrs, "target_magnification"))
    mag0 = _fnan(_attr(c.attrs, "level0_magnification"))
    ds_needed = ps0 / ps
    if c.slide is not None:
        level = choose_level(c.slide.level_downsamples, ds_needed)
        level_ds = float(c.slide.level_downsamples[level])
    else:
        level, level_ds = 0, 1.0
    level0_mpp = c.slide_mpp if c.slide_mpp is not None else (10.0 / mag0 if mag0 else None)
    target_mpp = 10.0 / tmag if tmag else (level0_mpp * ds_needed if level0_mpp else float("nan"))
    return ReadPlan(
        coords=c.coords, level=level, level_downsample=level_ds, read_size=max(1, int(round(ps0 / level_ds))),
        patch_size=ps, patch_size_level0=ps0, target_mpp=target_mpp, target_magnification=tmag,
        level0_mpp=level0_mpp, level0_magnification=mag0, level0_width=int(c.width or 0),
        level0_height=int(c.height or 0), overlap=int(_attr(c.attrs, "overlap", 0) or 0), source="trident", settings=c.settings,
        tissue_fraction=c.tissue_fraction,
    )


def _clam_plan(c: _CoordsFile) -> ReadPlan:
    """CLAM: ``patch_size`` pixels at pyramid level ``patch_level``."""
    level = int(c.need("patch_level", "CLAM"))
    ps_level = int(c.need("patch_size", "CLAM"))
    level_ds = float(np.atleast_1d(np.asarray(_attr(c.attrs, "downsample", 1.0), dtype=np.float64)).mean())
    if c.slide is not None:
        if level >= c.slide.level_count:
            raise CoordsFormatError(f"{c.path}: patch_level {level} but the slide has {c.slide.level_count} level(s)")
        level_ds = float(c.slide.level_downsamples[level])
    w0, h0 = c.width, c.height
    if w0 is None and "level_dim" in c.attrs:  # from that level's size
        lw, lh = np.asarray(_attr(c.attrs, "level_dim")).ravel()[:2]
        w0, h0 = int(round(lw * level_ds)), int(round(lh * level_ds))
    mag0 = _slide_mag(c.slide)
    return ReadPlan(
        coords=c.coords, level=level, level_downsample=level_ds, read_size=ps_level, patch_size=ps_level,
        patch_size_level0=int(round(ps_level * level_ds)),
        target_mpp=c.slide_mpp * level_ds if c.slide_mpp is not None else float("nan"),
        target_magnification=(mag0 / level_ds) if mag0 else None, level0_mpp=c.slide_mpp,
        level0_magnification=mag0, level0_width=int(w0 or 0), level0_height=int(h0 or 0), overlap=0,
        source="clam", settings=c.settings, tissue_fraction=c.tissue_fraction,
    )


def read_coords_file(path: str | os.PathLike[str], slide: Any = None) -> ReadPlan:
    """Read a coordinates file written by mstar, TRIDENT or CLAM as an exact :class:`ReadPlan`.

    The format is detected from the attributes of the ``coords`` dataset. ``slide`` (an open Slide) is needed to
    choose the read level of TRIDENT files and to fill resolutions that a CLAM file does not store; without it
    TRIDENT patches are read at level 0. Raises :class:`CoordsFormatError` with a one-line reason.
    """
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise CoordsFormatError(f"{path}: not a readable HDF5 coordinates file ({first_line(exc)})") from None
    with f:
        c = _open_coords(path, f, slide)
        try:
            fmt = detect_format(c.attrs)
        except KeyError as exc:
            raise CoordsFormatError(f"{path}: {exc.args[0]}") from None
        try:
            if fmt == "mstar":
                return _mstar_plan(c, _attr(f.attrs, "mstar_format", "trident"))
            return _trident_plan(c) if fmt == "trident" else _clam_plan(c)
        except (TypeError, ValueError) as exc:  # an attribute of the wrong type or shape
            raise CoordsFormatError(f"{path}: malformed {fmt} attributes ({first_line(exc)})") from None


def _slide_mpp(slide: Any) -> float | None:
    if slide is None:
        return None
    try:
        return float(slide.mpp)
    except MstarError:
        return None


def _slide_mag(slide: Any) -> float | None:
    mpp = _slide_mpp(slide)
    if mpp is None:
        return None
    from mstar_extract.tiling import snap_magnification

    return snap_magnification(10.0 / mpp) or 10.0 / mpp


def _check_level(path: Path, plan: ReadPlan, slide: Any) -> None:
    if plan.level >= slide.level_count:
        raise CoordsFormatError(f"{path}: read level {plan.level} but the slide has {slide.level_count} level(s)")
    actual = float(slide.level_downsamples[plan.level])
    if abs(actual - plan.level_downsample) > 1e-3 * max(1.0, actual):
        raise CoordsFormatError(
            f"{path}: level {plan.level} has downsample {actual:g} in the slide but {plan.level_downsample:g} in the file "
            "(coordinates made for another scan?)"
        )


TRIDENT_PATCH_DIR = re.compile(r"^\d+(\.\d+)?x_\d+px_\d+px_overlap$")
"""TRIDENT's patching folder names (``20x_256px_0px_overlap``)."""


def find_coords_file(coords_dir: str | os.PathLike[str], slide_id: str) -> Path | None:
    """The coordinates file of ``slide_id`` under ``coords_dir`` as mstar (``coords/<id>.h5``), CLAM
    (``patches/<id>.h5``) or TRIDENT (``<id>_patches.h5``, possibly under ``patches/``, or a TRIDENT job folder's
    ``<mag>x_<ps>px_<overlap>px_overlap/patches/``) lay them out; or None. A job folder with the slide in two
    patching folders is ambiguous: CoordsFormatError naming them (give one as ``--coords-dir``)."""
    d = Path(coords_dir)
    names = (f"{slide_id}.h5", f"{slide_id}_patches.h5")
    for sub in ("", "coords", "patches"):
        for name in names:
            p = d / sub / name if sub else d / name
            if p.is_file():
                return p
    try:
        subs = sorted(e.name for e in os.scandir(d) if e.is_dir() and TRIDENT_PATCH_DIR.match(e.name))
    except OSError:
        return None
    found = [d / sub / "patches" / names[1] for sub in subs if (d / sub / "patches" / names[1]).is_file()]
    if len(found) > 1:
        raise CoordsFormatError(f"{d}: coordinates of {slide_id!r} in {len(found)} TRIDENT patching folders "
                                f"({', '.join(p.parent.parent.name for p in found)}); give one of them as --coords-dir")
    return found[0] if found else None


CLAM_FALLBACK_LEVEL0_PX = 512
"""What the mSTAR repo's ``Whole_Slide_Bag_FP`` reads when a coordinates file lacks ``patch_level`` /
``patch_size``: "using default patch level and size", 512 px at level 0."""


def clam_reader_misread(patch_size_level0: int, fmt: str) -> str | None:
    """Why CLAM-style readers would misread a coordinates file written in ``fmt`` whose patches cover
    ``patch_size_level0`` level-0 pixels, or None.

    TRIDENT attributes have no ``patch_level``: CLAM's ``Whole_Slide_Bag_FP`` stops with a KeyError, but the mSTAR
    repo's falls back silently to 512 px at level 0, the wrong area unless the patches' footprint is 512 level-0
    px (e.g. 20x patches of 256 px on a 20x scan are 256 level-0 px: the fallback reads 4x their area)."""
    if fmt != "trident" or int(patch_size_level0) == CLAM_FALLBACK_LEVEL0_PX:
        return None
    area = (CLAM_FALLBACK_LEVEL0_PX / max(1, int(patch_size_level0))) ** 2
    return (f"the mSTAR repo's extract_feature.py would read {CLAM_FALLBACK_LEVEL0_PX} px at level 0 for patches "
            f"of {int(patch_size_level0)} level-0 px ({area:.3g}x their area)")
