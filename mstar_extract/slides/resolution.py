"""Level-0 resolution (µm per pixel) and objective power from slide metadata, with documented precedence.

Precedence (first that applies wins):

1. a per-slide resolution given by the user (a list file's ``mpp`` column, or ``open_slide(mpp=...)``) — it
   wins even over metadata, because a user who states one slide's resolution knows something the file does not
   (a wrong scanner calibration, a re-scaled export); ``mpp_source = "override"``;
2. metadata: the reader's normalised ``openslide.mpp-x/y`` / ``tiffslide.mpp-x/y`` (for DICOM, OpenSlide derives
   these from the level-0 ``PixelSpacing``), then Aperio ``MPP``, then an OME-TIFF's OME-XML ``PhysicalSizeX/Y``
   with their ``PhysicalSizeX/YUnit`` (default µm; m, cm, mm, µm, nm, pm, Å, inch are converted), then TIFF
   ``XResolution``/``YResolution`` with ``ResolutionUnit`` centimetre or inch (unit-less values and
   screen-like defaults — anything outside 0.01…50 µm/px, such as 72 dpi — are ignored);
   ``mpp_source = "metadata"``;
3. ``--mpp-override`` (one value for a whole run, :func:`mstar_extract.slides.apply_mpp_fallback`): only for
   slides whose file has no resolution of its own, so that a folder mixing calibrated and uncalibrated scans
   is safe; ``mpp_source = "override"``;
4. objective power (``openslide.objective-power``, Aperio ``AppMag``, DICOM ``ObjectiveLensPower``, OME
   ``Objective NominalMagnification``, ...): mpp = 10 / magnification,
   flagged ``mpp_source = "objective"`` (an estimate: 40x ≈ 0.25 µm/px);
5. none: ``Slide.mpp_x`` is ``None`` and ``Slide.mpp`` raises ``ResolutionError`` saying how to provide it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xml.etree.ElementTree import Element

MPP_MIN = 0.01
MPP_MAX = 50.0
"""Plausible level-0 µm/px range of a microscope scan; values outside are treated as absent."""
_UNIT_UM = {"centimeter": 1e4, "cm": 1e4, "3": 1e4, "inch": 25400.0, "2": 25400.0}
OME_UNIT_UM = {"m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3, "µm": 1.0, "μm": 1.0, "um": 1.0, "nm": 1e-3,
               "pm": 1e-6, "Å": 1e-4, "in": 25400.0, "thou": 25.4}
"""OME ``UnitsLength`` symbols (µm = micro sign or Greek mu) in µm; other units (pixel, parsec...) count as absent."""
_DICOM_POWER = "dicom.OpticalPathSequence[0].ObjectiveLensPower"


@dataclass(frozen=True)
class Resolution:
    """Result of :func:`resolve`: level-0 µm/px (or None), where it came from, and the objective power."""

    mpp_x: float | None
    mpp_y: float | None
    source: str | None
    magnification: float | None


def _float(value: object) -> float | None:
    if value is None:
        return None
    try:
        text = str(value).strip()
        if "/" in text:  # a TIFF rational written as "num/den"
            num, den = text.split("/", 1)
            f = float(num) / float(den)
        else:
            f = float(text)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _plausible(mpp: float | None) -> float | None:
    return mpp if mpp is not None and MPP_MIN <= mpp <= MPP_MAX else None


def _unit_um(unit: object) -> float | None:
    if unit is None:
        return None
    key = str(unit).strip().lower()
    key = key.rsplit(".", 1)[-1]  # "RESUNIT.CENTIMETER" -> "centimeter"
    return _UNIT_UM.get(key)


def mpp_from_tiff_resolution(x_res: object, y_res: object, unit: object) -> tuple[float, float] | None:
    """µm/px from TIFF X/YResolution (pixels per unit) and ResolutionUnit; None when unit-less or implausible."""
    um = _unit_um(unit)
    xr, yr = _float(x_res), _float(y_res)
    if um is None or xr is None:
        return None
    mx = _plausible(um / xr)
    my = _plausible(um / yr) if yr is not None else mx
    if mx is None or my is None:
        return None
    return mx, my


def _ome_root(text: object) -> Element | None:
    if not isinstance(text, str) or "<OME" not in text[:4096]:
        return None
    import xml.etree.ElementTree as ET

    try:
        return ET.fromstring(text.encode("utf-8") if text.lstrip().startswith("<?xml") else text)
    except (ET.ParseError, ValueError):
        return None


def _first(root: Element, local: str) -> Element | None:
    return next((el for el in root.iter() if el.tag.rsplit("}", 1)[-1] == local), None)


def _ome_size(pixels: Element, axis: str) -> float | None:
    value = _float(pixels.get(f"PhysicalSize{axis}"))
    unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
    factor = OME_UNIT_UM.get(unit.strip())
    return _plausible(value * factor) if value is not None and factor is not None else None


def mpp_from_ome_xml(text: object) -> tuple[float, float] | None:
    """Level-0 (mpp_x, mpp_y) from the first image's ``Pixels PhysicalSizeX/Y`` (+ units) of OME-XML, or None."""
    root = _ome_root(text)
    pixels = _first(root, "Pixels") if root is not None else None
    if pixels is None:
        return None
    mx, my = _ome_size(pixels, "X"), _ome_size(pixels, "Y")
    if mx is None and my is None:
        return None
    return (mx or my), (my or mx)  # type: ignore[return-value]


