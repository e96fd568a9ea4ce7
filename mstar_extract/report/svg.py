"""The patches/s-over-the-run plot: a small inline SVG (numbers only: nothing user-controlled goes in)."""

from __future__ import annotations

from collections.abc import Sequence

W, H, PAD_L, PAD_B, PAD_T, PAD_R = 520, 140, 56, 26, 10, 12


def _fmt_s(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def throughput_svg(series: Sequence[Sequence[float]]) -> str:
    """SVG of ``[[busy seconds at bin end, patches/s], ...]``; an empty string without data."""
    if not series:
        return ""
    t_max = max(p[0] for p in series) or 1.0
    y_max = max(p[1] for p in series) or 1.0
    pw, ph = W - PAD_L - PAD_R, H - PAD_T - PAD_B

    def xy(t: float, v: float) -> str:
        return f"{PAD_L + pw * t / t_max:.1f},{PAD_T + ph * (1 - v / y_max):.1f}"

    pts = [xy(0.0, series[0][1])]
    prev = 0.0
    for t, v in series:  # a step line: each bin's rate from its start to its end
        pts += [xy(prev, v), xy(t, v)]
        prev = t
    area = " ".join([xy(0.0, 0.0), *pts, xy(t_max, 0.0)])
    base = PAD_T + ph
    return (
        f'<svg class="plot" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
        f'aria-label="patches per second over the run">'
        f'<polygon points="{area}" fill="#cfe3f7"/>'
        f'<polyline points="{" ".join(pts)}" fill="none" stroke="#1f6fb8" stroke-width="1.5"/>'
        f'<line x1="{PAD_L}" y1="{base}" x2="{W - PAD_R}" y2="{base}" stroke="#888"/>'
        f'<line x1="{PAD_L}" y1="{PAD_T}" x2="{PAD_L}" y2="{base}" stroke="#888"/>'
        f'<text x="{PAD_L - 4}" y="{PAD_T + 8}" text-anchor="end">{y_max:.3g}</text>'
        f'<text x="{PAD_L - 4}" y="{base}" text-anchor="end">0</text>'
        f'<text x="{PAD_L - 4}" y="{PAD_T + ph / 2 + 4:.0f}" text-anchor="end">patches/s</text>'
        f'<text x="{PAD_L}" y="{H - 8}">0</text>'
        f'<text x="{W - PAD_R}" y="{H - 8}" text-anchor="end">{_fmt_s(t_max)} (time with a slide in progress)</text>'
        "</svg>"
    )
