"""Where the report finds a run's outputs and where it writes its own files: the one path function of the report.

Every path the report reads or writes under ``OUT`` goes through :func:`run_path`, so that the day the layout
of an output folder moves, one function changes here.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

REPORT_NAME = "report.html"
ASSETS_DIR = "report_assets"

_SLIDE_FILES = {"bag": ("features", ".h5"), "coords": ("coords", ".h5"), "qc": ("qc", ".jpg")}
_ASSET_FILES = {"thumb": ("thumbs", ".jpg"), "map": ("maps", ".png"), "page": ("slides", ".html")}


def asset_name(slide_id: str) -> str:
    """A file-name- and URL-safe name for a slide's report assets: ASCII letters, digits, ``._-`` of the id
    (at most 60) plus 10 hex digits of its SHA-1, so distinct ids never collide and no id needs URL escaping."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", slide_id)[:60].lstrip(".") or "slide"
    return f"{safe}-{hashlib.sha1(slide_id.encode('utf-8')).hexdigest()[:10]}"


def run_path(out_dir: str | os.PathLike[str], kind: str, slide_id: str | None = None) -> Path:
    """The path of one file of the run in ``out_dir``.

    ``kind``: ``manifest`` (``OUT/manifest.csv``), ``report`` (``OUT/report.html``), ``assets``
    (``OUT/report_assets``), ``cache`` / ``pca`` / ``lock`` (the report's bookkeeping in the assets folder),
    ``css`` / ``js`` (the page's style and script); per slide (``slide_id`` given): ``bag``
    (``features/<id>.h5``), ``coords`` (``coords/<id>.h5``), ``qc`` (``qc/<id>.jpg``), and the report's own
    ``thumb`` / ``map`` / ``page`` (``report_assets/{thumbs,maps,slides}/<asset name>``).
    """
    out = Path(out_dir)
    assets = out / ASSETS_DIR
    fixed = {"manifest": out / "manifest.csv", "report": out / REPORT_NAME, "assets": assets,
             "cache": assets / "cache.json", "pca": assets / "pca.npz", "lock": assets / ".lock",
             "css": assets / "report.css", "js": assets / "report.js"}
    if kind in fixed:
        return fixed[kind]
    if slide_id is None:
        raise ValueError(f"path kind {kind!r} needs a slide id")
    if kind in _SLIDE_FILES:
        folder, ext = _SLIDE_FILES[kind]
        return out / folder / f"{slide_id}{ext}"
    if kind in _ASSET_FILES:
        folder, ext = _ASSET_FILES[kind]
        return assets / folder / f"{asset_name(slide_id)}{ext}"
    raise ValueError(f"unknown path kind {kind!r}")


def relative_url(target: Path, start_dir: Path) -> str:
    """``target`` as a relative URL from the folder ``start_dir`` (forward slashes; each part percent-escaped)."""
    from urllib.parse import quote

    rel = os.path.relpath(target, start_dir)
    return "/".join(quote(part) for part in Path(rel).parts)
