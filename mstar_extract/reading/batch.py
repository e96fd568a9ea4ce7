"""What the reader produces: batches of model-ready uint8 patches with their row indices."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class PatchBatch:
    """One batch of patches of one slide.

    ``pixels[k]`` is the patch of plan row ``indices[k]`` (top-left ``coords[k]`` in level-0 pixels), resized
    to the model input size, RGB uint8 (B, S, S, 3). Patches that could not be decoded (only with
    ``skip_bad_patches``) are not in ``pixels``; their plan rows are in ``bad_indices``.

    From a :class:`~mstar_extract.reading.pool.ReaderPool`, ``pixels`` may be a view of a shared-memory slot
    that is reused once the consumer asks for the next batch: copy it (or move it to the device) first.
    """

    indices: np.ndarray
    """(B,) int64 plan rows of the patches in ``pixels``."""
    pixels: np.ndarray
    """(B, S, S, 3) uint8 RGB."""
    coords: np.ndarray
    """(B, 2) int64 level-0 top-left [x, y]."""
    bad_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Plan rows dropped because their pixels could not be decoded (``skip_bad_patches`` only)."""
    bad_reasons: list[str] = field(default_factory=list)
    """One message per entry of ``bad_indices``."""

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def copy(self) -> PatchBatch:
        """A batch that owns its memory (safe to keep after the pool moves on)."""
        return PatchBatch(self.indices.copy(), self.pixels.copy(), self.coords.copy(), self.bad_indices.copy(),
                          list(self.bad_reasons))
