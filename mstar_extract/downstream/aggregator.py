"""The stage-1 slide aggregator as a slide encoder: one embedding per slide from all of its patch features.

:meth:`SlideEncoder.load` reads any of the aggregator exports (with ``torch.load(weights_only=True)``):

* ``teacher.pt`` of ``mstar pretrain --stage 1`` (format ``mstar-stage1-teacher``: config + TransMIL weights);
* ``aggregator_mstar.pth`` (``{"model_state_dict": {"vision_encoder.<key>": ...}}``, mSTAR's downstream layout),
  with its ``aggregator`` config when we wrote it; without one (a file from elsewhere) the sizes are read from
  the weights (input and model width, heads, value-residual kernel) and the rest takes TransMIL's values
  (``dim / 2`` landmarks, 6 pseudo-inverse iterations).

Both of ours record ``feature_model`` = ``{"model", "weights_sha256", "feature_dim"}`` of the bags the aggregator
was trained on; :meth:`SlideEncoder.bag_problem` then refuses a bag of another extractor or other weights (an
aggregator trained on UNI features says nothing about mSTAR features). Without a record only the feature size
is checked.

The embedding (:meth:`SlideEncoder.embed`) is the CLS output of TransMIL in eval mode (no dropout), in float32,
over **all** patches of the bag in bag order (the PPEG grid follows the sequence): deterministic, no sampling.
Nyström attention keeps memory linear in the number of patches (measured in docs/downstream.md).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mstar_extract.errors import MstarError, UsageError, first_line

if TYPE_CHECKING:
    from mstar_extract.pretrain.stage1.transmil import TransMIL

FEATURE_KEYS = ("model", "weights_sha256")


def _infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """An aggregator config from TransMIL weights alone (see the module docstring)."""
    fc = state["_fc1.0.weight"]
    res = state.get("layer1.attn.res_conv.weight")
    dim = int(fc.shape[0])
    heads = int(res.shape[0]) if res is not None else 8
    return {"in_dim": int(fc.shape[1]), "dim": dim, "heads": heads, "landmarks": dim // 2, "pinv_iterations": 6,
            "residual_conv_kernel": int(res.shape[2]) if res is not None else 0}


def _parts(obj: Any, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None]:
    """(aggregator config, TransMIL state dict, feature_model record) of a loaded export."""
    from mstar_extract.pretrain.stage1.export import TEACHER_FORMAT, mstar_to_transmil_state

    if not isinstance(obj, dict):
        raise MstarError(f"{where}: not an aggregator export")
    if obj.get("format") == TEACHER_FORMAT:
        return dict(obj["aggregator"]), obj["state_dict"], obj.get("feature_model")
    if isinstance(obj.get("model_state_dict"), dict):
        state = mstar_to_transmil_state(obj)
        if "_fc1.0.weight" not in state:
            raise MstarError(f"{where}: model_state_dict has no vision_encoder._fc1.0.weight (not a TransMIL aggregator)")
        cfg = dict(obj["aggregator"]) if isinstance(obj.get("aggregator"), dict) else _infer_config(state)
        return cfg, state, obj.get("feature_model")
    raise MstarError(f"{where}: neither a stage-1 teacher.pt nor an aggregator in mSTAR's layout")


@dataclass
class SlideEncoder:
    """A frozen aggregator on a device, with where it came from."""

    model: TransMIL
    path: Path
    sha256: str
    feature_model: dict[str, Any] | None
    device: torch.device

    @property
    def in_dim(self) -> int:
        return int(self.model.in_dim)

    @property
    def dim(self) -> int:
        return int(self.model.dim)

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str | torch.device = "auto") -> SlideEncoder:
        """Read an aggregator export (UsageError when missing; MstarError, one line, when unusable)."""
        from mstar_extract.models.encoder import resolve_device
        from mstar_extract.models.weights import sha256_file
        from mstar_extract.pretrain.checkpoint import load_torch_file
        from mstar_extract.pretrain.stage1.config import AggregatorConfig
        from mstar_extract.pretrain.stage1.transmil import build_transmil

        p = Path(path)
        if not p.is_file():
            raise UsageError(f"{p}: aggregator file not found")
        cfg, state, feature_model = _parts(load_torch_file(p, "aggregator", "cpu"), str(p))
        try:
            model = build_transmil(AggregatorConfig(**cfg))
            model.load_state_dict(state, strict=True)
        except (TypeError, KeyError, RuntimeError) as exc:
            raise MstarError(f"{p}: aggregator weights do not fit its config ({first_line(exc)})") from None
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        model.eval().requires_grad_(False).to(dev)
        return cls(model, p, sha256_file(p), feature_model if isinstance(feature_model, dict) else None, dev)

    def bag_problem(self, attrs: Mapping[str, Any], feature_dim: int) -> str | None:
        """Why a bag with these root attrs cannot be embedded by this aggregator, or None."""
        if feature_dim != self.in_dim:
            return f"features are {feature_dim}-d, the aggregator takes {self.in_dim}-d features"
        fm = self.feature_model
        if fm is None:
            return None
        have = {k: attrs.get(k) for k in FEATURE_KEYS}
        if any(have[k] != fm.get(k) for k in FEATURE_KEYS):
            return (f"features from model {have['model']} (weights {str(have['weights_sha256'])[:12]}), but the "
                    f"aggregator was trained on {fm.get('model')} (weights {str(fm.get('weights_sha256'))[:12]}) "
                    f"features ({self.path})")
        return None

    def extractor_problem(self, model: str, weights_sha256: str, feature_dim: int) -> str | None:
        """Why bags of this patch extractor cannot be embedded (``mstar extract --slide-encoder``), or None."""
        return self.bag_problem({"model": model, "weights_sha256": weights_sha256}, feature_dim)

    def embed(self, features: np.ndarray) -> np.ndarray:
        """The slide embedding (dim,) float32 of a bag's features (N, in_dim), N ≥ 1."""
        with torch.inference_mode():
            x = torch.as_tensor(np.asarray(features), dtype=torch.float32).to(self.device)[None]
            return self.model(x)[0].float().cpu().numpy()
