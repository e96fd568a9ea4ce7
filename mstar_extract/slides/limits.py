"""Pixel limits: the largest image ``mstar`` decodes for one slide, so that a small hostile or mistaken file (an
"image bomb": a 3 MB PNG of 30000 x 30000 pixels, a 300 KB sparse TIFF of 100000 x 100000 pixels without a
pyramid) fails at once with one line instead of exhausting memory or running for hours.

Both limits are checked from the file's header (sizes are known before any pixel is decoded):

* ``MSTAR_MAX_IMAGE_PIXELS`` / ``--max-image-pixels`` (default 250 megapixels): a plain image (PNG, JPEG, or a
  TIFF read by the plain-image reader) is decoded whole into memory, about 7 bytes per pixel at the peak (the
  decoder's copy and the RGB array): 250 Mpx is about 1.8 GB.
* ``MSTAR_MAX_READ_PIXELS`` / ``--max-read-pixels`` (default 2 gigapixels): segmentation (and the QC picture)
  reads the coarsest pyramid level that is fine enough, in bounded strips; a slide without such a level (no
  pyramid) would have every pixel of a finer level decoded. Reading more than this many pixels is refused, which
  bounds the time segmentation of one slide can take (measured rates: docs/tiling.md).

Values are pixel counts; ``250M``, ``2G``, ``2.5e9`` are accepted. The command-line options set the variables for
the run's worker processes (:func:`export`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

from mstar_extract.errors import UsageError

ENV_MAX_IMAGE_PIXELS = "MSTAR_MAX_IMAGE_PIXELS"
ENV_MAX_READ_PIXELS = "MSTAR_MAX_READ_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 250_000_000
"""Plain images decoded whole: 250 Mpx (about 15800 x 15800), about 1.8 GB at the peak while decoding."""
DEFAULT_MAX_READ_PIXELS = 2_000_000_000
"""Pixels segmentation may decode from one slide level (a 44700 x 44700 slide without a pyramid)."""

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]?)\s*(?:px|pixels)?\s*$", re.IGNORECASE)


def parse_pixels(text: str | int, what: str = "") -> int:
    """A positive pixel count from ``text`` (``250000000``, ``250M``, ``2G``, ``2.5e9``); ``what`` names the
    option or variable in the :class:`UsageError` for anything else."""
    where = f"{what}: " if what else ""
    if isinstance(text, int) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _NUMBER.match(str(text))
        if m is None:
            raise UsageError(f"{where}'{text}' is not a pixel count (e.g. 250000000, 250M, 2G)")
        value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if not (math.isfinite(value) and value >= 1):
        raise UsageError(f"{where}'{text}' must be a positive number of pixels")
    return int(value)


def _limit(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    return parse_pixels(raw, name)


def max_image_pixels(env: Mapping[str, str] = os.environ) -> int:
    """The plain-image limit: ``$MSTAR_MAX_IMAGE_PIXELS``, else :data:`DEFAULT_MAX_IMAGE_PIXELS`."""
    return _limit(env, ENV_MAX_IMAGE_PIXELS, DEFAULT_MAX_IMAGE_PIXELS)


def max_read_pixels(env: Mapping[str, str] = os.environ) -> int:
    """The segmentation read limit: ``$MSTAR_MAX_READ_PIXELS``, else :data:`DEFAULT_MAX_READ_PIXELS`."""
    return _limit(env, ENV_MAX_READ_PIXELS, DEFAULT_MAX_READ_PIXELS)


def export(name: str, value: int) -> None:
    """Set limit variable ``name`` for this process and the worker processes it starts (``--max-*-pixels``)."""
    os.environ[name] = str(int(value))


def megapixels(n: float) -> str:
    """``n`` pixels for a message: ``1000 pixels``, ``2.5 megapixels``, ``900 megapixels``, ``10.0 gigapixels``."""
    if n >= 1e9:
        return f"{n / 1e9:.1f} gigapixels"
    return f"{n / 1e6:.0f} megapixels" if n >= 1e7 else (f"{n / 1e6:.1f} megapixels" if n >= 1e6 else f"{n:.0f} pixels")
