"""``OUT/report.html``: the run summary (static HTML) and the slide table / contact sheet, drawn by the small
vanilla script ``report_assets/report.js`` from JSON embedded in the page (escaped for ``<script>``)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mstar_extract.report.htmlutil import duration, esc, json_for_script, num, status_badge
from mstar_extract.report.layout import ASSETS_DIR, asset_name
from mstar_extract.report.summary import FLAGS, STATUS_ORDER
from mstar_extract.report.svg import throughput_svg

COLUMNS = ("id", "status", "n", "tissue_mm2", "ink", "mpp", "mpp_src", "sec", "err", "flags", "a", "t", "path")
"""Columns of each row of the embedded data (``a``: asset name; ``t``: 1 when a thumbnail exists)."""


def table_rows(slides: Sequence[dict[str, Any]], thumbs: set[str]) -> list[list[Any]]:
    return [[s["id"], s["status"], s.get("n"), _round(s.get("tissue_mm2"), 3), _round(s.get("ink"), 4), s.get("mpp"),
             s.get("mpp_src"), _round(s.get("sec"), 2), s.get("err") or "", s.get("flags", []), asset_name(s["id"]),
             1 if s["id"] in thumbs else 0, s.get("path") or ""] for s in slides]


def _round(v: Any, nd: int) -> Any:
    return round(v, nd) if isinstance(v, float) else v


def _cards(summary: dict[str, Any]) -> str:
    c = summary["counts"]
    items = [(num(summary["n_slides"]), "slides")] + [(num(c[k]), status_badge(k)) for k in STATUS_ORDER]
    items += [(num(summary["patches"]), "patches"), (num(summary["tissue_mm2"], "{:,.1f}"), "mm² tissue"),
              (duration(summary["wall_s"]), "wall time"), (num(summary["patches_per_s"], "{:,.1f}"), "patches/s")]
    return "".join(f'<div class="card"><b>{v}</b><span>{k}</span></div>' for v, k in items)


def _models(summary: dict[str, Any]) -> str:
    if not summary["models"]:
        return '<p class="note">No feature bags (a <code>mstar tile</code> run, or none finished yet).</p>'
    rows = "".join(
        f"<tr><td>{esc(m['model'])}</td><td>{esc(m['weights'])}</td><td>{esc(m['precision'])}</td>"
        f"<td>{num(m['dim'])}</td><td>{num(m['slides'])}</td></tr>" for m in summary["models"])
    return ("<table class=\"models\"><tr><th>model</th><th>weights (SHA-256)</th><th>precision</th><th>dim</th>"
            f"<th>slides</th></tr>{rows}</table>")


def _settings(summary: dict[str, Any]) -> str:
    out = []
    for i, v in enumerate(summary["settings"]):
        label = "settings" if len(summary["settings"]) == 1 else f"settings variant {i + 1}"
        text = json.dumps(v["settings"], indent=2, sort_keys=True, default=str)
        out.append(f"<details><summary>{label} ({num(v['slides'])} slides)</summary><pre>{esc(text)}</pre></details>")
    return "".join(out)


def _flag_buttons(summary: dict[str, Any]) -> str:
    return "".join(f'<button type="button" class="flag f-{k}" data-flag="{k}">{esc(label)} '
                   f"<b>{num(summary['flags'][k])}</b></button>" for k, label in FLAGS.items() if summary["flags"][k])


def render_index(out: Path, summary: dict[str, Any], rows: list[list[Any]], version: str) -> str:
    """The HTML of ``OUT/report.html``."""
    data = {"columns": COLUMNS, "rows": rows, "flags": FLAGS, "assets": ASSETS_DIR}
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    plot = throughput_svg(summary["series"])
    return "\n".join([
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>mstar report · {esc(out.name)}</title>",
        f'<link rel="stylesheet" href="{ASSETS_DIR}/report.css"></head><body>',
        f'<header><h1>mstar report</h1><p class="sub">{esc(out.resolve())} · generated {esc(generated)} · '
        f"mstar {esc(version)}</p></header>",
        f'<section id="summary"><div class="cards">{_cards(summary)}</div>',
        f'<div class="row"><div>{plot or "<p class=note>No timing yet.</p>"}</div><div>{_models(summary)}'
        f"{_settings(summary)}</div></div>",
        f'<div class="flagbar">{_flag_buttons(summary)}</div></section>',
        '<section id="controls"><input id="q" type="search" placeholder="filter: slide id, path or error text"> '
        '<select id="status"><option value="">any status</option>'
        + "".join(f'<option value="{k}">{k.replace("_", " ")}</option>' for k in STATUS_ORDER)
        + '</select> <select id="flag"><option value="">any flag</option>'
        + "".join(f'<option value="{k}">{esc(v)}</option>' for k, v in FLAGS.items())
        + '</select> <span class="tabs"><button type="button" data-view="table">table</button>'
        '<button type="button" data-view="sheet">contact sheet</button></span> <span id="count"></span></section>',
        '<section id="view"><noscript>The table needs JavaScript; the slide pages are in '
        f"{ASSETS_DIR}/slides/.</noscript></section>", '<nav id="pager"></nav>',
        f'<script id="mstar-data" type="application/json">{json_for_script(data)}</script>',
        f'<script src="{ASSETS_DIR}/report.js"></script>', "</body></html>\n",
    ])
