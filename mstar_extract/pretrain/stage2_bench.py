"""Stage-2 training throughput (``mstar bench train``): patches/s of the full optimisation step on this device.

One timed step is exactly what :mod:`~mstar_extract.pretrain.stage2` does per batch, minus slide reading (timed
separately by ``mstar bench read``): uint8 patches already on the device → augmentation → the extraction
preprocessing → student + proj forward/backward (autocast) → EMA forward → AdamW step with gradient clipping →
EMA update. Inputs are random uint8 patches and random targets; weights are random (throughput does not depend
on them). Warm-up steps (allocator, cuDNN autotuning) are not timed; the clock stops after a device sync.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class TrainBenchResult:
    model: str
    device: str
    precision: str
    batch_size: int
    steps: int
    seconds: float
    patches_per_s: float
    grad_checkpointing: bool
    ema_weight: float
    peak_memory_gb: float | None
    workers: int = 0
    """No reader workers: slide reading is not part of this measure (see ``mstar bench read``)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_train(model: str = "mstar", batch_size: int = 64, steps: int = 20, warmup: int = 3,
                device: str = "auto", precision: str = "auto", grad_checkpointing: bool = False,
                ema_weight: float = 0.6, target_dim: int = 512, seed: int = 0) -> TrainBenchResult:
    """Time ``steps`` stage-2 optimisation steps of ``batch_size`` patches (after ``warmup`` untimed ones)."""
    from mstar_extract.models.encoder import resolve_device, resolve_precision
    from mstar_extract.models.preprocess import preprocess
    from mstar_extract.pretrain.loop import autocast
    from mstar_extract.pretrain.stage2_augment import augment_uint8
    from mstar_extract.pretrain.stage2_config import AugmentConfig, Stage2OptimConfig
    from mstar_extract.pretrain.stage2_losses import Stage2Loss
    from mstar_extract.pretrain.student import EmaModel, StudentWithProj, build_student_backbone, param_groups

    dev = resolve_device(device)
    prec = resolve_precision(None if precision == "auto" else precision, dev)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
    backbone, spec, _ = build_student_backbone("random", model, warn_stream=_Null(), seed=seed)
    net = StudentWithProj(backbone, spec.feature_dim, target_dim)
    if grad_checkpointing:
        net.set_grad_checkpointing(True)
    net.to(dev).train()
    ema = EmaModel(net.student).to(dev)
    ocfg = Stage2OptimConfig()
    groups = param_groups(net, ocfg.weight_decay, 1.0)
    opt = torch.optim.AdamW(groups, lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps)
    scaler = torch.amp.GradScaler(dev.type, enabled=prec == "fp16")
    loss_fn = Stage2Loss(lam=ema_weight)
    aug = AugmentConfig()
    g = torch.Generator(device=dev).manual_seed(seed)
    s = spec.input_size
    pixels = torch.randint(0, 256, (batch_size, s, s, 3), dtype=torch.uint8, device=dev, generator=g)
    targets = torch.randn(batch_size, target_dim, device=dev, generator=g)

    def step() -> None:
        x = preprocess(augment_uint8(pixels, aug, g), s, spec.mean, spec.std)
        with autocast(dev, amp):
            feats, pred = net(x)
            ema_feats = ema(x) if ema_weight > 0 else None
            loss = loss_fn(pred, targets, feats, ema_feats).total
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), ocfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        ema.update(net.student, 0.999)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(max(0, warmup)):
        step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return TrainBenchResult(spec.name, str(dev), prec, batch_size, steps, dt, steps * batch_size / max(dt, 1e-9),
                            grad_checkpointing, ema_weight, peak)


class _Null:
    """A sink for the random-weights warning (the benchmark says so itself)."""

    def write(self, _: str) -> None:
        pass

    def flush(self) -> None:
        pass
