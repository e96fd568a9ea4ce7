"""Tiling: patch coordinates at a target resolution, in level-0 pixels, and the exact read plan.

(The grid computation is filled in by the tiling work; :class:`ReadPlan` is the contract between tiling,
coordinate files, the reader and the feature store.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ReadPlan:
    """Exactly how to read every patch of one slide.

    For patch ``i``: read a ``read_size`` x ``read_size`` region at pyramid ``level`` whose top-left corner is
    ``coords[i]`` (level-0 pixels). That region covers ``patch_size_level0`` level-0 pixels, i.e. ``patch_size``
    pixels at the target resolution; the reader resizes it (antialiased) to the model input size.
    """

    coords: np.ndarray
    """(N, 2) int64 ``[x, y]`` top-left corners in level-0 pixels."""
    level: int
    """Pyramid level the pixels are read from."""
    level_downsample: float
    """That level's downsample relative to level 0."""
    read_size: int
    """Square region size in pixels at ``level``."""
    patch_size: int
    """Patch size in pixels at the target resolution (e.g. 256 at 20x)."""
    patch_size_level0: int
    """Patch footprint in level-0 pixels."""
    target_mpp: float
    target_magnification: float | None
    level0_mpp: float | None
    level0_magnification: float | None
    level0_width: int
    level0_height: int
    overlap: int = 0
    """Overlap between neighbouring patches, in pixels at the target resolution."""
    source: str = "mstar"
    """Where the coordinates came from: ``mstar`` (this tool's tiling), ``clam``, ``trident``."""
    settings: dict = field(default_factory=dict)
    """Segmentation/tiling settings used (recorded as JSON in output files)."""

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return int(self.coords.shape[0])
