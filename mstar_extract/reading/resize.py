"""The one resize used for every patch: read footprint -> model input size, antialiased (area filter).

Rule (documented in docs/reader.md): when the footprint is an exact integer multiple ``f >= 2`` of a size that
is still >= the output size, first reduce by ``f`` with an exact box average (cv2.INTER_AREA with an integer
ratio: fast), then area-resize to the output size. For a 40x scan read for 20x 256-px patches that is
512 -> 256 (the 20x patch, as in the mSTAR reference) -> 224. Every reader path, and the naive baseline, use
this function, so they differ only in how the pixels were decoded.
"""

from __future__ import annotations

import numpy as np


def resize_patch(img: np.ndarray, out_size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Resize a square-ish RGB uint8 patch ``img`` (h, w, 3) to (out_size, out_size, 3) uint8.

    ``out`` (C-contiguous (out_size, out_size, 3) uint8) receives the result when given.
    """
    import cv2

    h, w = img.shape[:2]
    f = min(h, w) // out_size
    if f >= 2 and h % f == 0 and w % f == 0:
        img = cv2.resize(img, (w // f, h // f), interpolation=cv2.INTER_AREA)
        h, w = img.shape[:2]
    if (h, w) == (out_size, out_size):
        if out is None:
            return np.ascontiguousarray(img)
        out[...] = img
        return out
    if out is None:
        return cv2.resize(img, (out_size, out_size), interpolation=cv2.INTER_AREA)
    res = cv2.resize(img, (out_size, out_size), dst=out, interpolation=cv2.INTER_AREA)
    if res is not out:  # cv2 allocated a new array (out not acceptable as dst): copy
        out[...] = res
    return out
