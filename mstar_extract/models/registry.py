"""The encoder registry: which network each ``--model`` name builds, and where its weights live (docs/models.md).

Names:

* ``mstar`` (default) — mSTAR's released patch extractor: timm ``vit_large_patch16_224`` with
  ``img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True``; 1024-d.
  Weights: Hugging Face hub ``Wangyh/mSTAR`` (gated), file ``mSTAR.pth``.
* ``uni`` — MahmoodLab/UNI, the same architecture; the frozen extractor of mSTAR's stage 1.
  Weights: ``MahmoodLab/UNI`` (gated), file ``pytorch_model.bin``.
* ``timm:<name>`` — any timm model (``num_classes=0``), with its own ``pretrained_cfg`` mean/std/input size
  and, for ``--weights hf``, its own hub repo (``model.safetensors``).

This module is the single source of truth for the built-in entries; ``weights/registry.json`` is the same
data for people and other tools (a test keeps the two identical; :func:`registry_json` writes it).
Importing this module does not import torch or timm.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from mstar_extract.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

DEFAULT_MODEL = "mstar"
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build one patch encoder and find its weights."""

    name: str
    """Registry name (``mstar``, ``uni``, ``timm:<name>``)."""
    architecture: str
    """timm model name passed to ``timm.create_model``."""
    kwargs: dict[str, Any]
    """Keyword arguments of ``timm.create_model`` (always includes ``num_classes=0``)."""
    feature_dim: int
    """Length of one feature vector."""
    input_size: int = 224
    """Square side, in pixels, of the network input."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    hub_repo: str | None = None
    """Hugging Face hub repository of the weights (``None``: no hub weights known)."""
    hub_filename: str | None = None
    """File in ``hub_repo`` holding the state dict."""
    licence: str = "unknown"
    sha256: str | None = None
    """sha256 of ``hub_filename`` when known (checked by ``mstar weights verify``), else ``None``."""
    gated: bool = False
    """The hub repository requires an access request (HF token needed)."""
    ignore_keys: tuple[str, ...] = field(default=())
    """State-dict key prefixes dropped before the strict load (only the classifier of ``timm:`` models,
    which ``num_classes=0`` replaces by an identity)."""
    notes: str = ""

    @property
    def hub_url(self) -> str | None:
        """The repository's page, where gated access is requested."""
        return f"https://huggingface.co/{self.hub_repo}" if self.hub_repo else None

    def build(self) -> torch.nn.Module:
        """The network with random weights (``pretrained=False``), in eval mode on the CPU."""
        import timm

        model = timm.create_model(self.architecture, pretrained=False, **self.kwargs)
        return model.eval()

    def to_json(self) -> dict[str, Any]:
        """A JSON-able description (the ``weights/registry.json`` entry)."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["ignore_keys"] = list(self.ignore_keys)
        d["hub_url"] = self.hub_url
        return d


_VIT_L_KW: dict[str, Any] = {
    "img_size": 224,
    "patch_size": 16,
    "init_values": 1e-5,
    "num_classes": 0,
    "dynamic_img_size": True,
}

BUILTIN: dict[str, EncoderSpec] = {
    "mstar": EncoderSpec(
        name="mstar",
        architecture="vit_large_patch16_224",
        kwargs=dict(_VIT_L_KW),
        feature_dim=1024,
        hub_repo="Wangyh/mSTAR",
        hub_filename="mSTAR.pth",
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        notes=(
            "mSTAR patch extractor (Xu et al., Nat Commun 16:11406, 2025). Reference preprocessing: 20x 256-px "
            "patch resized to 224 (bilinear, antialiased), [0,1], ImageNet mean/std. sha256 not published; "
            "record yours with `mstar weights verify`."
        ),
    ),
    "uni": EncoderSpec(
        name="uni",
        architecture="vit_large_patch16_224",
        kwargs=dict(_VIT_L_KW),
        feature_dim=1024,
        hub_repo="MahmoodLab/UNI",
        hub_filename="pytorch_model.bin",
        licence="CC-BY-NC-ND-4.0",
        gated=True,
        notes="UNI (Chen et al., Nat Med 2024); the frozen patch extractor of mSTAR's stage 1. Same preprocessing.",
    ),
}


def list_specs() -> list[EncoderSpec]:
    """The built-in entries, in registry order (``timm:`` models are open-ended and not listed)."""
    return list(BUILTIN.values())


def registry_json() -> str:
    """The text of ``weights/registry.json`` (built-in entries plus how ``timm:<name>`` works)."""
    doc = {
        "format": 1,
        "models": [s.to_json() for s in list_specs()],
        "timm": (
            "timm:<name> builds timm.create_model(<name>, pretrained=False, num_classes=0) with the model's own "
            "pretrained_cfg mean/std/input size; --weights hf fetches model.safetensors from its pretrained_cfg "
            "hf_hub_id; the classifier keys are dropped before the strict load."
        ),
    }
    return json.dumps(doc, indent=2) + "\n"


@functools.lru_cache(maxsize=16)
def _timm_spec(name: str) -> EncoderSpec:
    timm_name = name[len(TIMM_PREFIX):].strip()
    if not timm_name:
        raise UsageError("--model timm:<name> needs a timm model name, e.g. timm:vit_base_patch16_224")
    import timm

    try:
        model = timm.create_model(timm_name, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise UsageError(f"--model {name}: {exc}") from None
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    input_size = cfg.get("input_size", (3, 224, 224))
    side = int(input_size[-1])
    # the pooled output size: models with a conv head after pooling (MobileNetV3, ...) report it as
    # head_hidden_size; num_features is the size *before* that head
    feature_dim = int(getattr(model, "head_hidden_size", None) or getattr(model, "num_features", 0) or 0)
    classifier = cfg.get("classifier")
    ignore = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    hub_id = cfg.get("hf_hub_id")
    return EncoderSpec(
        name=name,
        architecture=timm_name,
        kwargs={"num_classes": 0},
        feature_dim=feature_dim,
        input_size=side,
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
        hub_repo=hub_id,
        hub_filename="model.safetensors" if hub_id else None,
        licence=str(cfg.get("license", "unknown")),
        ignore_keys=tuple(k + "." for k in ignore if k),
        notes="timm model with its own pretrained_cfg preprocessing",
    )


def get_spec(name: str | None = None) -> EncoderSpec:
    """The spec for ``--model NAME`` (default ``mstar``); an unknown name is a :class:`UsageError`.

    ``timm:<name>`` imports timm and builds the model once on the CPU to learn its feature size.
    """
    name = (name or DEFAULT_MODEL).strip()
    if name.lower() in BUILTIN:
        return BUILTIN[name.lower()]
    if name.startswith(TIMM_PREFIX):
        return _timm_spec(name)
    known = ", ".join(list(BUILTIN) + ["timm:<name>"])
    raise UsageError(f"unknown model {name!r} (known: {known})")
