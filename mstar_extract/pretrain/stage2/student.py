"""Stage 2's trainable parts: the student patch extractor + ``proj``, and its EMA copy.

* :class:`StudentWithProj` — the student ViT (built and initialised through the model registry, so ``--init
  mstar|uni|PATH`` resolves exactly like ``mstar extract --weights``; ``random`` keeps the registry network's
  seeded random initialisation) and ``proj`` = Linear(D→512). Its forward returns both the student features
  (for the EMA term) and the projected prediction (for the teacher term), so one DDP-wrapped module covers both.
* :class:`EmaModel` — a frozen exponential moving average of the student (never receives gradients), updated
  with fused multi-tensor ops, with a constant or cosine-to-1.0 momentum schedule (:func:`ema_momentum`).
* :func:`param_groups` — AdamW groups with optional layer-wise lr decay.

The exports (``student.pth``, ``proj.pth``, the model card) live in :mod:`mstar_extract.pretrain.stage2.export`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mstar_extract.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    from mstar_extract.models.registry import EncoderSpec
    from mstar_extract.models.weights import ResolvedWeights

INIT_CHOICES_DOC = "mstar | uni | PATH (state dict) | random"


@dataclass
class StudentInit:
    """How the student was initialised (recorded in checkpoints and the model card)."""

    init: str
    """The ``student.init`` value as given."""
    spec_name: str
    """Registry name of the architecture (``mstar``, ``uni``, ``timm:<name>``)."""
    weights_source: str
    """``hf``, ``path`` or ``random``."""
    weights_path: str | None
    weights_sha256: str


def resolve_init(init: str, arch: str) -> tuple[EncoderSpec, str]:
    """``student.init`` + ``student.arch`` → (registry spec, ``--weights`` value for the registry).

    ``mstar``/``uni`` select that registry entry with its hub weights (``arch`` is ignored); a path loads that
    state dict into ``arch``; ``random`` keeps ``arch``'s random initialisation.
    """
    from mstar_extract.models.registry import get_spec

    value = str(init).strip()
    if value.lower() in ("mstar", "uni"):
        return get_spec(value.lower()), "hf"
    if value.lower() == "random":
        return get_spec(arch), "random"
    if not value:
        raise UsageError(f"student.init is empty (expected {INIT_CHOICES_DOC})")
    path = Path(value).expanduser()
    if not path.is_file():
        raise UsageError(f"student.init: {path}: no such weights file (expected {INIT_CHOICES_DOC})")
    return get_spec(arch), str(path)


def prepare_student_init(init: str, arch: str) -> tuple[EncoderSpec, ResolvedWeights]:
    """Resolve ``student.init`` before any work: the registry spec and the weights file (hub download/cache,
    sha256) or random. Errors are one line (UsageError / WeightsError).

    ``random`` is a deliberate start from scratch here, not extraction's ``--weights random`` smoke test, so
    that command's warning is not printed (the run says how the student was initialised in its own words)."""
    from mstar_extract.models.weights import RANDOM_SHA256, ResolvedWeights, resolve_weights

    spec, weights = resolve_init(init, arch)
    if weights == "random":
        return spec, ResolvedWeights("random", None, RANDOM_SHA256)
    return spec, resolve_weights(spec, weights)


def build_student_backbone(init: str, arch: str, seed: int | None = None,
                           prepared: tuple[EncoderSpec, ResolvedWeights] | None = None,
                           ) -> tuple[nn.Module, EncoderSpec, StudentInit]:
    """Build the student network through the registry and load its initial weights strictly.

    ``seed`` seeds torch right before a random network is built, so a random init does not depend on what was built
    before (e.g. the registry's cached ``timm:`` specs). A network that starts from a weights file (UNI, mSTAR, a
    PATH) is built without a random initialisation and adopts the file's tensors
    (:func:`~mstar_extract.models.weights.build_with_weights`: ~7 CPU-seconds less for a ViT-L). ``prepared`` =
    the result of :func:`prepare_student_init`.
    """
    from mstar_extract.models.weights import build_with_weights

    spec, resolved = prepared or prepare_student_init(init, arch)
    if seed is not None:
        torch.manual_seed(seed)
    if resolved.path is None:
        model = spec.build()
    else:
        # tensors mapped from the file are private copies: training never writes back to it
        model = build_with_weights(spec, resolved)
    info = StudentInit(
        init=str(init),
        spec_name=spec.name,
        weights_source=resolved.source,
        weights_path=str(resolved.path) if resolved.path is not None else None,
        weights_sha256=resolved.sha256,
    )
    return model, spec, info


