"""Stage-2 loss: pull ``proj(student(x))`` to the teacher target, and keep ``student(x)`` near its EMA copy.

``L = D(proj(student(x)), target) + λ · D'(student(x), ema(x))`` with λ = 0.6 (the paper; docs/pretrain.md,
"Stage 2"); D and D' are one of :data:`DISTANCES`, each averaged over the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mstar_extract.errors import UsageError


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos(a_i, b_i)`` over rows (0 when aligned, 2 when opposite)."""
    return (1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-6)).mean()


def mse_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error, averaged over rows and dimensions."""
    return F.mse_loss(a.float(), b.float())


def normalized_mse_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance between L2-normalised rows (= 2·(1 − cos)), averaged over rows."""
    a, b = F.normalize(a.float(), dim=-1, eps=1e-6), F.normalize(b.float(), dim=-1, eps=1e-6)
    return (a - b).pow(2).sum(-1).mean()


def smooth_l1_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Huber / smooth-L1 (beta 1), averaged over rows and dimensions."""
    return F.smooth_l1_loss(a.float(), b.float())


DISTANCES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cosine": cosine_distance,
    "mse": mse_distance,
    "normalized_mse": normalized_mse_distance,
    "smooth_l1": smooth_l1_distance,
}


def get_distance(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The distance function called ``name`` (UsageError naming the known ones otherwise)."""
    try:
        return DISTANCES[name]
    except KeyError:
        raise UsageError(f"unknown distance {name!r} (known: {', '.join(DISTANCES)})") from None


@dataclass
class Stage2LossParts:
    """The total loss and its two terms (detached floats for logging via :meth:`as_dict`)."""

    total: torch.Tensor
    teacher: torch.Tensor
    ema: torch.Tensor

    def as_dict(self) -> dict[str, float]:
        return {"loss": float(self.total.detach()), "loss_teacher": float(self.teacher.detach()),
                "loss_ema": float(self.ema.detach())}


class Stage2Loss:
    """``D(pred, target) + lam * D'(feats, ema_feats)``; ``ema_feats`` is treated as a constant."""

    def __init__(self, distance: str = "cosine", ema_distance: str = "cosine", lam: float = 0.6) -> None:
        self.d = get_distance(distance)
        self.d_ema = get_distance(ema_distance)
        self.lam = float(lam)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, feats: torch.Tensor,
                 ema_feats: torch.Tensor | None) -> Stage2LossParts:
        teacher = self.d(pred, target)
        if ema_feats is None or self.lam == 0.0:
            ema = torch.zeros((), device=pred.device)
        else:
            ema = self.d_ema(feats, ema_feats.detach())
        return Stage2LossParts(total=teacher + self.lam * ema, teacher=teacher, ema=ema)
