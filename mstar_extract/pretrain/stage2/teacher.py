"""Stage-2 teacher targets: the frozen stage-1 aggregator re-embeds each slide's patches in whole-slide context.

For every manifest slide the teacher (TransMIL, loaded from the stage-1 teacher export) runs once, in inference
mode and float32, over *all* patch features of the slide's bag; its final-layer token of patch ``i`` is the
512-d target of patch ``i``. Targets are stored per slide and reused by every epoch (and by later runs with the
same teacher).

Targets file ``<targets_dir>/<slide_id>.h5`` (written atomically; format :data:`TARGETS_FORMAT`):

* ``targets``: (N, T) float16 (default) or float32 — row i ↔ row i of the bag;
* ``coords``: (N, 2) int64 — the bag's coordinates (level-0 ``[x, y]`` top-left corners);
* attrs: ``format``, ``slide_id``, ``features_path``, ``features_size``, ``features_mtime_ns`` (identity of the
  bag the targets came from), ``teacher_sha256``, ``target_dim``, ``n_patches``, ``patch_size_level0``,
  ``patch_size`` (0 = unknown), ``mstar_extract_version``, ``created``, and ``complete = 1`` last.

A file is reused when it is complete and its ``teacher_sha256``, ``n_patches`` and bag identity still match;
otherwise it is recomputed. Under torchrun, slide ``i`` of the manifest is computed by rank ``i % world``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mstar_extract import __version__
from mstar_extract.errors import MstarError, UsageError, first_line
from mstar_extract.pretrain.stage1.transmil import TransMIL
from mstar_extract.store.atomic import atomic_path

log = logging.getLogger("mstar")

TARGETS_FORMAT = "mstar-stage2-targets/1"


@dataclass
class SlideEntry:
    """One manifest row of stage 2."""

    slide_id: str
    slide: Path
    """The whole-slide image."""
    features: Path
    """The feature bag (.h5: ``features`` + ``coords``) of frozen patch features."""


@dataclass
class TargetsInfo:
    """What :func:`compute_targets` did on this rank."""

    computed: list[str]
    reused: list[str]


def teacher_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of the teacher file (cached in the tool's cache folder like weights files, keyed by path, size and
    mtime; see :func:`mstar_extract.models.weights.sha256_file`)."""
    from mstar_extract.models.weights import sha256_file

    return sha256_file(path)


