"""The one typed surface that every slide reader backend implements (OpenSlide-like, numpy out).

Coordinates: ``location`` is always (x, y) in level-0 pixels; ``size`` is (width, height) in pixels *at the
requested level*. Pixels come back as ``uint8`` RGB arrays of shape (height, width, 3), transparent or
out-of-slide areas composited onto white.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from mstar_extract.errors import ResolutionError

MppSource = Literal["metadata", "objective", "override"]


@dataclass(frozen=True)
class Level:
    """One pyramid level: its size in pixels and its downsample relative to level 0."""

    width: int
    height: int
    downsample: float


class Slide(ABC):
    """An open whole-slide image. Use as a context manager; backends subclass this.

    Subclasses set the attributes below in ``__init__`` and implement ``_read_region`` and ``close``.
    """

    path: Path
    backend: str
    """``openslide``, ``tiffslide`` or ``image``."""
    vendor: str | None
    levels: tuple[Level, ...]
    mpp_x: float | None
    """Level-0 µm per pixel along x, after resolution rules (metadata, objective estimate, override)."""
    mpp_y: float | None
    mpp_source: MppSource | None
    """Where ``mpp_x``/``mpp_y`` came from; ``objective`` means estimated as 10 / magnification."""
    objective_magnification: float | None
    associated_images: tuple[str, ...]
    properties: dict[str, str]

    # -- geometry ---------------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.levels[0].width, self.levels[0].height

    @property
    def level_count(self) -> int:
        return len(self.levels)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        return tuple((lv.width, lv.height) for lv in self.levels)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return tuple(lv.downsample for lv in self.levels)

    @property
    def mpp(self) -> float:
        """Level-0 µm/px (mean of x and y); raises :class:`ResolutionError` with how to provide it."""
        if self.mpp_x is None or self.mpp_y is None:
            raise ResolutionError(
                self.path,
                "no resolution (mpp) in the file's metadata; give it with --mpp-override MPP "
                "or an 'mpp' column in a CSV slide list",
            )
        return (self.mpp_x + self.mpp_y) / 2.0

    @property
    def mpp_estimated(self) -> bool:
        return self.mpp_source == "objective"

    def get_best_level_for_downsample(self, downsample: float) -> int:
        """The coarsest level whose downsample is <= ``downsample`` (OpenSlide's rule)."""
        best = 0
        for i, lv in enumerate(self.levels):
            if lv.downsample <= downsample * (1 + 1e-6):
                best = i
        return best

    # -- pixels -----------------------------------------------------------------------------------------
    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of ``size`` at ``level``, top-left at level-0 ``location``; outside = white."""
        if not 0 <= level < len(self.levels):
            raise ValueError(f"level {level} out of range 0..{len(self.levels) - 1}")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"size must be positive, got {size}")
        return self._read_region((int(location[0]), int(location[1])), level, (w, h))

    @abstractmethod
    def _read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray: ...

    def get_thumbnail(self, size: tuple[int, int]) -> np.ndarray:
        """RGB uint8 thumbnail that fits in ``size`` (w, h), keeping the aspect ratio. Memory stays bounded for
        any slide: a large level is read in strips (:mod:`mstar_extract.slides.downsample`)."""
        import cv2

        from mstar_extract.slides.downsample import read_downsampled

        w0, h0 = self.dimensions
        scale = max(w0 / size[0], h0 / size[1], 1.0)
        tw, th = max(1, round(w0 / scale)), max(1, round(h0 / scale))
        img = read_downsampled(self, scale).image
        if (img.shape[1], img.shape[0]) != (tw, th):
            img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
        return img

    def read_associated_image(self, name: str) -> np.ndarray:
        """An associated image (label, macro, thumbnail) as RGB uint8; KeyError if absent."""
        raise KeyError(name)

    # -- lifetime ---------------------------------------------------------------------------------------
    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path.name!s} {self.dimensions} backend={self.backend}>"
