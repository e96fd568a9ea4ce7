"""The result of tissue detection: masks at a low resolution plus level-0 contours (what tiling consumes)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mstar_extract.tissue.contours import TissueContour


@dataclass
class TissueMask:
    """Tissue of one slide.

    Mask pixel ``(i, j)`` covers level-0 pixels ``[j*scale_x, (j+1)*scale_x) x [i*scale_y, (i+1)*scale_y)``.
    ``tissue`` excludes holes, pen ink and dark artefacts; ``holes`` are the excluded lumina/fat (and ink
    enclosed by tissue) inside tissue contours.
    """

    tissue: np.ndarray
    holes: np.ndarray
    pen: np.ndarray
    artefact: np.ndarray
    scale_x: float
    scale_y: float
    mask_mpp: float | None
    contours: list[TissueContour] = field(default_factory=list)
    thumbnail: np.ndarray | None = None
    """The RGB image segmentation ran on (same shape as the masks), when there was one."""
    source: str = "segmented"
    """``segmented``, ``geojson`` or ``mask-image``."""
    stats: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.tissue.shape[0]), int(self.tissue.shape[1]))

    @property
    def is_empty(self) -> bool:
        return not bool(self.tissue.any())

    @property
    def tissue_area_um2(self) -> float | None:
        if self.mask_mpp is None:
            return None
        return float(self.tissue.sum()) * self.mask_mpp * self.mask_mpp

    @property
    def ink_fraction(self) -> float:
        """Share of the specimen area (tissue + pen ink; the tissue mask excludes ink) that is covered by ink."""
        ink, tissue = int(self.pen.sum()), int(self.tissue.sum())
        return ink / (ink + tissue) if ink + tissue else 0.0

    def summary(self) -> dict:
        """Small JSON-able facts for logs and QC captions."""
        return {
            "source": self.source,
            "mask_shape": list(self.shape),
            "mask_mpp": self.mask_mpp,
            "n_contours": len(self.contours),
            "n_holes": int(sum(len(c.holes) for c in self.contours)),
            "tissue_fraction": float(self.tissue.mean()) if self.tissue.size else 0.0,
            "pen_fraction": float(self.pen.mean()) if self.pen.size else 0.0,
            "tissue_area_mm2": None if self.tissue_area_um2 is None else self.tissue_area_um2 / 1e6,
            "ink_fraction": self.ink_fraction,
            **{k: v for k, v in self.stats.items() if isinstance(v, (int, float, str))},
        }
