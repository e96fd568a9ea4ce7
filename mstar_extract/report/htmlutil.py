"""Escaping and formatting shared by the report's pages. Everything user-controlled (slide ids, paths, error
text, settings) goes through :func:`esc` (HTML text and attributes) or :func:`json_for_script` (JSON inside a
``<script>`` element), never into markup as it is."""

from __future__ import annotations

import html
import json
from typing import Any

from mstar_extract.report.summary import FLAGS

_SCRIPT_SAFE = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def esc(value: Any) -> str:
    """HTML-escape ``value`` for text or a quoted attribute (``& < > " '``); None -> empty."""
    return "" if value is None else html.escape(str(value), quote=True)


def json_for_script(obj: Any) -> str:
    """Compact JSON that is safe inside ``<script type="application/json">``: ``<``, ``>`` and ``&`` are written
    as ``\\u003c``-style escapes (valid JSON, same value), so no string can close the element (``</script>``)
    or open a comment; U+2028/2029 are escaped too."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str, allow_nan=False)
    for ch, escaped in _SCRIPT_SAFE:
        text = text.replace(ch, escaped)
    return text


def num(value: Any, fmt: str = "{:,.0f}", none: str = "–") -> str:
    if value is None:
        return none
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return esc(value)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = float(seconds)
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.2f} h"


def badges(flags: list[str]) -> str:
    return "".join(f'<span class="flag f-{esc(f)}">{esc(FLAGS.get(f, f))}</span>' for f in flags)


def status_badge(status: str) -> str:
    return f'<span class="status s-{esc(status)}">{esc(status.replace("_", " "))}</span>'
