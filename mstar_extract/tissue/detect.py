"""Pixel-level detection on a low-resolution RGB image: tissue candidates, pen ink, dark artefacts.

All functions take the image's resolution (µm/px) so that kernel sizes and areas follow physical units.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mstar_extract.tissue.params import SegmentationParams


@dataclass
class PixelMasks:
    """Boolean masks of one image (same shape) and the thresholds that produced them."""

    candidate: np.ndarray
    """Stained (or faint) pixels before artefact removal and morphology."""
    pen: np.ndarray
    """Ink of any detected colour (not dilated)."""
    artefact: np.ndarray
    """Dark slide borders and dark debris (not dilated)."""
    remove: np.ndarray
    """pen | artefact, dilated by ``pen_dilate_um``: never tissue."""
    stats: dict


def odd_px(um: float, mpp: float, minimum: int = 1) -> int:
    """An odd kernel size in pixels for ``um`` micrometres at ``mpp`` (at least ``minimum``)."""
    px = max(minimum, int(round(um / mpp)))
    return px if px % 2 == 1 else px + 1


def disk(size: int) -> np.ndarray:
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def remove_small(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Drop 8-connected components smaller than ``min_px`` pixels."""
    import cv2

    if min_px <= 1 or not mask.any():
        return mask
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels]


def _hue_in(h: np.ndarray, lo: int, hi: int) -> np.ndarray:
    return (h >= lo) & (h <= hi)


def _dark_pixels(rgb: np.ndarray, s_blur: np.ndarray, v_blur: np.ndarray, k: int,
                 params: SegmentationParams) -> np.ndarray:
    """Dark, near-neutral pixels: black ink, slide borders, debris — never tissue.

    On the blurred channels (single dark nuclei at fine resolutions are not ink). Ink, borders and debris are
    near-neutral: a dark pixel with clear chroma (max - min of RGB) is dense stained tissue (a darkly stained
    island), not an artefact (saturation alone cannot tell: it grows as value falls, so ink laid over tissue is
    as "saturated" as the tissue under it)."""
    import cv2

    dark = (v_blur <= params.dark_max_value) & (s_blur <= params.dark_max_sat)
    if dark.any():
        chroma = (rgb.max(axis=2) - rgb.min(axis=2)).astype(np.uint8)
        dark &= cv2.medianBlur(np.ascontiguousarray(chroma), k) <= params.dark_max_chroma
    return dark


def _glass_background(s_blur: np.ndarray, v_blur: np.ndarray, dark: np.ndarray,
                      params: SegmentationParams) -> tuple[float, float]:
    """(value, saturation) of the glass background: the median of bright, unsaturated pixels."""
    glass = (s_blur < params.sat_min) & ~dark
    if glass.sum() >= max(64, 0.01 * glass.size):
        return float(np.median(v_blur[glass])), float(np.median(s_blur[glass]))
    return 240.0, 5.0  # (almost) no glass: a slide covered by tissue


def _tissue_candidates(s_blur: np.ndarray, v_blur: np.ndarray, dark: np.ndarray, bg_v: float, bg_s: float,
                       params: SegmentationParams) -> tuple[np.ndarray, dict]:
    """Stained pixels (saturation above Otsu's threshold on the non-dark pixels, clipped to [sat_min,
    sat_max]) or faint ones (a little saturated and darker than the glass); and the thresholds used."""
    import cv2

    valid = s_blur[~dark]
    otsu = float(cv2.threshold(valid.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0]) if valid.size else 255.0
    thr = float(min(max(otsu, params.sat_min), params.sat_max))
    strong = s_blur >= thr
    faint_sat = max(float(params.faint_sat_min), bg_s + 3.0)
    faint = (s_blur >= faint_sat) & (v_blur.astype(np.float32) <= bg_v - params.faint_darkening)
    return (strong | faint) & ~dark, {"otsu": otsu, "sat_threshold": thr, "faint_sat": faint_sat}


def _coloured_ink(h: np.ndarray, s: np.ndarray, v: np.ndarray, colors: tuple[str, ...], min_pen_px: float,
                  params: SegmentationParams) -> np.ndarray:
    """Blue, green and red pen ink by hue and saturation, opened and without specks."""
    import cv2

    h3 = cv2.medianBlur(np.ascontiguousarray(h), 3)
    s3 = cv2.medianBlur(np.ascontiguousarray(s), 3)
    ink = np.zeros(s.shape, bool)
    if "blue" in colors:
        ink |= _hue_in(h3, *params.hue_range("blue")) & (s3 >= params.pen_min_sat)
    if "green" in colors:
        ink |= _hue_in(h3, *params.hue_range("green")) & (s3 >= params.pen_min_sat)
    if "red" in colors:
        v3 = cv2.medianBlur(np.ascontiguousarray(v), 3)
        ink |= ((h3 <= 8) | (h3 >= 172)) & (s3 >= params.red_min_sat) & (v3 >= 80)
    ink = cv2.morphologyEx(ink.astype(np.uint8), cv2.MORPH_OPEN, disk(3)).astype(bool)
    return remove_small(ink, min_pen_px)