def _ome_magnification(text: object) -> float | None:
    if not isinstance(text, str) or "NominalMagnification" not in text:
        return None
    m = re.search(r'NominalMagnification="([0-9.eE+-]+)"', text)
    return _float(m.group(1)) if m else None


def metadata_mpp(props: Mapping[str, str]) -> tuple[float, float] | None:
    """Level-0 (mpp_x, mpp_y) from a reader's property map, or None (see module docstring, rule 2)."""
    for prefix in ("openslide", "tiffslide"):
        mx = _plausible(_float(props.get(f"{prefix}.mpp-x")))
        my = _plausible(_float(props.get(f"{prefix}.mpp-y")))
        if mx is not None or my is not None:
            return (mx or my), (my or mx)  # type: ignore[return-value]
    aperio = _plausible(_float(props.get("aperio.MPP")))
    if aperio is not None:
        return aperio, aperio
    ome = mpp_from_ome_xml(props.get("tiff.ImageDescription"))
    if ome is not None:
        return ome
    return mpp_from_tiff_resolution(
        props.get("tiff.XResolution"), props.get("tiff.YResolution"), props.get("tiff.ResolutionUnit")
    )


def objective_power(props: Mapping[str, str]) -> float | None:
    """Objective magnification from the property map (normalised key first, then vendor keys), or None."""
    for key in ("openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag",
                "hamamatsu.SourceLens", "leica.objective", _DICOM_POWER):
        value = _float(props.get(key))
        if value is not None and 0.5 <= value <= 200:
            return value
    value = _ome_magnification(props.get("tiff.ImageDescription"))
    return value if value is not None and 0.5 <= value <= 200 else None


def resolve(props: Mapping[str, str], override: float | None = None) -> Resolution:
    """Apply the precedence of the module docstring to a property map and an optional override (µm/px)."""
    mag = objective_power(props)
    if override is not None:
        mpp = _float(override)
        if mpp is None:
            raise ValueError(f"mpp override must be a positive number, got {override!r}")
        return Resolution(mpp, mpp, "override", mag)
    meta = metadata_mpp(props)
    if meta is not None:
        return Resolution(meta[0], meta[1], "metadata", mag)
    if mag is not None:
        return Resolution(10.0 / mag, 10.0 / mag, "objective", mag)
    return Resolution(None, None, None, None)
