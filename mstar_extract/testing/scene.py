"""Synthetic H&E slide scenes defined in physical units (µm), rendered at any resolution.

A :class:`Scene` is pure geometry: tissue islands (irregular blobs), holes inside them (lumina / fat), faint
(pale, low-saturation) tissue edges and islands, pen strokes (blue, green, black), dust specks and an optional
dark slide-border strip, all placed in micrometres. :func:`render_region` paints any window of the scene at any
µm/px, so the same scene written at 0.25 µm/px (40x) and 0.5 µm/px (20x) shows the same tissue at the same
physical places. Tissue pixels are textured from a real H&E crop (``data/he_texture.jpg``, see its README);
the texture is anchored to the physical origin and scaled with the resolution.

:func:`render_truth` rasterises the same geometry as boolean ground-truth masks (see ``fixtures`` for the
saved format).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TEXTURE_PATH = Path(__file__).parent / "data" / "he_texture.jpg"
TEXTURE_MPP = 0.25
"""µm/px of ``he_texture.jpg`` (a 40x crop)."""
GLASS_RGB = (235, 232, 236)
HOLE_RGB = (245, 244, 246)
BORDER_RGB = (46, 43, 50)
DUST_RGB = (70, 64, 72)
PEN_RGB = {"blue": (40, 70, 175), "green": (40, 140, 75), "black": (35, 35, 40)}
_SHIFT = 4  # sub-pixel bits for cv2 polygon drawing
_N_VERTICES = 256


@dataclass(frozen=True)
class Blob:
    """A closed irregular shape: radius(θ) = radius · (1 + Σ amp·cos(k·θ + phase)), centre in µm."""

    cx: float
    cy: float
    radius: float
    harmonics: tuple[tuple[int, float, float], ...] = ()
    faint_band: float = 0.0
    """Width (µm) of a pale rim inside the outline; 0 = none."""
    pale: bool = False
    """The whole island is faint (pale, low saturation) — still tissue."""
    tint: float = 1.0
    """Stain intensity factor (< 1 darker)."""

    def polygon(self, inset: float = 0.0) -> np.ndarray:
        """(n, 2) float64 outline vertices in µm, shrunk radially by ``inset`` µm."""
        theta = np.linspace(0.0, 2 * math.pi, _N_VERTICES, endpoint=False)
        factor = np.ones_like(theta)
        for k, amp, phase in self.harmonics:
            factor += amp * np.cos(k * theta + phase)
        r = np.maximum(self.radius * factor - inset, 0.0)
        return np.stack([self.cx + r * np.cos(theta), self.cy + r * np.sin(theta)], axis=1)


@dataclass(frozen=True)
class Stroke:
    """A pen stroke: a polyline in µm drawn ``width`` µm wide in one of :data:`PEN_RGB`'s colours."""

    points: tuple[tuple[float, float], ...]
    width: float
    color: str
    alpha: float = 0.85


@dataclass(frozen=True)
class Scene:
    """Everything on one glass slide, in µm. Build with :func:`random_scene` or by hand."""

    width_um: float
    height_um: float
    blobs: tuple[Blob, ...] = ()
    holes: tuple[Blob, ...] = ()
    strokes: tuple[Stroke, ...] = ()
    specks: tuple[tuple[float, float, float], ...] = ()
    """Dust: (x, y, radius) in µm."""
    border_um: float = 0.0
    """Width of a dark slide-border strip along the left edge; 0 = none."""
    seed: int = 0
    meta: dict = field(default_factory=dict, compare=False)

    def size_at(self, mpp: float) -> tuple[int, int]:
        """(width, height) in pixels at ``mpp`` µm/px."""
        return max(1, round(self.width_um / mpp)), max(1, round(self.height_um / mpp))


def _wobble(rng: np.random.Generator, strength: float) -> tuple[tuple[int, float, float], ...]:
    return tuple((k, float(rng.uniform(0.3, 1.0) * strength / k), float(rng.uniform(0, 2 * math.pi))) for k in (2, 3, 5, 7))


