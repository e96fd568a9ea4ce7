"""Run-level numbers of a report: flags per slide (relative to the run), counts, totals, wall time and the
patches/s series over the run."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

FEW_PATCHES_RATIO = 0.25
"""A slide is flagged ``few patches`` below this fraction of the run's median patch count ..."""
FEW_PATCHES_MIN_SLIDES = 3
"""... when at least this many slides with patches give the median."""
MUCH_INK = 0.10
"""A slide is flagged ``much ink`` when ink covers at least this share of its tissue + ink area."""
PLOT_BINS = 60

FLAGS = {
    "failed": "failed",
    "no_tissue": "no tissue",
    "few_patches": "few patches",
    "much_ink": "much ink",
    "mpp_objective": "mpp from objective",
    "random_weights": "random weights",
}
"""Flag key -> label, in display order."""

STATUS_ORDER = ("done", "skipped", "no_tissue", "failed")


def median_patches(slides: Sequence[dict[str, Any]]) -> float | None:
    ns = [s["n"] for s in slides if s["status"] in ("done", "skipped") and s.get("n")]
    return float(statistics.median(ns)) if len(ns) >= FEW_PATCHES_MIN_SLIDES else None


def slide_flags(s: dict[str, Any], median: float | None) -> list[str]:
    """The flag keys of one slide (see :data:`FLAGS`)."""
    flags = []
    if s["status"] == "failed":
        flags.append("failed")
    if s["status"] == "no_tissue":
        flags.append("no_tissue")
    if median and s["status"] in ("done", "skipped") and s.get("n") is not None and s["n"] < FEW_PATCHES_RATIO * median:
        flags.append("few_patches")
    if s.get("ink") is not None and s["ink"] >= MUCH_INK:
        flags.append("much_ink")
    if s.get("mpp_src") == "objective":
        flags.append("mpp_objective")
    if s.get("weights") == "random":
        flags.append("random_weights")
    return flags


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _busy_clock(merged: list[tuple[float, float]]) -> Callable[[float], float]:
    """A function: time -> seconds with some slide in progress between the run's start and that time."""
    import bisect

    starts = [a for a, _ in merged]
    before = [0.0]
    for a, b in merged:
        before.append(before[-1] + (b - a))

    def busy(t: float) -> float:
        i = bisect.bisect_right(starts, t) - 1
        return 0.0 if i < 0 else before[i] + min(t, merged[i][1]) - merged[i][0]

    return busy


def timeline(slides: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Wall time (seconds with a slide in progress: gaps between jobs do not count), the span from the first
    start to the last finish, and patches/s in up to :data:`PLOT_BINS` bins of that busy time."""
    timed = [s for s in slides if s["status"] != "skipped" and s.get("sec") is not None and s.get("finished")]
    if not timed:
        return {"wall_s": None, "span_s": None, "patches_per_s": None, "series": []}
    merged = _merged([(s["finished"] - max(0.0, s["sec"]), s["finished"]) for s in timed])
    wall = sum(b - a for a, b in merged)
    patches = sum(s.get("n") or 0 for s in timed if s["status"] == "done")
    series: list[list[float]] = []
    if wall > 0:
        n_bins = max(1, min(PLOT_BINS, len(timed)))
        width = wall / n_bins
        bins = [0.0] * n_bins
        busy = _busy_clock(merged)
        for s in timed:
            if s["status"] == "done" and s.get("n"):
                bins[min(n_bins - 1, int(busy(s["finished"]) / width))] += s["n"]
        series = [[round((i + 1) * width, 3), round(v / width, 3)] for i, v in enumerate(bins)]
    return {"wall_s": round(wall, 3), "span_s": round(merged[-1][1] - merged[0][0], 3),
            "patches_per_s": round(patches / wall, 3) if wall > 0 else None, "series": series}


def run_summary(slides: Sequence[dict[str, Any]], variants: dict[str, Any]) -> dict[str, Any]:
    """Counts by status, patches, tissue area, timing, models/weights and settings variants of the run."""
    counts = Counter(s["status"] for s in slides)
    models = Counter((s.get("model"), s.get("weights"), s.get("precision"), s.get("dim"))
                     for s in slides if s.get("model"))
    used = Counter(s["settings_id"] for s in slides if s.get("settings_id"))
    flags = Counter(f for s in slides for f in s.get("flags", ()))
    return {
        "n_slides": len(slides),
        "counts": {k: counts.get(k, 0) for k in STATUS_ORDER},
        "patches": sum(s.get("n") or 0 for s in slides if s["status"] in ("done", "skipped")),
        "tissue_mm2": round(sum(s.get("tissue_mm2") or 0.0 for s in slides if s["status"] != "failed"), 3),
        "flags": {k: flags.get(k, 0) for k in FLAGS},
        "models": [{"model": m, "weights": w, "precision": p, "dim": d, "slides": c}
                   for (m, w, p, d), c in models.most_common()],
        "settings": [{"id": k, "slides": c, "settings": variants.get(k, {})} for k, c in used.most_common()],
        **timeline(slides),
    }
