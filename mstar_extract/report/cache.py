"""The report's memory between builds (``report_assets/cache.json``): per slide, the signature of its inputs
(manifest row, and ``mtime``/size of its bag, coordinates file and QC picture), the facts read from them, and a
key per rendered asset (thumbnail, feature map, page). A rebuild reads and renders only what changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from mstar_extract.report.facts import file_signature
from mstar_extract.report.files import write_text
from mstar_extract.report.layout import run_path

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


def input_signature(out: Path, row: Any) -> dict[str, Any]:
    """What a slide's facts depend on: its manifest row and the stat of its files."""
    return {"row": row.to_csv_dict(), **{k: file_signature(run_path(out, k, row.slide_id))
                                        for k in ("bag", "coords", "qc")}}


def key_of(*parts: Any) -> str:
    """A short stable hash of JSON-able ``parts`` (with :data:`RENDER_VERSION`)."""
    text = json.dumps([RENDER_VERSION, *parts], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]
