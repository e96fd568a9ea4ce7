"""The one resize used for every patch: the read footprint straight to the model input, as mSTAR does it.

The reference (the mSTAR authors' ``Feature_extract``, ``models/mSTAR.py``)::

    transforms.Compose([transforms.Resize(224), transforms.ToTensor(),
                        transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])

applied to the PIL image ``wsi.read_region(coord, patch_level, (patch_size, patch_size)).convert('RGB')``.
torchvision's ``Resize`` on a PIL image calls ``PIL.Image.resize(size, BILINEAR)``: a separable triangle
filter whose support grows with the reduction factor (antialiased), with 22-bit fixed-point weights and a
uint8 rounding between the horizontal and the vertical pass. :func:`resize_patch` calls exactly that PIL
function, in one step from the footprint (512 -> 224 for 20x patches of a 40x scan, 683 -> 224 for 15x ...),
so its output is bit-identical to the reference's uint8 image by construction.

Why not a faster resampler: ``torch.nn.functional.interpolate(uint8, mode="bilinear", antialias=True)`` uses
15-bit weights and differs from PIL by one grey level in some pixels for most sizes (256, 683, 300 -> 224;
measured, docs/reader.md); cv2's area filter is another filter altogether.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

_local = threading.local()


def _canvas(w: int, h: int) -> Any:
    """A reused PIL RGB image of (w, h) for this thread (saves allocating and clearing one per patch)."""
    from PIL import Image

    cache: dict[tuple[int, int], Any] | None = getattr(_local, "canvas", None)
    if cache is None:
        cache = _local.canvas = {}
    img = cache.get((w, h))
    if img is None:
        if len(cache) >= 4:
            cache.clear()
        img = cache[(w, h)] = Image.new("RGB", (w, h))
    return img


def resize_patch(img: np.ndarray, out_size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Resize an RGB uint8 patch ``img`` (h, w, 3) to (out_size, out_size, 3) uint8 with PIL's antialiased
    bilinear filter (``Image.resize((out_size, out_size), Image.BILINEAR)``, what ``torchvision Resize`` does
    to a PIL image). A patch already of that size is copied unchanged, as PIL does.

    ``out`` (C-contiguous (out_size, out_size, 3) uint8) receives the result when given.
    """
    h, w = img.shape[:2]
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (h, w, 3) patch, got {img.dtype} {img.shape}")
    if (h, w) == (out_size, out_size):
        if out is None:
            return np.array(img, dtype=np.uint8, copy=True)
        out[...] = img
        return out
    canvas = _canvas(w, h)
    canvas.frombytes(np.ascontiguousarray(img))
    return resize_image(canvas, out_size, out)


def resize_image(img: Any, out_size: int, out: np.ndarray | None = None) -> np.ndarray:
    """:func:`resize_patch` for a PIL RGB image (e.g. a tile source's canvas): no conversion before PIL."""
    from PIL import Image

    res = img if img.size == (out_size, out_size) else img.resize((out_size, out_size), Image.Resampling.BILINEAR)
    arr = np.asarray(res)
    if out is None:
        return np.array(arr, dtype=np.uint8, copy=True)
    out[...] = arr
    return out
