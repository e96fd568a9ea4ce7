"""QC picture of one slide: thumbnail with tissue contours (green), holes (blue), pen ink (magenta, hatched),
dark artefacts such as slide borders (red, hatched), the kept patch grid (thin yellow squares) and a caption.

Written as ``qc/<slide_id>.jpg`` (atomic). The picture is read at most ``max_side`` pixels on its longer side
with bounded memory (strip-wise), so it costs little even for very large slides.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mstar_extract.store.atomic import atomic_path
from mstar_extract.tiling import ReadPlan
from mstar_extract.tissue.result import TissueMask

if TYPE_CHECKING:
    from mstar_extract.slides.base import Slide

TISSUE = (0, 200, 0)
HOLE = (0, 90, 255)
PEN = (230, 0, 230)
ARTEFACT = (230, 30, 30)
GRID = (255, 215, 0)


def _hatch(img: np.ndarray, region: np.ndarray, color: tuple[int, int, int], spacing: int = 7) -> None:
    """Diagonal stripes of ``color`` over ``region`` (bool, img-sized) plus its outline."""
    import cv2

    if not region.any():
        return
    ys, xs = np.nonzero(region)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    sub = region[y0:y1, x0:x1]
    yy, xx = np.ogrid[y0:y1, x0:x1]
    sel = sub & (((xx + yy) % spacing) < 2)
    view = img[y0:y1, x0:x1]
    view[sel] = (0.25 * view[sel] + 0.75 * np.asarray(color)).astype(np.uint8)
    cs = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[-2]
    cv2.drawContours(img, cs, -1, color, 1, lineType=cv2.LINE_AA)


def render_qc(
    thumb: np.ndarray,
    scale_x: float,
    scale_y: float,
    mask: TissueMask,
    plan: ReadPlan | None,
    caption: str = "",
) -> np.ndarray:
    """Draw the QC overlay on ``thumb`` (RGB uint8; ``scale_x/y`` = level-0 px per thumb px); returns RGB."""
    import cv2

    img = np.ascontiguousarray(thumb.copy())
    th, tw = img.shape[:2]
    line = max(1, int(round(max(th, tw) / 700)))

    def resized(m: np.ndarray) -> np.ndarray:
        if m.shape == (th, tw):
            return m.astype(bool)
        return cv2.resize(m.astype(np.uint8), (tw, th), interpolation=cv2.INTER_NEAREST).astype(bool)

    _hatch(img, resized(mask.artefact), ARTEFACT)
    _hatch(img, resized(mask.pen), PEN)
    f = np.array([1.0 / scale_x, 1.0 / scale_y])
    outers = [np.round(c.outer * f).astype(np.int32).reshape(-1, 1, 2) for c in mask.contours if len(c.outer)]
    holes = [np.round(h * f).astype(np.int32).reshape(-1, 1, 2) for c in mask.contours for h in c.holes if len(h)]
    if plan is not None and len(plan):
        ps = plan.patch_size_level0
        p0 = np.round(plan.coords / np.array([scale_x, scale_y])).astype(np.int32)
        p1 = np.maximum(np.round((plan.coords + ps) / np.array([scale_x, scale_y])).astype(np.int32) - 1, p0)
        squares = np.stack([p0, np.stack([p1[:, 0], p0[:, 1]], 1), p1, np.stack([p0[:, 0], p1[:, 1]], 1)], axis=1)
        cv2.polylines(img, list(squares.reshape(-1, 4, 1, 2)), True, GRID, 1, lineType=cv2.LINE_8)
    cv2.drawContours(img, outers, -1, TISSUE, line + 1, lineType=cv2.LINE_AA)
    cv2.drawContours(img, holes, -1, HOLE, line + 1, lineType=cv2.LINE_AA)
    return _with_caption(img, caption)


def _with_caption(img: np.ndarray, caption: str) -> np.ndarray:
    """Append a white strip with a colour legend and the (wrapped) caption under ``img`` (text drawn with
    Pillow's built-in font: OpenCV's first text call costs ~0.1 s of font loading)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    h, w = img.shape[:2]
    size = int(max(11, min(18, w / 55)))
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    legend = [("tissue", TISSUE), ("holes", HOLE), ("pen", PEN), ("border/debris", ARTEFACT), ("patches", GRID)]
    pad = max(4, size // 2)
    line_h = size + pad
    char_w = max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz0123456789 ") / 37)
    wrapped = textwrap.wrap(caption, max(20, int((w - 2 * pad) / char_w))) if caption else []
    strip_h = (len(wrapped) + 1) * line_h + 2 * pad
    canvas = Image.new("RGB", (w, h + strip_h), (255, 255, 255))
    canvas.paste(Image.fromarray(img), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x, y = pad, h + pad
    for name, color in legend:
        draw.rectangle([x, y + 2, x + size - 2, y + size], fill=color)
        x += size + 3
        draw.text((x, y), name, fill=(30, 30, 30), font=font)
        x += int(font.getlength(name)) + 3 * pad
    for text in wrapped:
        y += line_h
        draw.text((pad, y), text, fill=(20, 20, 20), font=font)
    return np.asarray(canvas)


def qc_caption(slide_id: str, mask: TissueMask, plan: ReadPlan | None, min_tissue: float | None = None) -> str:
    n_holes = sum(len(c.holes) for c in mask.contours)
    parts = [f"{slide_id}:", f"{len(plan) if plan is not None else 0} patches"]
    if plan is not None:
        mag = f"{plan.target_magnification:g}x" if plan.target_magnification else f"{plan.target_mpp:g} um/px"
        parts.append(f"({plan.patch_size} px at {mag}, level {plan.level} read {plan.read_size} px)")
    if min_tissue is not None:
        parts.append(f"min tissue {min_tissue:g};")
    parts.append(f"{len(mask.contours)} tissue pieces, {n_holes} holes, pen {100 * float(mask.pen.mean()):.1f}% of slide;")
    parts.append(f"mask: {mask.source}")
    return " ".join(parts)


def _picture_base(slide: Slide, mask: TissueMask, min_side: int, max_side: int) -> tuple[np.ndarray, float, float]:
    """The image segmentation ran on (read at ``max_side`` without one), resized so that its longer side lies in
    [``min_side``, ``max_side``]; returns it with its level-0 px per picture px (x, y)."""
    import cv2

    from mstar_extract.slides.downsample import read_max_side

    thumb = mask.thumbnail
    if thumb is not None:
        sx, sy = mask.scale_x, mask.scale_y
    else:
        ds = read_max_side(slide, max_side)
        thumb, sx, sy = ds.image, ds.scale_x, ds.scale_y
    h, w = thumb.shape[:2]
    side = max(h, w)
    factor = min_side / side if side < min_side else (max_side / side if side > max_side else 1.0)
    if factor != 1.0:
        nw, nh = max(1, round(w * factor)), max(1, round(h * factor))
        thumb = cv2.resize(thumb, (nw, nh), interpolation=cv2.INTER_LINEAR if factor > 1 else cv2.INTER_AREA)
        sx, sy = sx * w / nw, sy * h / nh
    return thumb, sx, sy


def _write_jpeg(path: str | os.PathLike[str], rgb: np.ndarray, quality: int, what: str) -> Path:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError(f"could not encode {what}")
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())
    return path


def write_qc(path: str | os.PathLike[str], slide: Slide, mask: TissueMask, plan: ReadPlan | None, slide_id: str,
             min_tissue: float | None = None, min_side: int = 900, max_side: int = 1600, quality: int = 88) -> Path:
    """Render and write the QC JPEG of ``slide`` atomically; returns the path.

    The picture reuses the image segmentation ran on (no second read of the slide), resized so that its longer
    side lies in [``min_side``, ``max_side``] (upscaled when the slide is small, so lines stay readable); without
    one (``--tissue-mask``), the slide is read at ``max_side``.
    """
    thumb, sx, sy = _picture_base(slide, mask, min_side, max_side)
    img = render_qc(thumb, sx, sy, mask, plan, qc_caption(slide_id, mask, plan, min_tissue))
    return _write_jpeg(path, img, quality, f"QC picture for {slide_id}")


def write_thumbnail(path: str | os.PathLike[str], slide: Slide, mask: TissueMask, max_side: int = 1000,
                    quality: int = 88) -> Path:
    """The plain thumbnail of ``slide`` (no drawing; longer side at most ``max_side``, as TRIDENT's
    ``thumbnails/<id>.jpg``), from the image segmentation ran on, atomically; returns the path."""
    thumb, _, _ = _picture_base(slide, mask, 1, max_side)
    return _write_jpeg(path, thumb, quality, "thumbnail")
