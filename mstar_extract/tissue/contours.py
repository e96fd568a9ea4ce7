"""Tissue contours with holes (OpenCV ``RETR_CCOMP``), area filters in µm², and rasterisation.

Contour vertices are kept in mask pixels here; :class:`TissueContour` stores level-0 coordinates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TissueContour:
    """One tissue piece: an outer polygon and its holes, (K, 2) float arrays in level-0 pixels."""

    outer: np.ndarray
    holes: list[np.ndarray] = field(default_factory=list)

    def scaled(self, fx: float, fy: float) -> TissueContour:
        """The same contour with x multiplied by ``fx`` and y by ``fy`` (e.g. level-0 -> mask pixels)."""
        f = np.array([fx, fy], dtype=np.float64)
        return TissueContour(self.outer * f, [h * f for h in self.holes])


def find_contours(
    mask: np.ndarray,
    mpp: float,
    min_area_um2: float,
    min_hole_um2: float,
    force_hole: np.ndarray | None = None,
) -> list[tuple[np.ndarray, list[np.ndarray]]]:
    """Outer contours (net area >= ``min_area_um2``) with their holes (area >= ``min_hole_um2``, or any hole
    that overlaps ``force_hole``), as int32 (K, 2) vertex arrays in mask pixels."""
    import cv2

    m = np.ascontiguousarray(mask.astype(np.uint8))
    found = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    contours, hierarchy = found[-2], found[-1]
    if hierarchy is None or len(contours) == 0:
        return []
    hier = hierarchy.reshape(-1, 4)
    px_area = mpp * mpp
    out: list[tuple[np.ndarray, list[np.ndarray]]] = []
    for i in np.flatnonzero(hier[:, 3] == -1):
        outer = contours[int(i)]
        holes_idx = np.flatnonzero(hier[:, 3] == i)
        hole_areas = [cv2.contourArea(contours[int(j)]) for j in holes_idx]
        net = cv2.contourArea(outer) + _boundary_area(outer) - float(np.sum(hole_areas))
        if net * px_area < min_area_um2:
            continue
        holes = []
        for j, a in zip(holes_idx, hole_areas, strict=True):
            hole = contours[int(j)]
            keep = a * px_area >= min_hole_um2
            if not keep and force_hole is not None:
                x, y, w, h = cv2.boundingRect(hole)
                inner = np.zeros((h, w), np.uint8)
                cv2.fillPoly(inner, [hole - np.array([x, y])], 1)
                keep = bool((force_hole[y : y + h, x : x + w] & inner.astype(bool)).any())
            if keep:
                holes.append(hole.reshape(-1, 2))
        out.append((outer.reshape(-1, 2), holes))
    return out


def _boundary_area(contour: np.ndarray) -> float:
    """Pixels on the boundary that ``contourArea`` (vertex-centred) leaves out: about half the perimeter + 1."""
    import cv2

    return 0.5 * cv2.arcLength(contour, True) + 1.0


def rasterize(
    contours: list[tuple[np.ndarray, list[np.ndarray]]], shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """(tissue, holes) boolean masks of ``shape`` from mask-pixel contours (holes carved out of tissue)."""
    import cv2

    outer = np.zeros(shape, np.uint8)
    holes = np.zeros(shape, np.uint8)
    for o, hs in contours:
        cv2.drawContours(outer, [o.reshape(-1, 1, 2).astype(np.int32)], -1, 1, thickness=cv2.FILLED)
        for h in hs:
            cv2.drawContours(holes, [h.reshape(-1, 1, 2).astype(np.int32)], -1, 1, thickness=cv2.FILLED)
    # hole interiors (not their boundary pixels, which belong to tissue)
    if holes.any():
        for _outer, hs in contours:
            for h in hs:
                cv2.drawContours(holes, [h.reshape(-1, 1, 2).astype(np.int32)], -1, 0, thickness=1)
    holes_b = holes.astype(bool) & outer.astype(bool)
    return outer.astype(bool) & ~holes_b, holes_b


def rasterize_level0(
    contours: list[TissueContour], shape: tuple[int, int], scale_x: float, scale_y: float
) -> tuple[np.ndarray, np.ndarray]:
    """(tissue, holes) masks of ``shape`` from level-0 contours; mask pixel (i, j) covers level-0
    [j*scale_x, (j+1)*scale_x) x [i*scale_y, (i+1)*scale_y)."""
    import cv2

    shift = 4
    f = np.array([1.0 / scale_x, 1.0 / scale_y]) * (1 << shift)
    off = 0.5 * (1 << shift)

    def pts(a: np.ndarray) -> np.ndarray:
        return np.round(a * f - off).astype(np.int32).reshape(-1, 1, 2)

    outer = np.zeros(shape, np.uint8)
    holes = np.zeros(shape, np.uint8)
    for c in contours:
        cv2.fillPoly(outer, [pts(c.outer)], 1, lineType=cv2.LINE_8, shift=shift)
        if c.holes:
            cv2.fillPoly(holes, [pts(h) for h in c.holes], 1, lineType=cv2.LINE_8, shift=shift)
    holes_b = holes.astype(bool) & outer.astype(bool)
    return outer.astype(bool) & ~holes_b, holes_b


def to_level0(contours: list[tuple[np.ndarray, list[np.ndarray]]], scale_x: float, scale_y: float) -> list[TissueContour]:
    """Mask-pixel contours -> level-0 :class:`TissueContour` (pixel centres: (i + 0.5) * scale)."""
    f = np.array([scale_x, scale_y], dtype=np.float64)

    def conv(a: np.ndarray) -> np.ndarray:
        return (a.astype(np.float64) + 0.5) * f

    return [TissueContour(conv(o), [conv(h) for h in hs]) for o, hs in contours]
