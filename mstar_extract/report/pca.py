"""A run-wide PCA of patch features to 3 components, used to paint each bag's patches as colours.

The basis is fitted once over the run on a bounded random sample of patches (at most :data:`MAX_BAGS` bags,
:data:`MAX_PATCHES` patches in all, a fixed seed), so one colour means the same direction of feature space on
every slide of the run. Components are the top-3 eigenvectors of the sample covariance (numpy), each with its
sign fixed (largest loading positive); each is mapped to a colour channel between its 1st and 99th percentile.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_BAGS = 256
"""At most this many bags are opened to draw the sample."""
MAX_PATCHES = 10_000
"""At most this many patches in the sample (spread evenly over the sampled bags)."""
FREEZE_BAGS = 64
"""Once fitted over this many bags, the basis stays as it is (new bags are painted with it; ``--rebuild``
refits). Before that it is refitted whenever the number of bags has doubled since the last fit."""
CHUNK_ROWS = 8192


@dataclass
class Basis:
    """Mean, 3 components and colour ranges of the run's features; ``fingerprint`` = model|weights|dim."""

    mean: np.ndarray
    components: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    fingerprint: str
    n_bags: int
    n_sample: int

    @property
    def key(self) -> str:
        """Identifies the basis (maps painted with another key are repainted)."""
        h = hashlib.sha1(self.fingerprint.encode("utf-8"))
        for a in (self.mean, self.components, self.lo, self.hi):
            h.update(np.ascontiguousarray(a, np.float32).tobytes())
        return h.hexdigest()[:12]

    def project(self, features: np.ndarray) -> np.ndarray:
        """(N, 3) float32 coordinates of ``features`` (N, D) on the components."""
        return (np.asarray(features, np.float32) - self.mean) @ self.components.T

    def colours(self, features: np.ndarray) -> np.ndarray:
        """(N, 3) uint8 RGB: each component scaled from its [1st, 99th] percentile of the sample to [0, 255]."""
        p = self.project(features)
        span = np.where(self.hi > self.lo, self.hi - self.lo, 1.0)
        return np.clip(np.rint((p - self.lo) / span * 255.0), 0, 255).astype(np.uint8)

    def needs_refit(self, fingerprint: str, n_bags: int) -> bool:
        if fingerprint != self.fingerprint:
            return True
        return self.n_bags < FREEZE_BAGS and n_bags >= 2 * self.n_bags

    def save(self, path: Path) -> None:
        import io

        from mstar_extract.report.files import write_bytes

        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, components=self.components, lo=self.lo, hi=self.hi,
                 fingerprint=np.array(self.fingerprint), n_bags=np.int64(self.n_bags), n_sample=np.int64(self.n_sample))
        write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> Basis | None:
        try:
            with np.load(path) as z:
                return cls(z["mean"], z["components"], z["lo"], z["hi"], str(z["fingerprint"]), int(z["n_bags"]),
                           int(z["n_sample"]))
        except Exception:  # noqa: BLE001 - a damaged basis file is refitted
            return None


def _sample_bag(path: str | os.PathLike[str], k: int, rng: np.random.Generator) -> np.ndarray | None:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            ds = f["features"]
            n = int(ds.shape[0])
            if n == 0:
                return None
            idx = np.sort(rng.choice(n, size=min(k, n), replace=False))
            rows = ds[()][idx] if n <= 4 * k else ds[idx.tolist()]
    except (OSError, KeyError, ValueError):
        return None
    return np.asarray(rows, np.float32)


def fit_basis(bags: Sequence[os.PathLike[str]], fingerprint: str, n_bags_total: int | None = None,
              seed: int = 0) -> Basis | None:
    """Fit the basis over a random sample of patches of ``bags`` (sorted first, so every process that sees the
    same bags fits the same basis); None when they hold no patch."""
    rng = np.random.default_rng(seed)
    chosen = sorted(map(str, bags))
    if len(chosen) > MAX_BAGS:
        chosen = sorted(rng.choice(chosen, size=MAX_BAGS, replace=False).tolist())
    k = max(1, math.ceil(MAX_PATCHES / max(1, len(chosen))))
    parts = [s for s in (_sample_bag(p, k, rng) for p in chosen) if s is not None]
    if not parts:
        return None
    x = np.concatenate(parts).astype(np.float64)
    mean = x.mean(0)
    xc = x - mean
    vals, vecs = np.linalg.eigh(xc.T @ xc)
    comps = vecs[:, ::-1][:, :3].T
    if comps.shape[0] < 3:  # fewer than 3 feature dimensions
        comps = np.vstack([comps, np.zeros((3 - comps.shape[0], x.shape[1]))])
    signs = np.sign(comps[np.arange(3), np.abs(comps).argmax(1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    proj = xc @ comps.T
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    return Basis(mean.astype(np.float32), comps.astype(np.float32), lo.astype(np.float32), hi.astype(np.float32),
                 fingerprint, int(n_bags_total if n_bags_total is not None else len(bags)), int(x.shape[0]))


def bag_colours(path: os.PathLike[str], basis: Basis) -> tuple[np.ndarray, np.ndarray]:
    """(coords (N, 2) int64, colours (N, 3) uint8) of every patch of a bag, projected chunk by chunk."""
    import h5py

    with h5py.File(path, "r") as f:
        feats, coords = f["features"], np.asarray(f["coords"][()], np.int64).reshape(-1, 2)
        n = int(feats.shape[0])
        colours = np.zeros((n, 3), np.uint8)
        for s in range(0, n, CHUNK_ROWS):
            colours[s : s + CHUNK_ROWS] = basis.colours(feats[s : s + CHUNK_ROWS])
    return coords, colours
