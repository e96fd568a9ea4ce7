"""Feature bags ``features/<slide_id>.h5`` and ``pt_files/<slide_id>.pt`` (paths: :mod:`mstar_extract.store.layout`).

A bag holds ``features`` (N, D) float32/float16, chunked in blocks of rows, and ``coords`` (N, 2) int64
(level-0 ``[x, y]`` top-left corners; row i <-> feature i). Root attrs are :data:`REQUIRED_ROOT_ATTRS` plus
any extras; ``coords`` carries TRIDENT's attrs (:data:`COORDS_ATTRS`) so TRIDENT readers work.

Conventions:

* HDF5 attrs cannot be ``None``: an unknown number (e.g. ``level0_mpp`` of a slide without metadata, or
  ``target_magnification`` when tiling by mpp) is stored as NaN; :func:`read_bag` gives ``None`` back.
* ``settings`` (segmentation/tiling settings) is a JSON string; :func:`read_bag` decodes it.
* ``complete = 1`` is the last attr written before the file is closed and renamed into place (files are
  built in memory and written through :func:`mstar_extract.store.atomic.atomic_hdf5`, so a reader never sees a
  partial bag and a full disk is one plain ``OSError``; the marker also rejects files produced by a writer that
  was not atomic).
* An empty bag ``(0, D)`` is valid: the slide had no tissue.
* ``decode`` says which reader path made the model inputs: ``full`` (bit-identical to the official mSTAR
  pipeline, the default) or ``reduced`` (``--fast-decode``); see docs/reader.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mstar_extract import __version__
from mstar_extract.errors import first_line
from mstar_extract.store.atomic import atomic_hdf5, write_bytes_atomic

if TYPE_CHECKING:  # pragma: no cover
    from mstar_extract.tiling import ReadPlan

REQUIRED_ROOT_ATTRS: tuple[str, ...] = (
    "slide_id",
    "slide_path",
    "model",
    "weights_sha256",
    "feature_dim",
    "patch_size",
    "patch_size_level0",
    "target_mpp",
    "target_magnification",
    "level0_mpp",
    "level0_magnification",
    "level0_width",
    "level0_height",
    "input_size",
    "precision",
    "mstar_extract_version",
    "created",
    "settings",
)
"""Root attrs every bag has (README "Output layout")."""

COORDS_ATTRS: tuple[str, ...] = (
    "patch_size",
    "patch_size_level0",
    "target_magnification",
    "level0_magnification",
    "level0_width",
    "level0_height",
    "overlap",
    "name",
)
"""TRIDENT's attrs on the ``coords`` dataset."""

NULLABLE = ("target_magnification", "level0_mpp", "level0_magnification", "target_mpp")
"""Numeric attrs that may be unknown (stored as NaN)."""

DECODES: tuple[str, ...] = ("full", "reduced")
"""Values of the ``decode`` root attr."""

COMPLETE_ATTR = "complete"
CHUNK_BYTES = 1 << 20
"""Target size of one ``features`` chunk (rows x D x itemsize); 256 rows for D=1024 float32."""
FEATURE_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class Bag:
    """A feature bag read back into memory."""

    features: np.ndarray
    coords: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    coords_attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])


