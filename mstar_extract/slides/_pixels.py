"""Small pixel helpers shared by the backends: RGBA → RGB on white, and whitening out-of-level areas."""

from __future__ import annotations

import numpy as np


def rgba_to_rgb_on_white(arr: np.ndarray) -> np.ndarray:
    """Composite an (h, w, 4) uint8 RGBA array (straight alpha) onto white; (h, w, 3) inputs pass through."""
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[2] == 3:
        return np.ascontiguousarray(arr)
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    rgb = arr[..., :3]
    alpha = arr[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)[..., None]
    out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def whiten_outside(arr: np.ndarray, rx0: int, ry0: int, level_w: int, level_h: int) -> np.ndarray:
    """Set pixels of a region read at level coords (rx0, ry0) that fall outside the level to white (in place)."""
    h, w = arr.shape[:2]
    left = min(w, max(0, -rx0))
    right = min(w, max(0, rx0 + w - level_w))
    top = min(h, max(0, -ry0))
    bottom = min(h, max(0, ry0 + h - level_h))
    if left:
        arr[:, :left] = 255
    if right:
        arr[:, w - right :] = 255
    if top:
        arr[:top] = 255
    if bottom:
        arr[h - bottom :] = 255
    return arr