def _islands(rng: np.random.Generator, W: float, H: float, n_blobs: int, faint: bool,
             holes: bool) -> tuple[list[Blob], list[Blob]]:
    """Tissue islands on a grid in the upper 80 % (the last one pale, every other one with a pale rim), and
    1-3 holes inside each non-pale island."""
    blobs: list[Blob] = []
    hole_list: list[Blob] = []
    cols = max(1, round(math.sqrt(n_blobs * W / H)))
    rows = max(1, math.ceil(n_blobs / cols))
    x_lo, x_hi, y_lo, y_hi = 0.1 * W, 0.9 * W, 0.1 * H, 0.74 * H
    cell_w, cell_h = (x_hi - x_lo) / cols, (y_hi - y_lo) / rows
    for i in range(n_blobs):
        r_, c_ = divmod(i, cols)
        radius = 0.42 * min(cell_w, cell_h) * float(rng.uniform(0.75, 1.0))
        cx = x_lo + (c_ + 0.5) * cell_w + float(rng.uniform(-0.1, 0.1)) * cell_w
        cy = y_lo + (r_ + 0.5) * cell_h + float(rng.uniform(-0.1, 0.1)) * cell_h
        pale = faint and i == n_blobs - 1 and n_blobs > 1
        band = 0.12 * radius if faint and not pale and i % 2 == 0 else 0.0
        blob = Blob(cx, cy, radius, _wobble(rng, 0.22), band, pale, float(rng.uniform(0.85, 1.03)))
        blobs.append(blob)
        if holes and not pale:
            for _ in range(int(rng.integers(1, 4))):
                ang, dist = float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0.0, 0.38)) * radius
                hole_list.append(
                    Blob(cx + dist * math.cos(ang), cy + dist * math.sin(ang),
                         float(rng.uniform(0.07, 0.16)) * radius, _wobble(rng, 0.15))
                )
    return blobs, hole_list


def _pen_strokes(rng: np.random.Generator, W: float, H: float, blobs: list[Blob]) -> list[Stroke]:
    """A green line on bare glass near the bottom, a blue circle around the first island, a black stroke
    crossing the second island's edge (without islands: one blue stroke)."""
    pen_w = max(0.012 * min(W, H), 8.0)
    strokes: list[Stroke] = []
    xs = np.linspace(0.12 * W, 0.88 * W, 40)
    ys = 0.88 * H + 0.025 * H * np.sin(xs / W * 5 * math.pi + float(rng.uniform(0, 6)))
    strokes.append(Stroke(tuple(zip(xs.tolist(), ys.tolist(), strict=True)), pen_w, "green"))
    if blobs:
        b = blobs[0]
        t = np.linspace(0.3, 0.3 + 1.6 * math.pi, 60)
        rr = 1.18 * b.radius * (1 + 0.05 * np.sin(3 * t))
        ring = zip((b.cx + rr * np.cos(t)).tolist(), (b.cy + rr * np.sin(t)).tolist(), strict=True)
        strokes.append(Stroke(tuple(ring), pen_w, "blue"))
        b = blobs[min(1, len(blobs) - 1)]
        strokes.append(Stroke(((b.cx + 0.1 * b.radius, b.cy + 0.2 * b.radius), (b.cx + 0.45 * b.radius, b.cy + 1.5 * b.radius)),
                              pen_w, "black"))
    else:
        strokes.append(Stroke(((0.3 * W, 0.3 * H), (0.55 * W, 0.45 * H), (0.7 * W, 0.35 * H)), pen_w, "blue"))
    return strokes


def random_scene(
    width_um: float,
    height_um: float,
    seed: int = 0,
    *,
    n_blobs: int = 4,
    tissue: bool = True,
    holes: bool = True,
    faint: bool = True,
    pen: bool = True,
    dust: bool = True,
    border: bool = False,
) -> Scene:
    """A plausible slide: tissue islands in the upper 80 %, a pen line on bare glass near the bottom, a blue
    circle annotation around the first island (mostly over glass), a black stroke crossing a tissue edge,
    a pale island and pale rims, holes inside islands, dust specks and (optionally) a dark left border."""
    rng = np.random.default_rng(seed)
    W, H = float(width_um), float(height_um)
    blobs, hole_list = _islands(rng, W, H, n_blobs, faint, holes) if tissue else ([], [])
    strokes = _pen_strokes(rng, W, H, blobs) if pen else []
    specks: tuple[tuple[float, float, float], ...] = ()
    if dust:
        n = 14
        specks = tuple(
            (float(rng.uniform(0.05, 0.95) * W), float(rng.uniform(0.05, 0.95) * H), float(rng.uniform(1.5, 4.0)))
            for _ in range(n)
        )
    return Scene(W, H, tuple(blobs), tuple(hole_list), tuple(strokes), specks, 0.03 * W if border else 0.0, seed)