class StudentWithProj(nn.Module):
    """Student patch extractor + ``proj`` (Linear feature_dim → target_dim)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, target_dim: int) -> None:
        super().__init__()
        self.student = backbone
        self.proj = nn.Linear(feature_dim, target_dim)
        self.feature_dim = int(feature_dim)
        self.target_dim = int(target_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B,3,H,W) normalised → (student features (B,D), projected prediction (B,target_dim))."""
        feats = self.student(x)
        return feats, self.proj(feats)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's activation checkpointing of the transformer blocks (saves memory, costs ~30% compute)."""
        fn = getattr(self.student, "set_grad_checkpointing", None)
        if fn is None:
            raise UsageError(f"student model {type(self.student).__name__} does not support gradient checkpointing")
        fn(enable)


class EmaModel(nn.Module):
    """An exponential moving average of a network; frozen (``requires_grad=False``) and always in eval mode."""

    def __init__(self, source: nn.Module) -> None:
        super().__init__()
        self.module = copy.deepcopy(source)
        self.module.requires_grad_(False)
        if getattr(self.module, "grad_checkpointing", False):  # copied from a checkpointed student: no use without grads
            self.module.set_grad_checkpointing(False)  # type: ignore[operator]  # timm models have it
        self.train(False)

    def train(self, mode: bool = True) -> EmaModel:  # the EMA never trains (mode is ignored)
        super().train(False)
        self.module.eval()
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    @torch.no_grad()
    def update(self, source: nn.Module, momentum: float) -> None:
        """``ema = momentum * ema + (1 - momentum) * source`` for parameters; buffers are copied.

        One fused multi-tensor ``lerp`` over all parameters (no per-tensor launches, no host synchronisation)."""
        ema_p, src_p, ema_b, src_b = self._pairs(source)
        if ema_p:
            torch._foreach_lerp_(ema_p, src_p, 1.0 - float(momentum))
        if ema_b:
            torch._foreach_copy_(ema_b, src_b)

    def _pairs(self, source: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """(EMA params, source params, EMA buffers, source buffers), matched by name (cached per source)."""
        cached = getattr(self, "_pair_cache", None)
        if cached is not None and cached[0] is source:
            return cached[1]
        src = dict(source.named_parameters())
        src_buf = dict(source.named_buffers())
        ema_p: list[torch.Tensor] = []
        src_p: list[torch.Tensor] = []
        ema_b: list[torch.Tensor] = []
        src_b: list[torch.Tensor] = []
        for name, p in self.module.named_parameters():
            ema_p.append(p)
            src_p.append(src[name].detach())
        for name, b in self.module.named_buffers():
            ema_b.append(b)
            src_b.append(src_buf[name])
        pairs = (ema_p, src_p, ema_b, src_b)
        object.__setattr__(self, "_pair_cache", (source, pairs))
        return pairs


def ema_momentum(step: int, total_steps: int, base: float, schedule: str) -> float:
    """EMA momentum at optimisation ``step``: ``constant`` = base; ``cosine`` = base → 1.0 over ``total_steps``."""
    if schedule == "constant" or total_steps <= 0:
        return float(base)
    if schedule == "cosine":
        t = min(max(step, 0), total_steps) / total_steps
        return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1.0) / 2.0
    raise UsageError(f"unknown EMA schedule {schedule!r} (constant | cosine)")


def param_groups(
    model: StudentWithProj, weight_decay: float, layer_decay: float, proj_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW parameter groups; each carries ``lr_scale`` (multiplied into the scheduled lr).

    No weight decay on biases, norms and 1-D parameters or the ViT's position/class tokens. With
    ``layer_decay < 1`` the student's blocks get timm's layer-wise scales ``layer_decay ** (depth - layer)``;
    ``proj`` always gets ``proj_lr_scale``.
    """
    student = model.student
    no_wd = set(getattr(student, "no_weight_decay", lambda: set())())
    groups: list[dict[str, Any]]
    if layer_decay < 1.0 and hasattr(student, "group_matcher"):
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(student, weight_decay=weight_decay, no_weight_decay_list=no_wd,
                                          layer_decay=layer_decay)
        for g in groups:
            g.setdefault("lr_scale", 1.0)
    else:
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, p in student.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name in no_wd or name.endswith(".bias") else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        ]
    groups.append({"params": [model.proj.weight], "weight_decay": weight_decay, "lr_scale": proj_lr_scale})
    groups.append({"params": [model.proj.bias], "weight_decay": 0.0, "lr_scale": proj_lr_scale})
    return [g for g in groups if g["params"]]


def count_parameters(modules: Iterable[nn.Module]) -> int:
    """Number of trainable parameters in ``modules``."""
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