def _dark_regions(dark: np.ndarray, black_ink: bool, min_pen_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Split dark pixels into (black ink, artefacts): a region touching the image border is a slide border, a
    large one elsewhere black ink (when ``black_ink``), any other debris."""
    import cv2

    if not dark.any():
        return np.zeros(dark.shape, bool), np.zeros(dark.shape, bool)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(dark.astype(np.uint8), connectivity=8)
    x, y, w, hh = (stats[:, i] for i in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    H, W = dark.shape
    touches = (x == 0) | (y == 0) | (x + w >= W) | (y + hh >= H)
    ink = (~touches) & (stats[:, cv2.CC_STAT_AREA] >= min_pen_px) & black_ink
    ink[0] = False
    art = ~ink
    art[0] = False
    return ink[labels], art[labels]


def detect_pixels(rgb: np.ndarray, mpp: float, params: SegmentationParams) -> PixelMasks:
    """Tissue candidates (saturation with Otsu + floor/cap, plus faint tissue), pen ink and dark artefacts."""
    import cv2

    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    k = min(odd_px(params.median_um, mpp, 3), 255)
    s_blur = cv2.medianBlur(np.ascontiguousarray(s), k)
    v_blur = cv2.medianBlur(np.ascontiguousarray(v), k)

    dark = _dark_pixels(rgb, s_blur, v_blur, k, params)
    bg_v, bg_s = _glass_background(s_blur, v_blur, dark, params)
    candidate, thresholds = _tissue_candidates(s_blur, v_blur, dark, bg_v, bg_s, params)

    min_pen_px = params.pen_min_area_um2 / (mpp * mpp)
    colors = params.pen_color_set if params.pen else ()
    pen = _coloured_ink(h, s, v, colors, min_pen_px, params) if colors else np.zeros(s.shape, bool)
    black, artefact = _dark_regions(dark, "black" in colors, min_pen_px)
    pen |= black

    if "black" in colors:
        pen |= black_ink_crossing_tissue(rgb, mpp, params)

    grow = odd_px(2 * params.pen_dilate_um, mpp, 1)
    remove = pen | artefact
    if grow > 1 and remove.any():
        remove = cv2.dilate(remove.astype(np.uint8), disk(grow)).astype(bool)
    stats = {**thresholds, "background_value": bg_v, "background_sat": bg_s, "median_px": k}
    return PixelMasks(candidate, pen, artefact, remove, stats)


def black_ink_crossing_tissue(rgb: np.ndarray, mpp: float, params: SegmentationParams) -> np.ndarray:
    """Black ink strokes, followed from where they lie on glass into the tissue they cross.

    On glass, black ink is dark and neutral (chroma <= ``dark_max_chroma``). Over tissue it takes some of the
    stain's colour (thin strokes most, from JPEG's halved colour resolution), so the neutral rule misses it there,
    and a colour threshold alone cannot tell it from darkly stained tissue. What does tell: ink lets through about
    30 % of the light, so it is far darker than the tissue right beside it, while darkly stained tissue is about as
    dark as its own neighbourhood. Seeds: neutral dark regions (3x3 median, as the other inks) of at least
    ``pen_min_area_um2`` not touching the image border (slide borders). They grow into connected pixels that are
    dark (``dark_max_value``), of chroma <= ``black_ink_max_chroma`` and of value <= ``black_ink_max_ratio`` x the
    mean value of the clear tissue (neither dark nor glass) within ``black_ink_context_um``. A stroke that never
    touches glass is not followed (it is found only where it is neutral).
    """
    import cv2

    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    v3 = cv2.medianBlur(np.ascontiguousarray(hsv[..., 2]), 3)
    s3 = cv2.medianBlur(np.ascontiguousarray(hsv[..., 1]), 3)
    r, g, b = cv2.split(np.ascontiguousarray(rgb))
    c3 = cv2.medianBlur(cv2.subtract(cv2.max(cv2.max(r, g), b), cv2.min(cv2.min(r, g), b)), 3)  # chroma
    dark = v3 <= params.dark_max_value
    seeds = dark & (s3 <= params.dark_max_sat) & (c3 <= params.dark_max_chroma)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(seeds.astype(np.uint8), connectivity=8)
    x, y, w, h, area = (stats[:, i] for i in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH,
                                               cv2.CC_STAT_HEIGHT, cv2.CC_STAT_AREA))
    H, W = seeds.shape
    keep = (area >= params.pen_min_area_um2 / (mpp * mpp)) & (x > 0) & (y > 0) & (x + w < W) & (y + h < H)
    keep[0] = False
    seeds = keep[labels]
    if not seeds.any():
        return seeds
    clear = ~dark & (s3 >= params.sat_min)  # tissue that is neither dark nor glass
    k = odd_px(params.black_ink_context_um, mpp, 3)
    total = cv2.boxFilter(np.where(clear, v3, 0).astype(np.float32), -1, (k, k), normalize=False)
    count = cv2.boxFilter(clear.astype(np.float32), -1, (k, k), normalize=False)
    around = np.where(count > 0, total / np.maximum(count, 1.0), 0.0)  # no clear tissue near: never grown into
    inky = dark & (c3 <= params.black_ink_max_chroma) & (v3 <= params.black_ink_max_ratio * around)
    n, labels = cv2.connectedComponents((seeds | inky).astype(np.uint8), connectivity=8)
    reached = np.zeros(n, bool)
    reached[np.unique(labels[seeds])] = True
    reached[0] = False
    return reached[labels]
