"""The report's pictures of one slide: a small thumbnail of its QC picture (for the contact sheet) and its
feature map (one pixel per patch-grid cell, RGBA, transparent where there is no patch).

The feature map is overlaid in the browser on the QC picture (``image-rendering: pixelated``), so it is tiny
(a 100,000 x 80,000 px slide at 20x with 256 px patches is a 196 x 157 PNG) and stays sharp at any zoom.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

THUMB_WIDTH = 240
"""Contact-sheet thumbnails are this wide (JPEG, quality 80: a few kB each)."""


def qc_image_height(qc_w: int, qc_h: int, facts: dict[str, Any]) -> int:
    """Height of the slide picture inside a QC JPEG of ``qc_w`` x ``qc_h`` (the caption strip lies below it)."""
    w0, h0 = facts.get("w0"), facts.get("h0")
    if not (w0 and h0):
        return qc_h
    return max(1, min(qc_h, int(round(qc_w * h0 / w0))))


def write_thumb(qc: Path, dest: Path, facts: dict[str, Any]) -> dict[str, int]:
    """Write a :data:`THUMB_WIDTH` px JPEG of the slide picture of ``qc`` (caption cropped); returns the QC
    picture's size and the picture height within it (``qc_w``, ``qc_h``, ``qc_img_h``)."""
    import io

    from PIL import Image

    from mstar_extract.report.files import write_bytes

    with Image.open(qc) as im:
        qc_w, qc_h = im.size
        im.draft("RGB", (max(1, qc_w // 4), max(1, qc_h // 4)))  # JPEG DCT scaling: decode at 1/2..1/8 size
        f = im.size[0] / qc_w
        img_h = qc_image_height(qc_w, qc_h, facts)
        small = im.convert("RGB").crop((0, 0, im.size[0], max(1, int(round(img_h * f)))))
    tw = min(THUMB_WIDTH, small.size[0])
    th = max(1, int(round(small.size[1] * tw / small.size[0])))
    small = small.resize((tw, th), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=80)
    write_bytes(dest, buf.getvalue())
    return {"qc_w": qc_w, "qc_h": qc_h, "qc_img_h": img_h}


def grid_shape(facts: dict[str, Any]) -> tuple[int, int]:
    """(rows, cols) of the patch grid over the whole slide (cell = grid step, level-0 px)."""
    step = float(facts["step"])
    return max(1, int(np.ceil(facts["h0"] / step))), max(1, int(np.ceil(facts["w0"] / step)))


def paint_grid(coords: np.ndarray, colours: np.ndarray, facts: dict[str, Any]) -> np.ndarray:
    """(rows, cols, 4) uint8 RGBA: each patch's colour in the grid cell of its top-left corner, alpha 0 elsewhere."""
    rows, cols = grid_shape(facts)
    img = np.zeros((rows, cols, 4), np.uint8)
    if len(coords):
        step = float(facts["step"])
        c = np.clip(np.rint(coords[:, 0] / step).astype(np.int64), 0, cols - 1)
        r = np.clip(np.rint(coords[:, 1] / step).astype(np.int64), 0, rows - 1)
        img[r, c, :3] = colours
        img[r, c, 3] = 255
    return img


def write_feature_map(bag: Path, dest: Path, facts: dict[str, Any], basis: Any) -> np.ndarray:
    """Project the bag's features on ``basis``, paint them on the patch grid and write ``dest`` (PNG); returns
    the RGBA grid."""
    import io

    from PIL import Image

    from mstar_extract.report.files import write_bytes
    from mstar_extract.report.pca import bag_colours

    coords, colours = bag_colours(bag, basis)
    grid = paint_grid(coords, colours, facts)
    buf = io.BytesIO()
    Image.fromarray(grid, "RGBA").save(buf, "PNG", optimize=False)
    write_bytes(dest, buf.getvalue())
    return grid
