"""Per-slide facts of a run: the manifest row, plus what the slide's bag and coordinates file record.

The facts of one slide are a small JSON-able dict (cached by :mod:`mstar_extract.report.cache`):

``id, path, status, n`` (patches), ``mpp``, ``mpp_src`` (``metadata``/``override``/``objective``/None),
``sec``, ``err``, ``finished``, ``bad`` (dropped bad patches), ``tissue_mm2``, ``ink`` (ink share of tissue +
ink), ``model``, ``weights`` (SHA-256 or ``random``), ``precision``, ``dim``, ``settings_id`` (key into the
run's settings variants) and the patch-grid geometry the feature map needs (``w0, h0, ps0, step``).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from mstar_extract.report.layout import run_path

PER_SLIDE_SETTINGS = ("mask", "coords_file", "written_as", "mpp_source")
"""Keys of the recorded ``settings`` that describe one slide rather than the run."""


def finite(value: Any) -> Any:
    """``value`` with NaN/inf floats as None (JSON has no NaN)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def row_facts(row: Any) -> dict[str, Any]:
    """The facts a manifest row gives (``row``: a :class:`~mstar_extract.manifest.ManifestRow`)."""
    return {"id": row.slide_id, "path": row.path, "status": row.status, "n": row.n_patches, "mpp": finite(row.mpp),
            "sec": finite(row.seconds), "err": row.error or "", "finished": finite(row.finished),
            "bad": row.n_bad_patches}


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        value = value.item()
    return finite(value)


def _settings(raw: Any) -> dict[str, Any]:
    raw = _decode(raw)
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {}
    return raw if isinstance(raw, dict) else {}


def read_h5_facts(bag: Path | None, coords: Path | None) -> dict[str, Any]:
    """Model, weights, geometry and recorded settings from the bag (preferred) or the coordinates file."""
    import h5py

    facts: dict[str, Any] = {}
    for path, is_bag in ((bag, True), (coords, False)):
        if path is None:
            continue
        try:
            with h5py.File(path, "r") as f:
                root = {k: _decode(v) for k, v in f.attrs.items()}
                ds = {k: _decode(v) for k, v in f["coords"].attrs.items()} if "coords" in f else {}
        except (OSError, KeyError, ValueError):
            continue
        if is_bag:
            facts.update(model=root.get("model"), weights=root.get("weights_sha256"), precision=root.get("precision"),
                         dim=root.get("feature_dim"), has_bag=True)
        _geometry(facts, root, ds)
        facts.setdefault("settings", _settings(root.get("settings")))
    return facts


def _geometry(facts: dict[str, Any], root: dict[str, Any], ds: dict[str, Any]) -> None:
    """Level-0 size, patch footprint and grid step (level-0 px) from bag root attrs or coords dataset attrs."""
    if "w0" in facts:
        return
    # the exact read plan (mstar_*) before the dataset's own keys: in CLAM's attributes patch_size is at patch_level
    get = lambda k: root.get(k, ds.get(f"mstar_{k}", ds.get(k)))  # noqa: E731
    w0, h0, ps0, ps = get("level0_width"), get("level0_height"), get("patch_size_level0"), get("patch_size")
    if not (w0 and h0 and ps0):
        return
    overlap = get("overlap") or 0
    step = float(ps0) * (float(ps) - float(overlap)) / float(ps) if ps else float(ps0)
    facts.update(w0=int(w0), h0=int(h0), ps0=int(ps0), step=max(1.0, step))


def mask_facts(settings: dict[str, Any]) -> dict[str, Any]:
    """Tissue area (mm²), ink fraction and mpp source from the recorded settings (older files: derived)."""
    mask_group = settings.get("mask")
    mask = mask_group if isinstance(mask_group, dict) else {}
    area = mask.get("tissue_area_mm2")
    shape, mpp, frac = mask.get("mask_shape"), mask.get("mask_mpp"), mask.get("tissue_fraction")
    if area is None and shape and mpp and frac is not None:
        area = float(frac) * shape[0] * shape[1] * float(mpp) ** 2 / 1e6
    ink = mask.get("ink_fraction")
    pen = mask.get("pen_fraction")
    if ink is None and pen is not None and frac is not None:
        ink = float(pen) / (float(pen) + float(frac)) if float(pen) + float(frac) > 0 else 0.0
    as_float = lambda v: finite(float(v)) if isinstance(v, (int, float)) else None  # noqa: E731
    return {"tissue_mm2": as_float(area), "ink": as_float(ink), "mpp_src": settings.get("mpp_source")}


def run_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The part of a slide's recorded settings that is the same for every slide of a run."""
    return {k: v for k, v in settings.items() if k not in PER_SLIDE_SETTINGS}


def settings_key(settings: dict[str, Any]) -> str:
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]


def slide_facts(out_dir: Path, row: Any, signatures: dict[str, Any], variants: dict[str, Any]) -> dict[str, Any]:
    """All facts of one slide; its run settings are added to ``variants`` (settings id -> settings)."""
    facts = row_facts(row)
    usable = row.status != "failed"  # a failed slide's older files (if any) do not describe this run
    bag = run_path(out_dir, "bag", row.slide_id) if usable and signatures.get("bag") else None
    coords = run_path(out_dir, "coords", row.slide_id) if usable and signatures.get("coords") else None
    h5 = read_h5_facts(bag, coords) if (bag or coords) else {}
    settings = h5.pop("settings", {}) or {}
    facts.update(h5)
    facts.update(mask_facts(settings))
    shared = run_settings(settings)
    if shared:
        key = settings_key(shared)
        variants.setdefault(key, shared)
        facts["settings_id"] = key
    facts["has_qc"] = bool(signatures.get("qc"))
    return facts
