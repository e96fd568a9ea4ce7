"""Tissue contours as QuPath-compatible GeoJSON (level-0 pixel coordinates), and reading them back.

Written: a ``FeatureCollection`` with one ``Feature`` per tissue piece — a ``Polygon`` (outer ring, then one ring
per hole; rings closed, outer counter-clockwise, holes clockwise) — with properties
``{"objectType": "annotation", "classification": {"name": "Tissue", "color": [...]}, "isLocked": false}``,
which QuPath (File > Import objects) and TRIDENT read. Pen regions can be added as a second class ("Pen").

Read: FeatureCollection / Feature / bare geometry / a list of features; ``Polygon`` and ``MultiPolygon`` (also
inside ``GeometryCollection``); features whose classification is ``Pen``/``Ignore*``/``Background`` are skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mstar_extract.errors import MstarError
from mstar_extract.store.atomic import write_text_atomic
from mstar_extract.tissue.contours import TissueContour

TISSUE_COLOR = [0, 200, 0]
PEN_COLOR = [220, 0, 220]
_SKIP_CLASSES = ("pen", "background", "ignore", "artefact", "artifact", "other")


def _ring(points: np.ndarray, clockwise: bool) -> list[list[float]]:
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(pts) == 0:
        return []
    # signed area in image coordinates (y down): positive = clockwise on screen
    x, y = pts[:, 0], pts[:, 1]
    area = 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))
    if (area > 0) != clockwise:
        pts = pts[::-1]
    ring = [[round(float(a), 2), round(float(b), 2)] for a, b in pts]
    ring.append(ring[0])
    return ring


def _feature(c: TissueContour, fid: str, cls: str, color: list[int], **extra: Any) -> dict | None:
    """One QuPath annotation Feature (outer ring, then hole rings) for ``c``; None when it is degenerate."""
    if len(c.outer) < 3:
        return None
    rings = [_ring(c.outer, clockwise=False)] + [_ring(h, clockwise=True) for h in c.holes if len(h) >= 3]
    return {
        "type": "Feature",
        "id": fid,
        "geometry": {"type": "Polygon", "coordinates": rings},
        "properties": {"objectType": "annotation", "classification": {"name": cls, "color": color},
                       "isLocked": False, **extra},
    }


def contours_to_geojson(contours: Iterable[TissueContour], pen: Iterable[TissueContour] = (), slide_id: str = "") -> dict:
    """A GeoJSON FeatureCollection (dict) of tissue (and optional pen) contours in level-0 pixels."""
    features = [_feature(c, f"tissue-{i}", "Tissue", TISSUE_COLOR, tissue_id=i) for i, c in enumerate(contours)]
    features += [_feature(c, f"pen-{i}", "Pen", PEN_COLOR) for i, c in enumerate(pen)]
    out: dict[str, Any] = {"type": "FeatureCollection", "features": [f for f in features if f is not None]}
    if slide_id:
        out["properties"] = {"slide_id": slide_id, "coordinates": "level-0 pixels"}
    return out


def write_geojson(path: str | os.PathLike[str], contours: Iterable[TissueContour], pen: Iterable[TissueContour] = (),
                  slide_id: str = "") -> Path:
    """Write :func:`contours_to_geojson` atomically to ``path``."""
    path = Path(path)
    write_text_atomic(path, json.dumps(contours_to_geojson(contours, pen, slide_id), separators=(",", ":")))
    return path


def _class_name(props: Any) -> str:
    if not isinstance(props, dict):
        return ""
    c = props.get("classification")
    if isinstance(c, dict):
        return str(c.get("name") or "")
    if isinstance(c, str):
        return c
    return str(props.get("class") or props.get("name") or "") if props.get("objectType") == "annotation" else ""


def _polygons(geom: Any) -> list[list[Any]]:
    if not isinstance(geom, dict):
        return []
    t = geom.get("type")
    if t == "Polygon":
        return [geom.get("coordinates") or []]
    if t == "MultiPolygon":
        return list(geom.get("coordinates") or [])
    if t == "GeometryCollection":
        return [p for g in geom.get("geometries") or [] for p in _polygons(g)]
    return []


def _positions(ring: Any) -> np.ndarray:
    """(K, 2) float64 x, y of a GeoJSON ring (a third coordinate, altitude, is allowed and dropped)."""
    a = np.asarray(ring, dtype=np.float64)
    return a[:, :2] if a.ndim == 2 and a.shape[1] >= 2 else a.reshape(-1, 2)


def geojson_to_contours(doc: Any) -> list[TissueContour]:
    """Tissue contours (level-0 pixels) from a parsed GeoJSON document; skips pen/background classes."""
    if isinstance(doc, list):
        features = doc
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features") or []
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, dict):
        features = [{"type": "Feature", "geometry": doc, "properties": {}}]
    else:
        raise ValueError("not a GeoJSON object")
    out: list[TissueContour] = []
    for feat in features:
        if not isinstance(feat, dict):
            continue
        name = _class_name(feat.get("properties")).lower()
        if name and any(name.startswith(s) for s in _SKIP_CLASSES):
            continue
        for poly in _polygons(feat.get("geometry")):
            if not poly:
                continue
            rings = [_positions(r) for r in poly if len(r) >= 3]
            if not rings:
                continue
            out.append(TissueContour(rings[0], rings[1:]))
    return out


def read_geojson_contours(path: str | os.PathLike[str]) -> list[TissueContour]:
    """Tissue contours from a GeoJSON file (QuPath export, TRIDENT ``contours_geojson``, or ours)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return geojson_to_contours(doc)
    except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
        raise MstarError(f"{path}: not a readable GeoJSON tissue file ({exc})") from None
