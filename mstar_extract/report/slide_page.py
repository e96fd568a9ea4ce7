"""One slide's page (``report_assets/slides/<name>.html``): its facts, flags, error, the feature map over the
slide picture, and the QC picture at full size. Static HTML (works without JavaScript); every value escaped."""

from __future__ import annotations

import time
from typing import Any

from mstar_extract.report.htmlutil import badges, duration, esc, num, status_badge
from mstar_extract.report.images import grid_shape
from mstar_extract.report.layout import PageLinks

MPP_SOURCES = {"metadata": "from the file's metadata", "override": "given by the user",
               "objective": "estimated from the objective power (10 / magnification)"}


def _fact_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    mpp = num(s.get("mpp"), "{:.4g} µm/px")
    if s.get("mpp_src"):
        mpp += f" ({esc(MPP_SOURCES.get(s['mpp_src'], s['mpp_src']))})"
    finished = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["finished"])) if s.get("finished") else "–"
    rows = [
        ("path", esc(s.get("path"))), ("status", status_badge(s["status"])), ("patches", num(s.get("n"))),
        ("tissue area", num(s.get("tissue_mm2"), "{:.2f} mm²")), ("ink", num(s.get("ink"), "{:.1%}")),
        ("level-0 resolution", mpp), ("seconds", duration(s.get("sec"))), ("finished", esc(finished)),
    ]
    if s.get("bad"):
        rows.append(("bad patches dropped", num(s["bad"])))
    if s.get("model"):
        rows += [("model", esc(s["model"])), ("weights", esc(s.get("weights"))), ("precision", esc(s.get("precision"))),
                 ("feature dim", num(s.get("dim")))]
    if s.get("ps0"):
        rows.append(("patch footprint", f"{num(s['ps0'])} level-0 px, grid step {num(s.get('step'), '{:.1f}')}"))
    if s.get("notes"):
        rows.append(("report", esc("; ".join(s["notes"]))))
    if s.get("err"):
        rows.append(("error" if s["status"] == "failed" else "note", f'<span class="err">{esc(s["err"])}</span>'))
    return rows


def _overlay(s: dict[str, Any], qc_url: str | None, map_url: str) -> str:
    """The feature map (pixelated PNG) positioned over the slide picture of the QC JPEG (caption below it)."""
    rows, cols = grid_shape(s)
    step, w0, h0 = float(s["step"]), float(s["w0"]), float(s["h0"])
    width = 100.0 * cols * step / w0
    if qc_url and s.get("qc_w"):
        height = 100.0 * rows * step / h0 * s["qc_img_h"] / s["qc_h"]
        base = f'<img class="under" src="{esc(qc_url)}" alt="slide picture" width="{s["qc_w"]}" height="{s["qc_h"]}">'
        box = ""
    else:
        height = 100.0 * rows * step / h0
        base = ""
        box = f' style="aspect-ratio: {w0:.0f} / {h0:.0f}; width: min(100%, 1000px)"'
    return (f'<div class="overlay"{box}>{base}<img class="fmap" src="{esc(map_url)}" alt="feature map" '
            f'style="width:{width:.3f}%;height:{height:.3f}%"></div>'
            '<p class="ctl"><label>map opacity <input type="range" min="0" max="100" value="85" '
            "oninput=\"document.querySelector('.fmap').style.opacity=this.value/100\"></label></p>")


def render_slide_page(links: PageLinks, s: dict[str, Any], has_map: bool) -> str:
    """The HTML of one slide's page (``s``: its facts with ``flags``, and ``qc_w``/``qc_h``/``qc_img_h`` when
    the QC picture was read)."""
    qc_url = links.url("qc", s["id"]) if s.get("has_qc") else None
    facts = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in _fact_rows(s))
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(s['id'])} · mstar report</title>",
        f'<link rel="stylesheet" href="{esc(links.url("css"))}"></head>',
        '<body class="slide-page">',
        f'<nav><a href="{esc(links.url("report"))}">← run report</a></nav>',
        f"<h1>{esc(s['id'])}</h1>", f'<p class="flags">{status_badge(s["status"])} {badges(s.get("flags", []))}</p>',
        f'<table class="facts">{facts}</table>',
    ]
    if has_map:
        map_url = links.url("map", s["id"])
        parts += ["<h2>Feature map</h2>",
                  '<p class="note">Each patch painted with its features\' first three principal components over the '
                  "whole run (red, green, blue): patches of similar tissue get similar colours. Noise-like colours "
                  "that do not follow the tissue mean unusable features (random or wrong weights).</p>",
                  _overlay(s, qc_url, map_url)]
    if qc_url:
        parts += ["<h2>QC picture</h2>", '<p class="note">Tissue contours (green), holes (blue), pen ink (magenta), '
                  "border/debris (red), kept patches (yellow).</p>",
                  f'<a href="{esc(qc_url)}"><img class="qc" src="{esc(qc_url)}" alt="QC picture"></a>']
    parts.append("</body></html>\n")
    return "\n".join(parts)
