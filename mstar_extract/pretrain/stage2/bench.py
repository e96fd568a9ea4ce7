"""Stage-2 training throughput (``mstar bench train``): patches/s of the full optimisation step on this device.

One timed step is the training step itself — :meth:`Stage2Loop.train_step
<mstar_extract.pretrain.loop.TrainLoop.train_step>` of :mod:`~mstar_extract.pretrain.stage2.step`, minus slide
reading (timed separately by ``mstar bench read``): uint8 patches already on the device → augmentation → the
extraction preprocessing → student + proj forward/backward (autocast) → EMA forward → AdamW step with gradient
clipping → EMA update. Precision follows the training rule (``auto``: bf16 on GPUs with bf16 hardware, fp16
with a GradScaler on older GPUs, fp32 on the CPU). Inputs are random uint8 patches and random targets; weights
are random (throughput does not depend on them). Warm-up steps (allocator, cuDNN autotuning) are not timed;
the clock stops after a device sync.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
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
                ema_weight: float = 0.6, target_dim: int = 512, seed: int = 0, reporter: Any = None) -> TrainBenchResult:
    """Time ``steps`` stage-2 optimisation steps of ``batch_size`` patches (after ``warmup`` untimed ones).

    ``reporter`` receives the precision note (e.g. fp16 with a GradScaler on a GPU without bf16 hardware)."""
    from mstar_extract.console import QUIET, Reporter
    from mstar_extract.pretrain.config import apply_overrides
    from mstar_extract.pretrain.dist import DistInfo, resolve_device
    from mstar_extract.pretrain.stage2.config import Stage2Config
    from mstar_extract.pretrain.stage2.step import Stage2Loop, Student, build_optimizer_and_schedule
    from mstar_extract.pretrain.stage2.student import EmaModel, StudentWithProj, build_student_backbone

    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    cfg = apply_overrides(Stage2Config(), [f"train.batch_size={batch_size}", f"train.precision={precision}",
                                           f"train.seed={seed}", f"loss.ema_weight={ema_weight}", "optim.warmup_steps=0"])
    backbone, spec, init = build_student_backbone("random", model, seed=seed)
    net = StudentWithProj(backbone, spec.feature_dim, target_dim)
    if grad_checkpointing:
        net.set_grad_checkpointing(True)
    net.to(dev).train()
    student = Student(net, net, EmaModel(net.student).to(dev), spec, init)
    optimizer, scheduler = build_optimizer_and_schedule(net, cfg, warmup + steps)
    g = torch.Generator(device=dev).manual_seed(seed)
    s = spec.input_size
    batch = {"pixels": torch.randint(0, 256, (batch_size, s, s, 3), dtype=torch.uint8, device=dev, generator=g),
             "targets": torch.randn(batch_size, target_dim, device=dev, generator=g)}
    with tempfile.TemporaryDirectory(prefix="mstar-bench-train-") as tmp:  # the loop never writes here (no saves)
        loop = Stage2Loop(student=student, cfg=cfg, optimizer=optimizer, scheduler=scheduler, info=DistInfo(device=dev),
                          run_dir=Path(tmp), reporter=reporter or Reporter(verbosity=QUIET), config_dict={},
                          make_loader=lambda epoch, start: [], batches_per_epoch=warmup + steps)
        seconds = _time_steps(loop, batch, warmup, steps, dev)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return TrainBenchResult(spec.name, str(dev), loop.precision.name, batch_size, steps, seconds,
                            steps * batch_size / max(seconds, 1e-9), grad_checkpointing, ema_weight, peak)


def _time_steps(loop: Any, batch: dict[str, torch.Tensor], warmup: int, steps: int, dev: torch.device) -> float:
    """Seconds of ``steps`` training steps after ``warmup`` untimed ones, each phase closed by a device sync."""

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for _ in range(max(0, warmup)):
        loop.train_step(batch)
        loop.state.step += 1
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        loop.train_step(batch)
        loop.state.step += 1
    sync()
    return time.perf_counter() - t0
