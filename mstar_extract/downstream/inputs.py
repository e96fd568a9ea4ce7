"""The BAGS arguments of ``mstar embed-slides`` and ``mstar zeroshot`` as a sorted list of feature bags.

A spec may be a bag file (``.h5``), a folder, or a glob pattern. A folder gives the ``*.h5`` files directly in
it, or — when it holds none but has a ``features/`` subfolder (an ``mstar extract`` OUT) — those of
``features/``; hidden files (this tool's temp files) are skipped. The slide id is the file name without
``.h5``, checked like every slide id (:func:`mstar_extract.store.layout.validate_slide_id`). A bag file that does
not exist becomes an entry with ``error`` set (that slide fails, the others go on); a folder or pattern without
bags, or two different files with one slide id, is a :class:`~mstar_extract.errors.UsageError` before any work.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from mstar_extract.errors import UsageError
from mstar_extract.inputs import SlideEntry
from mstar_extract.store.layout import validate_slide_id

BAG_SUFFIX = ".h5"


def _bags_in(folder: Path) -> list[Path]:
    found = sorted(p for p in folder.glob(f"*{BAG_SUFFIX}") if p.is_file() and not p.name.startswith("."))
    if not found and (folder / "features").is_dir():
        return _bags_in(folder / "features")
    return found


def _expand(spec: str) -> list[tuple[Path, str | None]]:
    """(path, error) pairs of one spec."""
    if any(c in spec for c in "*?["):
        hits = [Path(h) for h in sorted(glob.glob(spec, recursive=True))]
        found = [b for h in hits for b in (_bags_in(h) if h.is_dir() else [h] if h.suffix == BAG_SUFFIX else [])]
        if not found:
            raise UsageError(f"{spec}: no feature bags (*.h5) match")
        return [(p, None) for p in found]
    path = Path(spec)
    if path.is_dir():
        found = _bags_in(path)
        if not found:
            raise UsageError(f"{path}: no feature bags (*.h5) in this folder or its features/ subfolder")
        return [(p, None) for p in found]
    if not path.exists():
        return [(path, "bag not found")]
    return [(path, None)]


def resolve_bags(specs: Sequence[str]) -> list[SlideEntry]:
    """Sorted entries (slide id, bag path, error) of ``specs``; UsageError for an empty or ambiguous list."""
    if not specs:
        raise UsageError("no BAGS given")
    by_id: dict[str, SlideEntry] = {}
    for spec in specs:
        for path, error in _expand(spec):
            sid = path.name[: -len(BAG_SUFFIX)] if path.name.endswith(BAG_SUFFIX) else path.stem
            validate_slide_id(sid, str(path))
            prev = by_id.get(sid)
            if prev is not None and Path(prev.path).resolve() != path.resolve():
                raise UsageError(f"slide id '{sid}' names two bags: {prev.path} and {path}")
            by_id[sid] = SlideEntry(sid, path, None, error)
    return [by_id[k] for k in sorted(by_id)]