def chunk_rows(n: int, dim: int, itemsize: int) -> int:
    """Rows per ``features`` chunk: about :data:`CHUNK_BYTES`, at least 1, at most ``n``."""
    return max(1, min(n, CHUNK_BYTES // max(1, dim * itemsize)))


def _to_attr(value: Any) -> Any:
    if value is None:
        return np.nan
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_attr(key: str, value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        value = value.item()
    if key in NULLABLE and isinstance(value, float) and math.isnan(value):
        return None
    if key == "settings" and isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def bag_attrs(
    plan: ReadPlan,
    *,
    slide_id: str,
    slide_path: str | os.PathLike[str],
    model: str,
    weights_sha256: str,
    feature_dim: int,
    precision: str,
    input_size: int = 224,
    decode: str = "full",
    **extra: Any,
) -> dict[str, Any]:
    """The root attrs of a bag for a slide tiled by ``plan`` (``created``/version are added on write).

    ``decode`` is the reader path of the model inputs (:data:`DECODES`)."""
    if decode not in DECODES:
        raise ValueError(f"decode must be one of {', '.join(DECODES)}, got {decode!r}")
    attrs: dict[str, Any] = {
        "slide_id": slide_id,
        "slide_path": os.fspath(slide_path),
        "model": model,
        "weights_sha256": weights_sha256,
        "feature_dim": int(feature_dim),
        "patch_size": int(plan.patch_size),
        "patch_size_level0": int(plan.patch_size_level0),
        "target_mpp": plan.target_mpp,
        "target_magnification": plan.target_magnification,
        "level0_mpp": plan.level0_mpp,
        "level0_magnification": plan.level0_magnification,
        "level0_width": int(plan.level0_width),
        "level0_height": int(plan.level0_height),
        "input_size": int(input_size),
        "precision": precision,
        "decode": decode,
        "overlap": int(plan.overlap),
        "coords_source": plan.source,
        "settings": dict(plan.settings),
    }
    attrs.update(extra)
    return attrs


def coords_attrs_from(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """TRIDENT's ``coords`` attrs derived from a bag's root attrs (``name`` = slide id)."""
    return {
        "patch_size": attrs["patch_size"],
        "patch_size_level0": attrs["patch_size_level0"],
        "target_magnification": attrs.get("target_magnification"),
        "level0_magnification": attrs.get("level0_magnification"),
        "level0_width": attrs["level0_width"],
        "level0_height": attrs["level0_height"],
        "overlap": attrs.get("overlap", 0),
        "name": attrs["slide_id"],
    }


def write_bag(
    path: str | os.PathLike[str],
    features: Any,
    coords: Any,
    attrs: Mapping[str, Any],
    dtype: str = "float32",
    coords_attrs: Mapping[str, Any] | None = None,
    features_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write a feature bag atomically; ``attrs`` must hold every :data:`REQUIRED_ROOT_ATTRS` except
    ``mstar_extract_version``/``created`` (filled in). ``features_attrs`` go on the ``features`` dataset (the
    ``trident`` layout's ``name``, ``savetodir``, ``encoder``, as TRIDENT writes them). Returns the final path.
    A full or read-only disk raises one ``OSError`` (see :func:`mstar_extract.store.atomic.disk_problem`)."""
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(FEATURE_DTYPES)}, got {dtype!r}")
    feats = np.asarray(features, dtype=FEATURE_DTYPES[dtype])
    xy = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if feats.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {feats.shape}")
    if feats.shape[0] != xy.shape[0]:
        raise ValueError(f"{feats.shape[0]} feature rows but {xy.shape[0]} coordinates")
    root = dict(attrs)
    root.setdefault("feature_dim", int(feats.shape[1]))
    if int(root["feature_dim"]) != feats.shape[1]:
        raise ValueError(f"feature_dim attr {root['feature_dim']} != features width {feats.shape[1]}")
    root["mstar_extract_version"] = __version__
    root["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    root.setdefault("settings", {})
    missing = [k for k in REQUIRED_ROOT_ATTRS if k not in root]
    if missing:
        raise ValueError(f"bag attrs missing: {', '.join(missing)}")
    root.pop(COMPLETE_ATTR, None)
    c_attrs = dict(coords_attrs) if coords_attrs is not None else coords_attrs_from(root)

    n, d = feats.shape
    final = Path(path)
    with atomic_hdf5(final) as f:
        if n:
            rows = chunk_rows(n, d, feats.dtype.itemsize)
            f.create_dataset("features", data=feats, chunks=(rows, d))
            f.create_dataset("coords", data=xy, chunks=(min(n, 65536), 2))
        else:
            f.create_dataset("features", shape=(0, d), dtype=feats.dtype)
            f.create_dataset("coords", shape=(0, 2), dtype=np.int64)
        for k, v in c_attrs.items():
            f["coords"].attrs[k] = _to_attr(v)
        for k, v in (features_attrs or {}).items():
            f["features"].attrs[k] = _to_attr(v)
        for k, v in root.items():
            f.attrs[k] = _to_attr(v)
        f.attrs["n_patches"] = int(n)
        f.attrs[COMPLETE_ATTR] = 1
    return final


def write_pt(path: str | os.PathLike[str], features: Any) -> Path:
    """Write ``pt_files/<slide_id>.pt``: a torch float32 (N, D) tensor (mSTAR/CLAM downstream), atomically."""
    import torch

    t = torch.as_tensor(np.asarray(features, dtype=np.float32)).contiguous()
    if t.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(t.shape)}")
    import io

    final = Path(path)
    buf = io.BytesIO()
    torch.save(t, buf)  # in memory first: a full disk is then one plain OSError from the write
    write_bytes_atomic(final, buf.getbuffer())
    return final


def read_bag(path: str | os.PathLike[str]) -> Bag:
    """Read a bag fully (features keep their stored dtype)."""
    import h5py

    with h5py.File(path, "r") as f:
        return Bag(
            features=f["features"][()],
            coords=f["coords"][()],
            attrs={k: _from_attr(k, v) for k, v in f.attrs.items()},
            coords_attrs={k: _from_attr(k, v) for k, v in f["coords"].attrs.items()},
        )


def _show(value: Any) -> str:
    """A value in a one-line reason: floats with 6 significant digits (0.666667, not 0.6666666666666666)."""
    return f"{value:g}" if isinstance(value, float) else repr(value)


def _matches(have: Any, want: Any) -> bool:
    if isinstance(want, float) or isinstance(have, float):
        try:
            return (have is None and want is None) or math.isclose(float(have), float(want), rel_tol=1e-6)
        except (TypeError, ValueError):
            return False
    return have == want


def validate_bag(path: str | os.PathLike[str], expect: Mapping[str, Any] | None = None) -> str | None:
    """``None`` if ``path`` is a complete, consistent bag (meeting ``expect``), else a one-line reason.

    Checks: opens as HDF5; ``features`` (N, D) and ``coords`` (N, 2) exist with the same N; D equals the
    ``feature_dim`` attr; every required attr and the ``complete`` marker are present; the last row of both
    datasets can be read. ``expect`` may give ``n_patches``, ``dtype`` (``float32``/``float16``), ``coords``
    (an (N, 2) array that must be equal) and any root attr (``feature_dim``, ``model``, ``weights_sha256``...).
    """
    import h5py

    p = Path(path)
    if not p.is_file():
        return "missing"
    try:
        with h5py.File(p, "r") as f:
            for name in ("features", "coords"):
                if name not in f or not isinstance(f[name], h5py.Dataset):
                    return f"no {name!r} dataset"
            feats, xy = f["features"], f["coords"]
            if feats.ndim != 2:
                return f"features has shape {feats.shape}, expected (N, D)"
            if xy.ndim != 2 or xy.shape[1] != 2:
                return f"coords has shape {xy.shape}, expected (N, 2)"
            if feats.shape[0] != xy.shape[0]:
                return f"{feats.shape[0]} feature rows but {xy.shape[0]} coords"
            missing = [k for k in REQUIRED_ROOT_ATTRS if k not in f.attrs]
            if missing:
                return f"attrs missing: {', '.join(missing)}"
            if int(f.attrs.get(COMPLETE_ATTR, 0)) != 1:
                return "not marked complete"
            if int(f.attrs["feature_dim"]) != feats.shape[1]:
                return f"features are {feats.shape[1]}-d but feature_dim attr is {int(f.attrs['feature_dim'])}"
            n = feats.shape[0]
            if n:
                last_f = feats[n - 1]  # reading the last rows forces the final chunks to be readable
                xy[n - 1]
                if not np.all(np.isfinite(last_f)):
                    return "last feature row is not finite"
            for key, want in (expect or {}).items():
                if key == "n_patches":
                    if n != int(want):
                        return f"{n} patches, expected {int(want)}"
                elif key == "dtype":
                    if np.dtype(feats.dtype) != np.dtype(FEATURE_DTYPES.get(str(want), want)):
                        return f"features are {feats.dtype}, expected {want}"
                elif key == "coords":
                    want_xy = np.asarray(want, dtype=np.int64).reshape(-1, 2)
                    if want_xy.shape != xy.shape or not np.array_equal(xy[()], want_xy):
                        return "coords differ from the expected coordinates"
                else:
                    have = _from_attr(key, f.attrs[key]) if key in f.attrs else None
                    if key not in f.attrs or not _matches(have, want):
                        return f"{key} is {_show(have)}, expected {_show(want)}"
    except OSError as exc:
        return f"not a readable HDF5 file (truncated or corrupt): {first_line(exc)}"
    except (KeyError, ValueError, TypeError) as exc:
        return f"unreadable bag: {first_line(exc, with_type=True)}"
    return None
