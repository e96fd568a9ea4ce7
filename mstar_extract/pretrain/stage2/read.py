"""Stage-2 patch reading: the project's :class:`~mstar_extract.reading.reader.PatchReader` over a bag's coordinates.

A feature bag records where its patches are (level-0 ``coords``, footprint ``patch_size_level0``, size at the
target ``patch_size``); :func:`plan_for_coords` turns that into a :class:`~mstar_extract.tiling.ReadPlan` by the
tiling rule (coarsest level that does not upsample, :func:`~mstar_extract.tiling.choose_level`), so training
patches are read and resized exactly as extraction read them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mstar_extract.slides.base import Slide
from mstar_extract.tiling import ReadPlan, choose_level

TILE_CACHE_MB = 32
"""Decoded-tile cache per open slide: training reads scattered patches, so a small cache suffices and bounds the
memory of workers x open slides."""


def plan_for_coords(slide: Slide, coords: np.ndarray, patch_size_level0: int, patch_size: int | None) -> ReadPlan:
    """A read plan for ``coords`` on an open slide (``patch_size`` = target px; None = read at level 0)."""
    ds = patch_size_level0 / patch_size if patch_size else 1.0
    level = choose_level(slide.level_downsamples, ds)
    level_ds = float(slide.level_downsamples[level])
    w0, h0 = slide.dimensions
    return ReadPlan(
        coords=np.asarray(coords, np.int64),
        level=level,
        level_downsample=level_ds,
        read_size=max(1, int(round(patch_size_level0 / level_ds))),
        patch_size=int(patch_size or patch_size_level0),
        patch_size_level0=int(patch_size_level0),
        target_mpp=float("nan"),
        target_magnification=None,
        level0_mpp=None,
        level0_magnification=None,
        level0_width=int(w0),
        level0_height=int(h0),
        source="bag",
    )


class BagPatchReader:
    """Reads rows of one slide's bag coordinates as model-ready uint8 patches (owns the slide and reader)."""

    def __init__(self, slide_path: str | os.PathLike[str], coords: np.ndarray, patch_size_level0: int,
                 patch_size: int | None, out_size: int = 224, backend: str = "auto") -> None:
        from mstar_extract.reading.reader import PatchReader
        from mstar_extract.slides import open_slide

        self.path = Path(slide_path)
        self.slide = open_slide(self.path, backend=backend)
        try:
            self.plan = plan_for_coords(self.slide, coords, patch_size_level0, patch_size)
            self.reader = PatchReader(self.plan, self.slide, backend=backend, out_size=out_size,
                                      skip_bad_patches=True, tile_cache_mb=TILE_CACHE_MB)
        except BaseException:
            self.slide.close()
            raise

    def read_rows(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Patches of bag rows ``rows`` into ``out[:k]`` (in the order of ``rows``); returns the k rows read.

        A patch whose pixels cannot be decoded is left out (logged by the reader) instead of stopping training.
        """
        batch = self.reader.read_batch(np.asarray(rows, np.int64), out=out)
        return np.asarray(batch.indices, np.int64)

    def close(self) -> None:
        self.reader.close()
        self.slide.close()


def open_patch_reader(slide_path: str | os.PathLike[str], coords: np.ndarray, patch_size_level0: int,
                      out_size: int = 224, backend: str = "auto", patch_size: int | None = None) -> BagPatchReader:
    """A :class:`BagPatchReader` for one slide."""
    return BagPatchReader(slide_path, coords, patch_size_level0, patch_size, out_size, backend)