# ------------------------------------------------------------------------------------------- rendering
@functools.lru_cache(maxsize=1)
def _base_texture() -> np.ndarray:
    """The H&E crop mirrored 2x2 into a seamless RGB tile at :data:`TEXTURE_MPP`."""
    import cv2

    bgr = cv2.imread(str(TEXTURE_PATH), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(TEXTURE_PATH)
    rgb = bgr[:, :, ::-1]
    top = np.concatenate([rgb, rgb[:, ::-1]], axis=1)
    return np.ascontiguousarray(np.concatenate([top, top[::-1]], axis=0))


@functools.lru_cache(maxsize=16)
def _texture(mpp: float) -> np.ndarray:
    """The seamless texture resampled to ``mpp`` µm/px."""
    import cv2

    base = _base_texture()
    size = max(4, round(base.shape[0] * TEXTURE_MPP / mpp))
    if size == base.shape[0]:
        return base
    interp = cv2.INTER_AREA if size < base.shape[0] else cv2.INTER_LINEAR
    return cv2.resize(base, (size, size), interpolation=interp)


@functools.lru_cache(maxsize=4)
def _noise(seed: int) -> np.ndarray:
    """A 509x509x3 int16 noise tile (σ≈2) used for glass grain."""
    return np.random.default_rng(seed).normal(0, 2.0, (509, 509, 3)).round().astype(np.int16)


def _periodic(tile: np.ndarray, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """The window (x0, y0, w, h) of an infinite repetition of ``tile`` (memory ~ window + one tile)."""
    th, tw = tile.shape[:2]
    oy, ox = y0 % th, x0 % tw
    extra = (1,) * (tile.ndim - 2)
    band = np.tile(tile, (-(-(oy + h) // th), 1) + extra)[oy : oy + h] if oy + h > th else tile[oy : oy + h]
    return np.tile(band, (1, -(-(ox + w) // tw)) + extra)[:, ox : ox + w]


def _poly_px(poly_um: np.ndarray, mpp: float, x0: int, y0: int) -> np.ndarray:
    pts = (poly_um / mpp - np.array([x0, y0], dtype=np.float64)) * (1 << _SHIFT)
    return np.round(pts).astype(np.int32).reshape(-1, 1, 2)


def _fill(mask: np.ndarray, poly_um: np.ndarray, mpp: float, x0: int, y0: int, value: int = 1) -> None:
    import cv2

    cv2.fillPoly(mask, [_poly_px(poly_um, mpp, x0, y0)], value, lineType=cv2.LINE_8, shift=_SHIFT)


def _geometry(scene: Scene, mpp: float, x0: int, y0: int, w: int, h: int) -> dict[str, np.ndarray]:
    """uint8 label/mask images of the window: blob index+1, faint, holes, pen colour index+1, dust, border."""
    import cv2

    labels = np.zeros((h, w), np.uint8)
    faint = np.zeros((h, w), np.uint8)
    for i, blob in enumerate(scene.blobs):
        _fill(labels, blob.polygon(), mpp, x0, y0, i + 1)
    for blob in scene.blobs:
        if blob.pale:
            _fill(faint, blob.polygon(), mpp, x0, y0)
        elif blob.faint_band > 0:
            ring = np.zeros((h, w), np.uint8)
            _fill(ring, blob.polygon(), mpp, x0, y0)
            _fill(ring, blob.polygon(blob.faint_band), mpp, x0, y0, 0)
            faint |= ring
    holes = np.zeros((h, w), np.uint8)
    for hole in scene.holes:
        _fill(holes, hole.polygon(), mpp, x0, y0)
    holes &= labels > 0
    pen = np.zeros((h, w), np.uint8)
    colors = list(PEN_RGB)
    for stroke in scene.strokes:
        pts = _poly_px(np.asarray(stroke.points, dtype=np.float64), mpp, x0, y0)
        thickness = max(1, round(stroke.width / mpp))
        cv2.polylines(pen, [pts], False, colors.index(stroke.color) + 1, thickness, cv2.LINE_8, _SHIFT)
    dust = np.zeros((h, w), np.uint8)
    for sx, sy, sr in scene.specks:
        c = (round((sx / mpp - x0) * (1 << _SHIFT)), round((sy / mpp - y0) * (1 << _SHIFT)))
        cv2.circle(dust, c, max(1, round(sr / mpp * (1 << _SHIFT))), 1, -1, cv2.LINE_8, _SHIFT)
    border = np.zeros((h, w), np.uint8)
    if scene.border_um > 0:
        bx = round(scene.border_um / mpp) - x0
        if bx > 0:
            border[:, : min(bx, w)] = 1
    return {"labels": labels, "faint": faint & (labels > 0), "holes": holes, "pen": pen, "dust": dust, "border": border}


def _bbox(poly_um: np.ndarray, mpp: float, x0: int, y0: int, w: int, h: int, pad: float = 0.0) -> tuple[slice, slice] | None:
    """Window slices (rows, cols) covering a polygon (plus ``pad`` µm), or None if it misses the window."""
    lo = np.floor((poly_um.min(axis=0) - pad) / mpp).astype(int) - np.array([x0, y0]) - 1
    hi = np.ceil((poly_um.max(axis=0) + pad) / mpp).astype(int) - np.array([x0, y0]) + 2
    xa, ya = max(0, lo[0]), max(0, lo[1])
    xb, yb = min(w, hi[0]), min(h, hi[1])
    if xa >= xb or ya >= yb:
        return None
    return slice(ya, yb), slice(xa, xb)


@functools.lru_cache(maxsize=4)
def _glass(seed: int) -> np.ndarray:
    return np.clip(np.asarray(GLASS_RGB, np.int16) + _noise(seed), 0, 255).astype(np.uint8)


def render_region(scene: Scene, mpp: float, x0: int = 0, y0: int = 0, w: int | None = None, h: int | None = None) -> np.ndarray:
    """Paint the window (x0, y0, w, h) — pixels at ``mpp`` µm/px — of ``scene`` as uint8 RGB (h, w, 3)."""
    import cv2

    full_w, full_h = scene.size_at(mpp)
    w = full_w - x0 if w is None else w
    h = full_h - y0 if h is None else h
    g = _geometry(scene, mpp, x0, y0, w, h)
    img = np.ascontiguousarray(_periodic(_glass(scene.seed), x0, y0, w, h))
    if scene.border_um > 0:
        bx = min(w, round(scene.border_um / mpp) - x0)
        if bx > 0:
            img[:, :bx] = np.clip(np.asarray(BORDER_RGB, np.int16) + 2 * _periodic(_noise(scene.seed), x0, y0, bx, h), 0, 255)
    labels, faint = g["labels"], g["faint"]
    glass_f = np.asarray(GLASS_RGB, np.float32)
    for i, blob in enumerate(scene.blobs):
        box = _bbox(blob.polygon(), mpp, x0, y0, w, h)
        if box is None:
            continue
        sel = labels[box] == i + 1
        if not sel.any():
            continue
        bh, bw = sel.shape
        tex = np.ascontiguousarray(_periodic(_texture(mpp), x0 + box[1].start, y0 + box[0].start, bw, bh))
        if blob.tint != 1.0:
            tex = cv2.convertScaleAbs(tex, alpha=blob.tint)
        fsel = (faint[box] > 0) & sel
        if fsel.any():
            pale = tex.astype(np.float32)
            gray = pale.mean(axis=2, keepdims=True)
            pale = glass_f * 0.62 + (0.55 * gray + 0.45 * pale) * 0.38
            np.copyto(tex, np.clip(pale, 0, 255).astype(np.uint8), where=fsel[..., None])
        np.copyto(img[box], tex, where=sel[..., None])
    for hole in scene.holes:
        box = _bbox(hole.polygon(), mpp, x0, y0, w, h)
        if box is None:
            continue
        sel = g["holes"][box] > 0
        bh, bw = sel.shape
        noise = _periodic(_noise(scene.seed), x0 + box[1].start, y0 + box[0].start, bw, bh)
        np.copyto(img[box], np.clip(np.asarray(HOLE_RGB, np.int16) + noise, 0, 255).astype(np.uint8), where=sel[..., None])
    dust = g["dust"]
    for sx, sy, sr in scene.specks:
        box = _bbox(np.array([[sx, sy]]), mpp, x0, y0, w, h, pad=sr)
        if box is not None:
            img[box][dust[box] > 0] = DUST_RGB
    pen = g["pen"]
    for stroke in scene.strokes:
        box = _bbox(np.asarray(stroke.points, np.float64), mpp, x0, y0, w, h, pad=stroke.width)
        if box is None:
            continue
        for idx, name in enumerate(PEN_RGB, start=1):
            sel = pen[box] == idx
            if sel.any():
                base = img[box][sel].astype(np.float32)
                ink = np.asarray(PEN_RGB[name], np.float32)
                sub = img[box]
                sub[sel] = np.clip(base * 0.15 + (base / 255.0 * ink) * 0.85, 0, 255).astype(np.uint8)
    return img


def render_truth(scene: Scene, mpp: float) -> dict[str, np.ndarray]:
    """Boolean ground-truth masks of the whole scene at ``mpp`` µm/px.

    ``tissue`` (stained tissue, faint included, holes excluded, pixels under ink included), ``faint``,
    ``holes`` (lumina/fat inside tissue), ``pen`` (any ink), ``pen_on_glass`` (ink not over tissue or holes),
    ``dust`` and ``border`` (dark slide-border strip).
    """
    w, h = scene.size_at(mpp)
    g = _geometry(scene, mpp, 0, 0, w, h)
    holes = g["holes"] > 0
    tissue = (g["labels"] > 0) & ~holes
    pen = g["pen"] > 0
    return {
        "tissue": tissue,
        "faint": (g["faint"] > 0) & tissue,
        "holes": holes,
        "pen": pen,
        "pen_on_glass": pen & ~tissue & ~holes,
        "dust": (g["dust"] > 0) & ~tissue,
        "border": g["border"] > 0,
    }
