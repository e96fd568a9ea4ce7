"""Which settings define OUT's outputs: the one list of keys recorded in ``OUT/mstar_settings.json``.

:func:`run_record` builds the record of a ``tile`` or ``extract`` run; :mod:`mstar_extract.store.record`
compares it with what OUT holds and stores it. Deliberately not recorded: settings that do not change what is
written (``--backend``, ``--workers``, ``--qc``, ``--format``: pt files are extra copies, ``--device``,
``--batch-size``, ``--precision``: chosen per machine) and ``--mpp-override`` (it applies only to slides that
lack resolution metadata, and adding it on a rerun is how such slides get done).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from mstar_extract.pipeline.extract_job import ExtractSettings
    from mstar_extract.pipeline.tile_job import TileSettings


def output_record(tile: TileSettings) -> dict[str, Any]:
    """OUT's layout (``--layout``) and what names its folders (TRIDENT's ``<mag>x_<ps>px_<overlap>px_overlap``):
    recorded by every run, ``--coords-dir`` ones too, since it decides where every file goes."""
    from mstar_extract.pipeline.tile_job import layout_for

    return layout_for(".", tile).recorded()


def tiling_record(tile: TileSettings) -> dict[str, Any]:
    """The settings that decide a slide's coordinates (and so its QC picture, contours and bag)."""
    t = tile.tiling
    return {
        "patch_size": int(t.patch_size),
        "overlap": int(t.overlap),
        "target_mpp": float(t.target()[0]),
        "exact_mpp": bool(t.exact_mpp),
        "snap_tolerance": float(t.snap_tolerance),
        "min_tissue": float(t.min_tissue),
        "coords_format": tile.coords_format,
        "tissue_mask": os.path.abspath(tile.tissue_mask) if tile.tissue_mask else None,
        "segmentation": tile.segmentation.to_dict(),
    }


def features_record(settings: ExtractSettings, weights_sha256: str | None = None) -> dict[str, Any]:
    """The settings that decide the features of a bag. ``weights_sha256`` is known once the weights are
    resolved; without it the key is left out (and not compared)."""
    rec: dict[str, Any] = {
        "model": settings.model,
        "dtype": settings.dtype,
        "decode": settings.decode,
    }
    if weights_sha256 is not None:
        rec["weights_sha256"] = weights_sha256
    return rec


def run_record(tile: TileSettings, extract: ExtractSettings | None = None,
               weights_sha256: str | None = None) -> dict[str, dict[str, Any]]:
    """The record groups a run defines: ``output`` (always), ``tiling`` (unless ``--coords-dir`` brings the
    coordinates) and, for ``extract``, ``features``."""
    groups: dict[str, dict[str, Any]] = {"output": output_record(tile)}
    if extract is None or not extract.coords_dir:
        groups["tiling"] = tiling_record(tile)
    if extract is not None:
        groups["features"] = features_record(extract, weights_sha256)
    return groups