def load_teacher(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> TransMIL:
    """The frozen stage-1 aggregator from its export file: eval mode, ``requires_grad=False``, on ``device``."""
    from mstar_extract.pretrain.stage1.export import load_teacher as _load

    p = Path(path)
    if not p.is_file():
        raise UsageError(f"teacher.file: {p}: no such file (export it with `mstar pretrain --stage 1`)")
    model = _load(p)
    model.eval().requires_grad_(False)
    return model.to(device)


def _bag_identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return int(st.st_size), int(st.st_mtime_ns)


def read_bag_features(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features float32 (N, D), coords int64 (N, 2), root attrs) of a bag; MstarError naming the file if bad."""
    from mstar_extract.store.bags import read_bag

    if not path.is_file():
        raise MstarError(f"{path}: feature bag not found")
    try:
        bag = read_bag(path)
    except (OSError, KeyError) as exc:
        raise MstarError(f"{path}: not a readable feature bag ({first_line(exc, with_type=True)})") from None
    feats = np.asarray(bag.features, dtype=np.float32)
    coords = np.asarray(bag.coords, dtype=np.int64).reshape(-1, 2)
    if feats.ndim != 2 or feats.shape[0] != coords.shape[0]:
        raise MstarError(f"{path}: features {feats.shape} and coords {coords.shape} do not match")
    if feats.shape[0] == 0:
        raise MstarError(f"{path}: the bag is empty (no patches); remove the slide from the manifest")
    return feats, coords, bag.attrs


def targets_path(targets_dir: str | os.PathLike[str], slide_id: str) -> Path:
    return Path(targets_dir) / f"{slide_id}.h5"


def targets_valid(path: Path, entry: SlideEntry, teacher_hash: str) -> bool:
    """True when ``path`` holds complete targets of ``entry``'s current bag made by this teacher."""
    import h5py

    if not path.is_file():
        return False
    try:
        size, mtime = _bag_identity(entry.features)
        with h5py.File(path, "r") as f:
            a = f.attrs
            if int(a.get("complete", 0)) != 1 or a.get("format") != TARGETS_FORMAT:
                return False
            if a.get("teacher_sha256") != teacher_hash:
                return False
            if int(a["features_size"]) != size or int(a["features_mtime_ns"]) != mtime:
                return False
            n = int(a["n_patches"])
            return f["targets"].shape[0] == n and f["coords"].shape == (n, 2)
    except (OSError, KeyError, ValueError):
        return False


@torch.inference_mode()
def slide_targets(teacher: TransMIL, features: np.ndarray, device: torch.device | str) -> np.ndarray:
    """Per-patch contextual embeddings (N, T) float32 of one slide's features (N, D), in float32."""
    x = torch.from_numpy(features).to(device=device, dtype=torch.float32).unsqueeze(0)
    _, patches = teacher.patch_embeddings(x)
    out = patches[0].float().cpu().numpy()
    if not np.all(np.isfinite(out)):
        raise MstarError("teacher produced non-finite targets")
    return out


def write_targets(path: Path, entry: SlideEntry, targets: np.ndarray, coords: np.ndarray, teacher_hash: str,
                  bag_attrs: dict[str, Any], dtype: str = "float16") -> None:
    """Write one targets file atomically (see the module docstring for the layout)."""
    import h5py

    size, mtime = _bag_identity(entry.features)
    n, t = targets.shape
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("targets", data=targets.astype(dtype), chunks=(max(1, min(n, 4096)), t))
            f.create_dataset("coords", data=coords.astype(np.int64))
            attrs = {
                "format": TARGETS_FORMAT,
                "slide_id": entry.slide_id,
                "slide_path": str(entry.slide),
                "features_path": str(entry.features),
                "features_size": size,
                "features_mtime_ns": mtime,
                "teacher_sha256": teacher_hash,
                "target_dim": int(t),
                "n_patches": int(n),
                "patch_size_level0": int(bag_attrs.get("patch_size_level0") or 0),
                "patch_size": int(bag_attrs.get("patch_size") or 0),
                "mstar_extract_version": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            for k, v in attrs.items():
                f.attrs[k] = v
            f.attrs["complete"] = 1


def compute_targets(
    entries: Sequence[SlideEntry],
    teacher_file: str | os.PathLike[str],
    targets_dir: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    dtype: str = "float16",
    rank: int = 0,
    world_size: int = 1,
    teacher_hash: str | None = None,
    on_slide: Callable[[str, bool], None] | None = None,
) -> TargetsInfo:
    """Compute the missing/stale targets of this rank's share of ``entries`` (slide i → rank i % world).

    The teacher is loaded only if something needs computing. ``on_slide(slide_id, computed)`` is called after
    each slide of this rank. The caller synchronises ranks afterwards (barrier).
    """
    if dtype not in ("float16", "float32"):
        raise UsageError(f"teacher.dtype must be float16 or float32, got {dtype!r}")
    teacher_hash = teacher_hash or teacher_sha256(teacher_file)
    out = Path(targets_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = TargetsInfo(computed=[], reused=[])
    teacher: TransMIL | None = None
    for i, entry in enumerate(entries):
        if i % world_size != rank:
            continue
        path = targets_path(out, entry.slide_id)
        if targets_valid(path, entry, teacher_hash):
            info.reused.append(entry.slide_id)
            if on_slide:
                on_slide(entry.slide_id, False)
            continue
        feats, coords, attrs = read_bag_features(entry.features)
        if teacher is None:
            teacher = load_teacher(teacher_file, device)
        in_dim = getattr(teacher, "in_dim", feats.shape[1])
        if feats.shape[1] != in_dim:
            raise MstarError(f"{entry.features}: features are {feats.shape[1]}-d but the teacher expects {in_dim}-d")
        try:
            targets = slide_targets(teacher, feats, device)
        except MstarError as exc:
            raise MstarError(f"{entry.features}: {exc}") from None
        write_targets(path, entry, targets, coords, teacher_hash, attrs, dtype)
        info.computed.append(entry.slide_id)
        log.info("targets: %s (%d patches)", entry.slide_id, len(coords))
        if on_slide:
            on_slide(entry.slide_id, True)
    return info


def read_targets(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(targets float32 (N, T), coords (N, 2), attrs) of one targets file."""
    import h5py

    with h5py.File(path, "r") as f:
        t = f["targets"][()].astype(np.float32)
        c = f["coords"][()].astype(np.int64)
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    return t, c, attrs
