"""`mstar info SLIDE...` — slide metadata: reader, vendor, size, levels, resolution, associated images.

SLIDES are resolved like every other command (files, folders, globs, CSV/TXT lists, ``-``). Output: a readable
block per slide on stdout, or ``--json`` (one JSON list), or ``--jsonl`` (one ``{"event": "slide", ...}`` line
per slide and a final ``{"event": "summary", ...}``). A slide that cannot be opened gives one line on stderr
(``mstar: error: <path>: <reason>``), is still listed in JSON with ``error`` set, and makes the exit code 1
after every other slide was reported. ``--verify`` also decodes every pixel of every level (finds corrupt
tiles; slow on large slides).

Imports here stay light (no torch): the slide layer pulls in numpy, openslide and tiffslide only.
"""

from __future__ import annotations

import json
from typing import Any

import click

from mstar_extract.cli.common import env_default, output_options

BACKEND_CHOICES = ("auto", "openslide", "tiffslide", "image")
VERIFY_CHUNK = 2048


def slide_info(path: str, slide_id: str, backend: str = "auto", mpp: float | None = None, verify: bool = False,
               mpp_fallback: float | None = None) -> dict[str, Any]:
    """The info record of one slide (keys as in ``mstar info --json``); raises ``SlideError`` subclasses.

    ``mpp``: a per-slide resolution (wins over metadata); ``mpp_fallback``: ``--mpp-override`` (only for slides
    without resolution metadata), the same rules as ``mstar tile``/``extract``."""
    from mstar_extract.slides import apply_mpp_fallback, open_slide

    with apply_mpp_fallback(open_slide(path, backend=backend, mpp=mpp), mpp_fallback) as slide:
        record: dict[str, Any] = {
            "path": str(slide.path),
            "slide_id": slide_id,
            "backend": slide.backend,
            "vendor": slide.vendor,
            "width": slide.dimensions[0],
            "height": slide.dimensions[1],
            "levels": [{"width": lv.width, "height": lv.height, "downsample": lv.downsample} for lv in slide.levels],
            "mpp_x": slide.mpp_x,
            "mpp_y": slide.mpp_y,
            "mpp_source": slide.mpp_source,
            "objective_magnification": slide.objective_magnification,
            "associated_images": list(slide.associated_images),
            "error": None,
        }
        if verify:
            verify_pixels(slide)
    return record


def verify_pixels(slide: Any) -> None:
    """Decode every level in ``VERIFY_CHUNK``-pixel blocks; the first undecodable block raises ``ReadError``."""
    for level, lv in enumerate(slide.levels):
        ds = lv.downsample
        for y in range(0, lv.height, VERIFY_CHUNK):
            for x in range(0, lv.width, VERIFY_CHUNK):
                w, h = min(VERIFY_CHUNK, lv.width - x), min(VERIFY_CHUNK, lv.height - y)
                slide.read_region((round(x * ds), round(y * ds)), level, (w, h))


def _error_record(path: str, slide_id: str, message: str) -> dict[str, Any]:
    keys = ("backend", "vendor", "width", "height", "mpp_x", "mpp_y", "mpp_source", "objective_magnification")
    return {"path": path, "slide_id": slide_id, **{k: None for k in keys}, "levels": [], "associated_images": [],
            "error": message}


def _fmt_mpp(rec: dict[str, Any]) -> str:
    if rec["mpp_x"] is None:
        return "unknown (give --mpp-override MPP or an 'mpp' column in a slide list)"
    text = f"{rec['mpp_x']:.4g} x {rec['mpp_y']:.4g} µm/px"
    return text + {"objective": " (estimated from the objective power)", "override": " (override)"}.get(rec["mpp_source"], "")


def human_block(rec: dict[str, Any]) -> str:
    """A readable multi-line description of one info record."""
    mag = rec["objective_magnification"]
    lines = [
        f"{rec['slide_id']}  ({rec['path']})",
        f"  reader:        {rec['backend']}" + (f", vendor {rec['vendor']}" if rec["vendor"] else ""),
        f"  size:          {rec['width']} x {rec['height']} px",
        f"  resolution:    {_fmt_mpp(rec)}",
        f"  magnification: {f'{mag:g}x' if mag else 'unknown'}",
        f"  levels:        {len(rec['levels'])}",
    ]
    for i, lv in enumerate(rec["levels"]):
        lines.append(f"    {i}: {lv['width']} x {lv['height']}  (downsample {lv['downsample']:.4g})")
    lines.append(f"  associated:    {', '.join(rec['associated_images']) or 'none'}")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("slides", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list of slide records on stdout.")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES), default=lambda: env_default("MSTAR_BACKEND", "auto"),
              show_default="auto, or $MSTAR_BACKEND", help="Slide reader.")
@click.option("--mpp-override", type=click.FloatRange(min=0, min_open=True), default=None, metavar="MPP",
              help="Level-0 µm/px for slides whose files have no resolution metadata (a list's 'mpp' column sets it "
                   "per slide and always wins).")
@click.option("--verify", is_flag=True, help="Also decode every pixel of every level (finds corrupt tiles; slow).")
@output_options()
def info(slides: tuple[str, ...], as_json: bool, backend: str, mpp_override: float | None, verify: bool, reporter: Any) -> int:
    """Show slide metadata: reader, vendor, size, levels, resolution (mpp), magnification, associated images.

    SLIDES: files, folders (searched recursively), glob patterns, a CSV/TXT list, or '-' for stdin.
    """
    from mstar_extract.errors import EXIT_FAILED, EXIT_OK, SlideError
    from mstar_extract.inputs import resolve_slides

    reporter.note_closed_stdout = False  # `mstar info ... | head` cuts a report: no note on stderr
    entries = resolve_slides(slides, missing_ok=True)  # a missing file is reported like a broken one
    records: list[dict[str, Any]] = []
    failed = 0
    for entry in entries:
        try:
            if entry.error:
                raise SlideError(entry.path, entry.error)
            rec = slide_info(str(entry.path), entry.slide_id, backend=backend, mpp=entry.mpp, verify=verify,
                             mpp_fallback=mpp_override)
        except SlideError as exc:
            failed += 1
            reporter.error(str(exc), exc)
            rec = _error_record(str(entry.path), entry.slide_id, exc.reason)
        records.append(rec)
        if reporter.jsonl:
            reporter.event("slide", **rec)
        elif not as_json and rec["error"] is None:
            reporter.write_stdout(human_block(rec) + "\n\n")
    if as_json and not reporter.jsonl:
        reporter.write_stdout(json.dumps(records, indent=2) + "\n")
    code = EXIT_FAILED if failed else EXIT_OK
    reporter.event("summary", command="info", total=len(records), counts={"ok": len(records) - failed, "failed": failed},
                   exit_code=code)
    return code
