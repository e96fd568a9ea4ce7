"""``build_report(OUT)``: read the run's outputs, render what changed, write ``OUT/report.html``.

Order: manifest rows -> per-slide facts (cached by input signature) -> the run's PCA basis (fitted once, see
:mod:`mstar_extract.report.pca`) -> flags relative to the run -> per slide, thumbnail / feature map / page when
their key changed -> the index page -> the cache. Per-slide rendering problems (a corrupt QC picture, an
unreadable bag) become a note on that slide; they never stop the report.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mstar_extract.report.cache import Listing, input_signature, key_of, load_cache, save_cache
from mstar_extract.report.layout import PageLinks, run_path


@dataclass
class ReportResult:
    """What a build did: the page, how many slides, what was rendered again, and how long it took."""

    path: Path
    n_slides: int
    rendered: dict[str, int] = field(default_factory=dict)
    """``pages``, ``thumbs``, ``maps``: how many were (re)written."""
    seconds: float = 0.0
    basis: str = ""
    """How the PCA basis was obtained (``fitted on N bags, M patches``, ``kept``, or ``none``)."""


def _manifest_rows(out: Path) -> list[Any]:
    from mstar_extract.errors import UsageError
    from mstar_extract.manifest import PARTS_DIR, latest_rows, read_parts

    parts = out / PARTS_DIR
    if not run_path(out, "manifest").is_file() and not (parts.is_dir() and any(parts.glob("*.csv"))):
        raise UsageError(f"{out}: no manifest.csv (no slide has finished there yet)")
    return latest_rows(read_parts(out))


def _collect(out: Path, rows: list[Any], cache: dict[str, Any],
             listing: Listing) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cache entries (with fresh facts where the inputs changed) and the run's settings variants."""
    from mstar_extract.report.facts import slide_facts

    variants = dict(cache["variants"])
    entries: dict[str, Any] = {}
    for row in rows:
        sig = input_signature(listing, row)
        old = cache["slides"].get(row.slide_id)
        if old and old.get("sig") == sig and old.get("facts", {}).get("settings_id", "") in (*variants, ""):
            entries[row.slide_id] = old
            continue
        # new facts; the render keys of the old entry stay, so unchanged assets are not rendered again
        entries[row.slide_id] = {**(old or {}), "sig": sig, "facts": slide_facts(out, row, sig, variants)}
    return entries, variants


def _fingerprint(f: dict[str, Any]) -> str | None:
    if f.get("has_bag") and f.get("n") and f["status"] != "failed":
        return f"{f.get('model')}|{f.get('weights')}|{f.get('dim')}"
    return None


def _basis(out: Path, entries: dict[str, Any], rebuild: bool) -> tuple[Any, str]:
    """The run's PCA basis (loaded, or fitted when absent / outdated) and a line saying which."""
    from mstar_extract.report.pca import Basis, fit_basis

    fps = Counter(fp for e in entries.values() if (fp := _fingerprint(e["facts"])))
    if not fps:
        return None, "none (no feature bag with patches)"
    fp, _ = fps.most_common(1)[0]
    bags = [run_path(out, "bag", sid) for sid, e in entries.items() if _fingerprint(e["facts"]) == fp]
    basis = None if rebuild else Basis.load(run_path(out, "pca"))
    if basis is not None and not basis.needs_refit(fp, len(bags)):
        return basis, f"kept (fitted on {basis.n_bags} bags, {basis.n_sample} patches)"
    basis = fit_basis(bags, fp)
    if basis is None:
        return None, "none (the bags could not be read)"
    basis.save(run_path(out, "pca"))
    return basis, f"fitted on {basis.n_bags} bags, {basis.n_sample} patches"


