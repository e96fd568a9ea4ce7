"""The report's memory between builds (``report_assets/cache.json``): per slide, the signature of its inputs
(manifest row, and ``mtime``/size of its bag, coordinates file and QC picture), the facts read from them, and a
key per rendered asset (thumbnail, feature map, page). A rebuild reads and renders only what changed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mstar_extract.report.files import write_text
from mstar_extract.report.layout import file_name, run_path

CACHE_VERSION = 1
RENDER_VERSION = 1
"""Bump when the look of pages, thumbnails or maps changes: every slide is then rendered again."""


def load_cache(out: Path) -> dict[str, Any]:
    """The cache of ``out`` (empty when absent, unreadable or of another version)."""
    try:
        doc = json.loads(run_path(out, "cache").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"slides": {}, "variants": {}}
    if not isinstance(doc, dict) or doc.get("version") != CACHE_VERSION:
        return {"slides": {}, "variants": {}}
    doc.setdefault("slides", {})
    doc.setdefault("variants", {})
    return doc


def save_cache(out: Path, slides: dict[str, Any], variants: dict[str, Any]) -> None:
    used = {e["facts"].get("settings_id") for e in slides.values()}
    doc = {"version": CACHE_VERSION, "slides": slides, "variants": {k: v for k, v in variants.items() if k in used}}
    write_text(run_path(out, "cache"), json.dumps(doc, separators=(",", ":"), default=str))


class Listing:
    """``[mtime_ns, size]`` of every file in the folders of the run's per-slide files and of the report's assets,
    read with one ``scandir`` per folder (no stat of missing files: a 10,000-slide run costs a few folder reads)."""

    def __init__(self, out: Path, kinds: tuple[str, ...] = ("bag", "coords", "qc", "thumb", "map", "page")) -> None:
        self.out = out
        self.files: dict[str, dict[str, list[int]]] = {}
        for kind in kinds:
            folder = run_path(out, kind, "_").parent
            found: dict[str, list[int]] = {}
            try:
                with os.scandir(folder) as it:
                    for e in it:
                        if not e.name.startswith("."):
                            st = e.stat()
                            found[e.name] = [int(st.st_mtime_ns), int(st.st_size)]
            except OSError:
                pass
            self.files[kind] = found

    def signature(self, kind: str, slide_id: str) -> list[int] | None:
        return self.files[kind].get(file_name(kind, slide_id, self.out))

    def exists(self, kind: str, slide_id: str) -> bool:
        return self.signature(kind, slide_id) is not None


def input_signature(listing: Listing, row: Any) -> dict[str, Any]:
    """What a slide's facts depend on: its manifest row and the stat of its files."""
    fields = [row.path, row.status, row.n_patches, row.mpp, row.seconds, row.error, row.n_bad_patches, row.finished]
    return {"row": fields, **{k: listing.signature(k, row.slide_id) for k in ("bag", "coords", "qc")}}


def key_of(*parts: Any) -> str:
    """A short stable hash of JSON-able ``parts`` (with :data:`RENDER_VERSION`)."""
    text = json.dumps([RENDER_VERSION, *parts], separators=(",", ":"), default=str)  # dicts keep a fixed order
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
