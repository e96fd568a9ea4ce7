"""Where the report finds a run's outputs and where it writes its own files: the one path function of the report.

Every path the report reads or writes under ``OUT`` goes through :func:`run_path`, which asks the owner of the
output folder's layout (:mod:`mstar_extract.store.layout`) for the run's files and the report's own folder, and
names the report's assets inside that folder. OUT's layout (``mstar``, ``clam`` or ``trident``) is the one its
settings record names (:func:`mstar_extract.store.record.recorded_layout`), so the report needs no ``--layout``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from pathlib import Path

from mstar_extract.store.layout import REPORT_ASSETS_DIR as ASSETS_DIR, REPORT_NAME, OutLayout

_RUN_FILES = ("manifest", "report", "assets")
_ASSET_FIXED = {"cache": "cache.json", "pca": "pca.npz", "lock": ".lock", "css": "report.css", "js": "report.js"}
_SLIDE_FILES = ("bag", "coords", "qc")
_ASSET_FILES = {"thumb": ("thumbs", ".jpg"), "map": ("maps", ".png"), "page": ("slides", ".html")}

__all__ = ["ASSETS_DIR", "REPORT_NAME", "PageLinks", "asset_name", "file_name", "run_path"]


def _layout(out: Path) -> OutLayout:
    """OUT's recorded layout (read again when the settings record changes)."""
    try:
        stamp = os.stat(OutLayout(out).settings_record).st_mtime_ns
    except OSError:
        stamp = None
    return _recorded_layout(out, stamp)


@functools.lru_cache(maxsize=64)
def _recorded_layout(out: Path, stamp: int | None) -> OutLayout:
    from mstar_extract.store.record import recorded_layout

    return recorded_layout(out)


@functools.lru_cache(maxsize=65536)
def asset_name(slide_id: str) -> str:
    """A file-name- and URL-safe name for a slide's report assets: ASCII letters, digits, ``._-`` of the id
    (at most 60) plus 10 hex digits of its SHA-1, so distinct ids never collide and no id needs URL escaping."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", slide_id)[:60].lstrip(".") or "slide"
    return f"{safe}-{hashlib.sha1(slide_id.encode('utf-8')).hexdigest()[:10]}"


def run_path(out_dir: str | os.PathLike[str], kind: str, slide_id: str | None = None) -> Path:
    """The path of one file of the run in ``out_dir``.

    ``kind``: ``manifest`` (``OUT/manifest.csv``), ``report`` (``OUT/report.html``), ``assets``
    (``OUT/report_assets``), ``cache`` / ``pca`` / ``lock`` (the report's bookkeeping in the assets folder),
    ``css`` / ``js`` (the page's style and script); per slide (``slide_id`` given): ``bag``, ``coords`` and ``qc``
    where OUT's layout puts them (``mstar``: ``features/<id>.h5``, ``coords/<id>.h5``, ``qc/<id>.jpg``), and the
    report's own ``thumb`` / ``map`` / ``page`` (``report_assets/{thumbs,maps,slides}/<asset name>``).
    """
    layout = _layout(out_dir if isinstance(out_dir, Path) else Path(out_dir))
    if kind == "manifest":
        return layout.manifest
    if kind == "report":
        return layout.report
    if kind == "assets":
        return layout.report_assets
    if kind in _ASSET_FIXED:
        return layout.report_assets / _ASSET_FIXED[kind]
    if kind in _SLIDE_FILES:
        if slide_id is None:
            raise ValueError(f"path kind {kind!r} needs a slide id")
        return {"bag": layout.bag, "coords": layout.coords, "qc": layout.qc}[kind](slide_id)
    return layout.report_assets / _ASSET_FILES[kind][0] / file_name(kind, slide_id)


def file_name(kind: str, slide_id: str | None, out_dir: str | os.PathLike[str] = ".") -> str:
    """The name (without folder) of a per-slide file of :func:`run_path` (a run's file: in ``out_dir``'s layout)."""
    if kind not in _ASSET_FILES and kind not in _SLIDE_FILES:
        raise ValueError(f"unknown path kind {kind!r}")
    if slide_id is None:
        raise ValueError(f"path kind {kind!r} needs a slide id")
    if kind in _SLIDE_FILES:
        return run_path(out_dir, kind, slide_id).name
    return f"{asset_name(slide_id)}{_ASSET_FILES[kind][1]}"


class PageLinks:
    """Relative URLs from a slide page (``report_assets/slides/``) to files of the run: each path component
    percent-escaped, so any slide id is a valid link. Built once per report (a page needs four links)."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out = Path(out_dir)
        here = run_path(self.out, "page", "_").parent
        self._up = "/".join(".." for _ in here.relative_to(self.out).parts)
        self._folders: dict[str, str] = {}

    def _rel(self, path: Path) -> str:
        from urllib.parse import quote

        return "/".join(quote(part) for part in path.relative_to(self.out).parts)

    def url(self, kind: str, slide_id: str | None = None) -> str:
        from urllib.parse import quote

        if slide_id is None:
            if kind not in self._folders:
                self._folders[kind] = self._rel(run_path(self.out, kind))
            return f"{self._up}/{self._folders[kind]}"
        if kind + "/" not in self._folders:
            self._folders[kind + "/"] = self._rel(run_path(self.out, kind, "_").parent)
        return f"{self._up}/{self._folders[kind + '/']}/{quote(file_name(kind, slide_id, self.out))}"