def _render_slide(out: Path, entry: dict[str, Any], basis: Any, counts: Counter, listing: Listing,
                  links: PageLinks) -> None:
    """Thumbnail, feature map and page of one slide, each only when its key changed or its file is missing."""
    from mstar_extract.errors import first_line
    from mstar_extract.report import images
    from mstar_extract.report.slide_page import render_slide_page

    f, sid = entry["facts"], entry["facts"]["id"]
    notes = []
    if f.get("has_qc"):
        key = key_of(entry["sig"]["qc"], f.get("w0"), f.get("h0"))
        if entry.get("thumb") != key or not listing.exists("thumb", sid):
            try:
                entry["qcdim"] = images.write_thumb(run_path(out, "qc", sid), run_path(out, "thumb", sid), f)
                entry["thumb"] = key
                counts["thumbs"] += 1
            except Exception as exc:  # noqa: BLE001 - one slide's picture must not stop the report
                entry.pop("thumb", None)
                entry.pop("qcdim", None)
                notes.append(f"QC picture unreadable: {first_line(exc)}")
    has_map = False
    if basis is not None and _fingerprint(f) == basis.fingerprint and f.get("step"):
        key = key_of(entry["sig"]["bag"], basis.key)
        has_map = entry.get("map") == key and listing.exists("map", sid)
        if not has_map:
            try:
                images.write_feature_map(run_path(out, "bag", sid), run_path(out, "map", sid), f, basis)
                entry["map"], has_map = key, True
                counts["maps"] += 1
            except Exception as exc:  # noqa: BLE001
                entry.pop("map", None)
                notes.append(f"feature map failed: {first_line(exc)}")
    shown = {**f, **(entry.get("qcdim") or {}), "has_qc": bool(entry.get("thumb")), "notes": notes}
    key = key_of(shown, has_map)
    if entry.get("page") != key or not listing.exists("page", sid):
        from mstar_extract.report.files import write_text

        write_text(run_path(out, "page", sid), render_slide_page(links, shown, has_map))
        entry["page"] = key
        counts["pages"] += 1


def _remove_orphans(out: Path, old: dict[str, Any], current: dict[str, Any]) -> None:
    for sid in set(old) - set(current):
        for kind in ("thumb", "map", "page"):
            run_path(out, kind, sid).unlink(missing_ok=True)


def _write_static(out: Path) -> None:
    from importlib.resources import files

    from mstar_extract.report.files import write_if_changed

    static = files("mstar_extract.report") / "static"
    for kind, name in (("css", "report.css"), ("js", "report.js")):
        write_if_changed(run_path(out, kind), (static / name).read_bytes())


def build_report(out_dir: str | Path, rebuild: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> ReportResult:
    """Write ``OUT/report.html`` and its assets for the run in ``out_dir``; only changed slides are rendered
    (``rebuild``: ignore the cache, refit the PCA basis, render everything). Raises UsageError when OUT has no
    manifest, :class:`~mstar_extract.report.lock.ReportBusy` when another process is writing the report."""
    from mstar_extract import __version__
    from mstar_extract.report.files import write_text
    from mstar_extract.report.index_page import render_index, table_rows
    from mstar_extract.report.lock import report_lock
    from mstar_extract.report.summary import median_patches, run_summary, slide_flags

    t0 = time.perf_counter()
    out = Path(out_dir)
    rows = _manifest_rows(out)
    with report_lock(out) as lock:
        cache = {"slides": {}, "variants": {}} if rebuild else load_cache(out)
        listing, links = Listing(out), PageLinks(out)
        entries, variants = _collect(out, rows, cache, listing)
        basis, basis_note = _basis(out, entries, rebuild)
        facts = [e["facts"] for e in entries.values()]
        median = median_patches(facts)
        for f in facts:
            f["flags"] = slide_flags(f, median)
        counts: Counter = Counter()
        for i, entry in enumerate(entries.values()):
            _render_slide(out, entry, basis, counts, listing, links)
            lock.touch()
            if progress is not None:
                progress(i + 1, len(entries))
        thumbs = {sid for sid, e in entries.items() if e.get("thumb")}
        summary = run_summary(facts, variants)
        _write_static(out)
        write_text(run_path(out, "report"), render_index(out, summary, table_rows(facts, thumbs), __version__))
        _remove_orphans(out, cache["slides"], entries)
        save_cache(out, entries, variants)
    rendered = {k: counts.get(k, 0) for k in ("pages", "thumbs", "maps")}
    return ReportResult(run_path(out, "report"), len(entries), rendered, round(time.perf_counter() - t0, 3), basis_note)
