"""Every threshold of tissue segmentation, with its documented default (one CLI option per field).

Physical units throughout (µm, µm²), so a 20x and a 40x scan of the same glass slide give the same result.
Colour values are on OpenCV's 8-bit HSV scale: hue 0–179 (degrees / 2), saturation and value 0–255.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any


def _f(default: Any, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"help": help, **meta})


PEN_COLORS = ("blue", "green", "black", "red")


@dataclass(frozen=True)
class SegmentationParams:
    """Settings of :func:`mstar_extract.tissue.segment_slide`. Field docs double as ``--help`` text."""

    seg_mpp: float = _f(8.0, "Resolution (µm/px) segmentation aims at: "
                             "the slide is read at the coarsest level at least this fine and downscaled to it.")
    seg_max_mpp: float = _f(16.0, "A pyramid level between --seg-mpp and this resolution (µm/px) "
                                  "is segmented as stored, without resampling (faster).")
    seg_min_side: int = _f(400, "Small slides are segmented finer than --seg-mpp so "
                                "that the longer side has at least this many pixels.")
    median_um: float = _f(24.0, "Median-blur window (µm) applied to saturation/value before thresholding.")
    sat_min: int = _f(20, "Floor of the Otsu saturation threshold (0-255): "
                          "an almost empty slide does not turn glass noise into tissue.")
    sat_max: int = _f(60, "Cap of the Otsu saturation threshold (0-255): "
                          "Otsu between dense and pale tissue does not drop pale tissue.")
    faint_sat_min: int = _f(8, "Faint tissue: minimum blurred saturation (0-255) of a pale pixel (with --faint-darkening).")
    faint_darkening: int = _f(12, "Faint tissue: minimum darkening (0-255 value) below the glass background of a pale pixel.")
    close_um: float = _f(48.0, "Morphological closing diameter (µm) that bridges small gaps inside tissue.")
    open_um: float = _f(24.0, "Morphological opening diameter (µm) that removes slivers (e.g. along ink strokes).")
    min_tissue_area_um2: float = _f(20000.0, "Tissue pieces smaller than this (µm², net of holes) are dropped as dust/debris.")
    min_hole_area_um2: float = _f(10000.0, "Holes (lumina, fat) at least this large (µm²) are excluded; smaller ones are filled.")
    dark_max_value: int = _f(85, "Pixels darker than this value (0-255) "
                                 "and not strongly saturated are ink/borders/debris, never tissue.")
    dark_max_sat: int = _f(120, "Dark pixels with saturation above this (0-255) are dense stained tissue, not ink.")
    dark_max_chroma: int = _f(20, "Dark pixels with chroma (max - min of R, G, B; 0-255) "
                                  "above this are darkly stained tissue, not ink/borders/debris (near-neutral).")
    pen: bool = _f(True, "Detect pen marks and remove them from tissue (--no-pen to disable).")
    pen_colors: str = _f("blue,green,black,red", "Comma-separated ink colours to detect (blue, green, black, red).")
    pen_min_sat: int = _f(50, "Minimum saturation (0-255) of blue/green ink pixels.")
    red_min_sat: int = _f(150, "Minimum saturation (0-255) of red ink pixels (eosin is paler).")
    blue_hue: str = _f("88-129", "Hue range (OpenCV 0-179) of blue ink; H&E hues lie above ~135.")
    green_hue: str = _f("35-87", "Hue range (OpenCV 0-179) of green ink.")
    pen_min_area_um2: float = _f(2000.0, "Ink regions smaller than this (µm²) are ignored as specks.")
    pen_dilate_um: float = _f(12.0, "Ink (and dark-artefact) regions are grown by this much (µm) "
                                    "before removal, to cover stroke fringes.")
    black_ink_max_ratio: float = _f(0.55, "Black ink crossing tissue: a dark pixel joined to black ink found on glass is ink "
                                          "when its value is at most this fraction of the tissue around it (ink passes ~30 % of "
                                          "the light; dark stain is not that much darker than its neighbours).")
    black_ink_max_chroma: int = _f(48, "Black ink crossing tissue: largest chroma (max - min of R, G, B; "
                                       "0-255) of ink over stain (it keeps a little of the stain's colour).")
    black_ink_context_um: float = _f(200.0, "Black ink crossing tissue: width (µm) "
                                            "of the window around a pixel whose tissue it is compared with.")

    def __post_init__(self) -> None:
        bad = [c for c in self.pen_color_set if c not in PEN_COLORS]
        if bad:
            raise ValueError(f"unknown pen colour(s) {', '.join(bad)}; choose from {', '.join(PEN_COLORS)}")
        for name in ("blue_hue", "green_hue"):
            _parse_range(getattr(self, name), name)
        if self.seg_mpp <= 0 or self.seg_max_mpp < self.seg_mpp:
            raise ValueError("seg_mpp must be positive and seg_max_mpp >= seg_mpp")

    @property
    def pen_color_set(self) -> tuple[str, ...]:
        return tuple(c.strip().lower() for c in self.pen_colors.split(",") if c.strip())

    def hue_range(self, name: str) -> tuple[int, int]:
        return _parse_range(getattr(self, f"{name}_hue"), f"{name}_hue")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def field_help(cls) -> dict[str, tuple[Any, str]]:
        """``{name: (default, help)}`` for the CLI."""
        return {f.name: (f.default, f.metadata.get("help", "")) for f in fields(cls)}


def _parse_range(text: str, name: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in str(text).split("-"))
    except ValueError:
        raise ValueError(f"{name} must look like LOW-HIGH (e.g. 88-129), got {text!r}") from None
    if not 0 <= lo <= hi <= 179:
        raise ValueError(f"{name} must satisfy 0 <= LOW <= HIGH <= 179, got {text!r}")
    return lo, hi
