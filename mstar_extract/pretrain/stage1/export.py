"""Exports of the trained stage-1 aggregator.

1. **Stage-2 teacher** (``teacher.pt``, :func:`export_teacher` / :func:`load_teacher`): a dict
   ``{"format": "mstar-stage1-teacher", "version": 1, "aggregator": {AggregatorConfig fields},
   "state_dict": {TransMIL keys: tensors}, "meta": {...}}``. ``load_teacher`` rebuilds the frozen
   :class:`~mstar_extract.pretrain.stage1.transmil.TransMIL` in eval mode; stage 2 calls
   ``teacher.patch_embeddings(features)`` for per-patch 512-d targets.
2. **mSTAR downstream layout** (``aggregator_mstar.pth``, :func:`export_mstar`):
   ``{"model_state_dict": {"vision_encoder.<TransMIL key>": tensor}}`` — what mSTAR's own downstream code
   loads for its pretrained TransMIL (it strips ``module.`` and ``vision_encoder.``; its classifier head stays
   untrained).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mstar_extract.errors import MstarError, first_line
from mstar_extract.pretrain.stage1.config import AggregatorConfig
from mstar_extract.pretrain.stage1.transmil import TransMIL, build_transmil
from mstar_extract.store.atomic import atomic_path

TEACHER_FORMAT = "mstar-stage1-teacher"
MSTAR_PREFIX = "vision_encoder."


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def export_teacher(aggregator: TransMIL, aggregator_cfg: dict[str, Any], path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write the stage-2 teacher file atomically."""
    obj = {"format": TEACHER_FORMAT, "version": 1, "aggregator": dict(aggregator_cfg), "state_dict": _cpu_state(aggregator), "meta": meta or {}}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_teacher(path: str | Path, map_location: str | torch.device = "cpu") -> TransMIL:
    """The frozen aggregator of a teacher file (eval mode, no gradients).

    The file is read with ``weights_only=True`` (:func:`~mstar_extract.pretrain.checkpoint.load_torch_file`): a
    file holding anything but tensors and plain data is refused, one line, without running it."""
    from mstar_extract.pretrain.checkpoint import load_torch_file

    obj = load_torch_file(path, "teacher file", map_location)
    if not isinstance(obj, dict) or obj.get("format") != TEACHER_FORMAT:
        raise MstarError(f"{path}: not a stage-1 teacher file (format {obj.get('format') if isinstance(obj, dict) else None!r})")
    try:
        model = build_transmil(AggregatorConfig(**obj["aggregator"]))
        model.load_state_dict(obj["state_dict"], strict=True)
    except (TypeError, KeyError, RuntimeError) as exc:
        raise MstarError(f"{path}: teacher weights do not fit its aggregator config ({first_line(exc)})") from None
    model.eval().requires_grad_(False)
    return model


def export_mstar(aggregator: TransMIL, path: str | Path) -> Path:
    """Write ``{"model_state_dict": {"vision_encoder.<key>": ...}}`` atomically."""
    obj = {"model_state_dict": {MSTAR_PREFIX + k: v for k, v in _cpu_state(aggregator).items()}}
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def mstar_to_transmil_state(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Keys of an mSTAR-layout file as :class:`TransMIL` keys (the same stripping mSTAR's loader does)."""
    sd = obj["model_state_dict"]
    return {k.replace("module.", "").replace(MSTAR_PREFIX, ""): v for k, v in sd.items() if MSTAR_PREFIX in k}

