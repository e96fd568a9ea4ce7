"""Exports of the trained stage-1 aggregator.

1. **Stage-2 teacher** (``teacher.pt``, :func:`export_teacher` / :func:`load_teacher`): a dict
   ``{"format": "mstar-stage1-teacher", "version": 1, "aggregator": {AggregatorConfig fields},
   "state_dict": {TransMIL keys: tensors}, "meta": {...}}``. ``load_teacher`` rebuilds the frozen
   :class:`~mstar_extract.pretrain.stage1.transmil.TransMIL` in eval mode; stage 2 calls
   ``teacher.patch_embeddings(features)`` for per-patch 512-d targets.
2. **mSTAR downstream layout** (``aggregator_mstar.pth``, :func:`export_mstar`):
   ``{"model_state_dict": {"vision_encoder.<TransMIL key>": tensor}}`` — what mSTAR's own downstream code
   loads for its pretrained TransMIL (it strips ``module.`` and ``vision_encoder.``; its classifier head stays
   untrained). The file also holds ``aggregator`` (the config) and ``feature_model`` (below), which mSTAR's
   loader ignores and ``mstar embed-slides --aggregator`` reads.
3. **Report encoder** (``text_mstar.pth``, :func:`export_text`): the text tower in the official zero-shot layout
   (:mod:`mstar_extract.pretrain.textexport`).

``feature_model`` (in files 1 and 2) records the patch features the aggregator was trained on — ``{"model",
"weights_sha256", "feature_dim"}`` from the bags' attributes, or None when the bags do not say (or disagree) —
so a slide embedding of bags from another extractor is refused (:mod:`mstar_extract.downstream.aggregator`).
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


def feature_model_of(bags: list[Path]) -> tuple[dict[str, Any] | None, str | None]:
    """(``feature_model`` record, a warning or None) from the ``model``/``weights_sha256`` attrs of ``bags``."""
    import h5py

    seen: set[tuple[str, str, int]] = set()
    for bag in bags:
        try:
            with h5py.File(bag, "r") as f:
                model, sha = f.attrs.get("model"), f.attrs.get("weights_sha256")
                dim = int(f["features"].shape[1])
        except (OSError, KeyError) as exc:
            return None, f"{bag}: cannot read its attributes ({first_line(exc)}); the feature model is not recorded"
        if model is None or sha is None:
            return None, None  # bags without provenance (e.g. generated ones): nothing to record
        seen.add((str(model.decode() if isinstance(model, bytes) else model),
                  str(sha.decode() if isinstance(sha, bytes) else sha), dim))
    if len(seen) != 1:
        models = ", ".join(sorted(f"{m} ({s[:12]})" for m, s, _ in seen))
        return None, (f"the bags come from {len(seen)} feature models ({models}); the aggregator records none, so "
                      "slide embeddings cannot check their bags") if seen else None
    model, sha, dim = seen.pop()
    return {"model": model, "weights_sha256": sha, "feature_dim": dim}, None


def export_teacher(aggregator: TransMIL, aggregator_cfg: dict[str, Any], path: str | Path, meta: dict[str, Any] | None = None,
                   feature_model: dict[str, Any] | None = None) -> Path:
    """Write the stage-2 teacher file atomically."""
    obj = {"format": TEACHER_FORMAT, "version": 1, "aggregator": dict(aggregator_cfg), "state_dict": _cpu_state(aggregator),
           "meta": meta or {}, "feature_model": feature_model}
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


def export_mstar(aggregator: TransMIL, path: str | Path, aggregator_cfg: dict[str, Any] | None = None,
                 feature_model: dict[str, Any] | None = None) -> Path:
    """Write ``{"model_state_dict": {"vision_encoder.<key>": ...}, "aggregator": ..., "feature_model": ...}``
    atomically."""
    obj: dict[str, Any] = {"model_state_dict": {MSTAR_PREFIX + k: v for k, v in _cpu_state(aggregator).items()}}
    if aggregator_cfg is not None:
        obj["aggregator"] = dict(aggregator_cfg)
    obj["feature_model"] = feature_model
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def mstar_to_transmil_state(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Keys of an mSTAR-layout file as :class:`TransMIL` keys (the same stripping mSTAR's loader does)."""
    sd = obj["model_state_dict"]
    return {k.replace("module.", "").replace(MSTAR_PREFIX, ""): v for k, v in sd.items() if MSTAR_PREFIX in k}



def export_text(text: Any, tokenizer: Any, text_cfg: Any, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``text_mstar.pth`` (:mod:`mstar_extract.pretrain.textexport`) atomically."""
    from mstar_extract.pretrain.textexport import text_export, write_text_export

    return write_text_export(path, text_export(text, tokenizer, text_cfg.model, text_cfg.max_tokens, meta))
