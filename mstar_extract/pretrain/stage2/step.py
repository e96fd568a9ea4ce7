"""One stage-2 optimisation step, shared by training (:mod:`.train`) and ``mstar bench train`` (:mod:`.bench`).

A step: uint8 patches on the device → augmentation (seeded by seed, rank and step) → the extraction
preprocessing → student + ``proj`` forward (autocast) → EMA forward → loss D(proj(student(x)), target) +
λ·D'(student(x), ema(x)) → backward, clipping, AdamW (the shared :class:`~mstar_extract.pretrain.loop.TrainLoop`)
→ EMA update. Nothing in it reads a value back from the device (see the loop's docstring).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mstar_extract.pretrain.loop import TrainLoop, build_optimizer, warmup_cosine
from mstar_extract.pretrain.stage2.augment import augment_uint8
from mstar_extract.pretrain.stage2.config import Stage2Config
from mstar_extract.pretrain.stage2.losses import Stage2Loss
from mstar_extract.pretrain.stage2.student import EmaModel, StudentInit, StudentWithProj, ema_momentum, param_groups

if TYPE_CHECKING:  # pragma: no cover
    from mstar_extract.models.registry import EncoderSpec


@dataclass
class Student:
    """The trained network and what goes with it."""

    raw: StudentWithProj
    """Student + proj (unwrapped)."""
    model: nn.Module
    """What the step calls: ``raw``, DDP-wrapped under torchrun."""
    ema: EmaModel
    spec: EncoderSpec
    """Registry spec of the student (input size, mean/std, export format)."""
    init: StudentInit


def build_optimizer_and_schedule(raw: StudentWithProj, cfg: Stage2Config, n_total: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the student's groups (layer decay, ``proj`` lr scale) and the warm-up + cosine schedule."""
    groups = param_groups(raw, cfg.optim.weight_decay, cfg.optim.layer_decay, cfg.optim.proj_lr_scale)
    for g in groups:
        g["lr"] = cfg.optim.lr * g.get("lr_scale", 1.0)
    optimizer = build_optimizer(groups, cfg.optim)
    return optimizer, warmup_cosine(optimizer, cfg.optim.warmup_steps, n_total, cfg.optim.min_lr_ratio)


class Stage2Loop(TrainLoop):
    """The shared :class:`~mstar_extract.pretrain.loop.TrainLoop` with the stage-2 step as its ``step_fn`` and the
    EMA update after every optimiser step."""

    def __init__(self, *, student: Student, cfg: Stage2Config, **kw: Any) -> None:
        super().__init__(model=student.model, raw_model=student.raw, train_cfg=cfg.train, grad_clip=cfg.optim.grad_clip,
                         step_fn=self.forward_step, **kw)
        self.student, self.s2 = student, cfg
        self.criterion = Stage2Loss(cfg.loss.distance, cfg.loss.ema_distance, cfg.loss.ema_weight)
        self.momentum = float(cfg.loss.ema_momentum)
        self.global_batch = cfg.train.batch_size * self.info.world_size
        self._gen = torch.Generator(device=self.info.device)
        self._started, self._steps_here = time.monotonic(), 0

    def _augment_generator(self) -> torch.Generator:
        """The augmentation stream of this step: seeded by (seed, rank, step), so a resumed run repeats it."""
        seed = (self.s2.train.seed * 1_000_003 + self.info.rank * 7919 + self.state.step) & 0x7FFFFFFF
        return self._gen.manual_seed(seed)

    def forward_step(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Augment, preprocess, forward, loss: ``{"loss", "loss_teacher", "loss_ema"}`` (tensors) + plain numbers."""
        from mstar_extract.models.preprocess import preprocess

        dev, spec = self.info.device, self.student.spec
        x = batch["pixels"].to(dev, non_blocking=True)
        target = batch["targets"].to(dev, non_blocking=True)
        with torch.autocast(device_type=dev.type, enabled=False):
            x = augment_uint8(x, self.s2.augment, self._augment_generator())
            x = preprocess(x, spec.input_size, spec.mean, spec.std)
        feats, pred = self.student.model(x)
        ema_feats = self.student.ema(x) if self.criterion.lam > 0 else None
        parts = self.criterion(pred, target, feats, ema_feats)
        self._steps_here += 1
        rate = self._steps_here * self.global_batch / max(time.monotonic() - self._started, 1e-9)
        return {"loss": parts.total, "loss_teacher": parts.teacher.detach(), "loss_ema": parts.ema.detach(),
                "ema_momentum": self.momentum, "patches_per_s": rate}

    def _optimise(self, loss: torch.Tensor) -> torch.Tensor | None:
        gnorm = super()._optimise(loss)
        self.momentum = ema_momentum(self.state.step, self.total_steps, self.s2.loss.ema_momentum,
                                     self.s2.loss.ema_schedule)
        self.student.ema.update(self.student.raw.student, self.momentum)
        return gnorm
