"""A reusable training loop: AdamW, warm-up + cosine, AMP, clipping, JSONL metrics, progress, checkpoints, resume.

A stage supplies its model(s), a ``step_fn(batch) -> {"loss": tensor, other scalars...}`` that runs the forward
pass (the loop wraps it in autocast and does backward/clip/step; the scalars may stay tensors on the device: they
are read back only on logging steps), a ``make_loader(epoch, start_batch)``
that yields this rank's batches of an epoch (skipping ``start_batch`` done ones), and optionally a
``val_fn(epoch) -> {name: float}``. The loop owns step counting, the LR schedule, checkpoints every
``ckpt_every`` steps (atomic, RNG states of every rank), ``train.stop_after_steps`` (per-invocation budget for
wall-time-limited jobs) and exact resumption.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mstar_extract.console import Reporter
from mstar_extract.errors import UsageError
from mstar_extract.pretrain import checkpoint as ckpt, dist as D


def param_groups(named: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                 lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Two AdamW groups (decay / no decay: biases, norms, embeddings, 1-d params, temperatures) at ``lr × lr_scale``."""
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        low = name.lower()
        if p.ndim < 2 or "norm" in low or "emb" in low or "cls_token" in low or "log_scale" in low:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale, "lr": lr * lr_scale})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale, "lr": lr * lr_scale})
    return groups


def build_optimizer(groups: list[dict[str, Any]], optim_cfg: Any) -> torch.optim.Optimizer:
    """AdamW over ``groups`` (from :func:`param_groups`) with the ``OptimConfig`` settings."""
    if not groups:
        raise UsageError("nothing to train: every parameter is frozen")
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                  min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Multiplier 0→1 linearly over ``warmup`` steps, then cosine down to ``min_ratio`` at ``total``."""

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        span = max(total - warmup, 1)
        t = min(max(step - warmup, 0) / span, 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class AmpChoice:
    """The autocast dtype of a training run (``None`` = float32) and the one line that explains it, if any."""

    dtype: torch.dtype | None
    note: str | None = None

    @property
    def name(self) -> str:
        if self.dtype == torch.bfloat16:
            return "bf16"
        return "fp16" if self.dtype == torch.float16 else "fp32"

    @property
    def needs_scaler(self) -> bool:
        """fp16 gradients underflow without loss scaling: a ``GradScaler`` goes with fp16 autocast."""
        return self.dtype == torch.float16


def choose_precision(precision: str, device_type: str, bf16_hardware: bool) -> AmpChoice:
    """The precision rule of both stages, from plain facts (testable anywhere).

    ``auto``: bf16 on a GPU with bf16 hardware, fp16 (with a GradScaler) on an older GPU, fp32 on the CPU — the
    rule of :func:`mstar_extract.models.precision.auto_precision`. ``fp16`` needs CUDA; ``bf16`` is honoured
    everywhere (with a note on a GPU that only emulates it).
    """
    cuda = device_type == "cuda"
    if precision == "auto":
        if not cuda:
            return AmpChoice(None)
        if bf16_hardware:
            return AmpChoice(torch.bfloat16)
        return AmpChoice(torch.float16, "precision auto: this GPU has no bf16 hardware (compute capability < 8.0); "
                                        "training in fp16 autocast with a GradScaler")
    if precision == "fp32":
        return AmpChoice(None)
    if precision == "fp16":
        if not cuda:
            raise UsageError("train.precision fp16 needs a CUDA device (use fp32 or bf16 on CPU)")
        return AmpChoice(torch.float16, "precision fp16: fp16 autocast with a GradScaler")
    if precision == "bf16":
        slow = cuda and not bf16_hardware
        return AmpChoice(torch.bfloat16, "precision bf16: this GPU only emulates bf16 (slow); precision auto would "
                                         "pick fp16" if slow else None)
    raise UsageError(f"unknown precision {precision!r} (auto, bf16, fp16, fp32)")


def resolve_precision(precision: str, device: torch.device) -> AmpChoice:
    """:func:`choose_precision` for ``device`` (asks CUDA whether bf16 is native, without counting emulation)."""
    from mstar_extract.models.precision import native_bf16

    return choose_precision(precision, device.type, device.type == "cuda" and native_bf16(device))


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else nullcontext()


def to_floats(values: dict[str, Any]) -> dict[str, Any]:
    """Tensors of ``values`` as Python floats, read back from the device in one transfer (one synchronisation)."""
    keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    out = dict(values)
    if keys:
        stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])
        out.update(zip(keys, stacked.tolist(), strict=True))
    return out


class MetricsLog:
    """Append-only ``metrics.jsonl`` (rank 0): one JSON object per line, flushed per line."""

    def __init__(self, path: str | Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume from ``step``: drop the records a killed run logged after its last checkpoint (they are
        logged again), so every step appears once. A torn last line is dropped too. Atomic rewrite."""
        if not self.enabled or not self.path.exists():
            return
        from mstar_extract.store.atomic import write_text_atomic

        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if int(rec.get("step", 0)) <= step:
                kept.append(line)
        write_text_atomic(self.path, "".join(f"{line}\n" for line in kept))


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


@dataclass
class StepResult:
    """What one optimisation step leaves on the device: ``step_fn``'s outputs and the gradient norm (tensors;
    read back to Python only on logging steps)."""

    out: dict[str, Any]
    grad_norm: torch.Tensor | None


class TrainLoop:
    """Runs epochs of ``step_fn`` with optimisation, logging, validation and checkpoints.

    A step (:meth:`train_step`) never waits for the device: losses and the gradient norm stay tensors, and are
    read back in one transfer only on logging steps (:meth:`log_step`: step 1, every ``log_every``-th step and
    the last step of the invocation). fp16 autocast goes with a ``GradScaler`` (whose inf check does sync).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        raw_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_cfg: Any,
        grad_clip: float,
        info: D.DistInfo,
        run_dir: str | Path,
        reporter: Reporter,
        config_dict: dict[str, Any],
        step_fn: Callable[[Any], dict[str, Any]],
        make_loader: Callable[[int, int], Iterable[Any]],
        batches_per_epoch: int,
        val_fn: Callable[[int], dict[str, float]] | None = None,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        desc: str = "train",
    ) -> None:
        self.model, self.raw_model, self.opt, self.sched = model, raw_model, optimizer, scheduler
        self.cfg, self.grad_clip, self.info, self.reporter = train_cfg, grad_clip, info, reporter
        self.run_dir, self.config_dict = Path(run_dir), config_dict
        self.step_fn, self.make_loader, self.val_fn, self.extra_state = step_fn, make_loader, val_fn, extra_state
        self.batches_per_epoch, self.desc = batches_per_epoch, desc
        self.precision = resolve_precision(train_cfg.precision, info.device)
        self.amp_dtype = self.precision.dtype
        if self.precision.note and info.is_main:
            reporter.info(self.precision.note)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision.needs_scaler)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=info.is_main)
        self.state = LoopState()
        self.total_steps = total_steps(train_cfg, batches_per_epoch)
        self._clock = (time.monotonic(), 0)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.state.step,
            "epoch": self.state.epoch,
            "batch_in_epoch": self.state.batch_in_epoch,
            "config": self.config_dict,
            "extra": self.extra_state() if self.extra_state else {},
        }

    def save(self) -> Path | None:
        """Checkpoint now (collective: every rank contributes its RNG state; rank 0 writes)."""
        rngs = D.all_gather_object(ckpt.rng_state())
        path = None
        if self.info.is_main:
            state = self.state_dict()
            state["rng"] = rngs
            path = ckpt.save_checkpoint(ckpt.checkpoint_path(self.run_dir, self.state.step), state)
            ckpt.prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        D.barrier()
        return path

    def load(self, state: dict[str, Any]) -> None:
        """Restore everything from a checkpoint dict (from :func:`checkpoint.load_checkpoint`)."""
        self.raw_model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.state = LoopState(int(state["step"]), int(state["epoch"]), int(state["batch_in_epoch"]))
        self.metrics.truncate_after(self.state.step)
        rngs = state.get("rng") or []
        if len(rngs) == self.info.world_size:
            ckpt.set_rng_state(rngs[self.info.rank])
        elif rngs:
            self.reporter.warn(f"checkpoint was written by {len(rngs)} processes, "
                               f"this run has {self.info.world_size}: random streams restart")
            ckpt.set_rng_state(rngs[0])

    # ------------------------------------------------------------------ one step
    def _optimise(self, loss: torch.Tensor) -> torch.Tensor | None:
        """Backward, unscale, clip, step, schedule; returns the (pre-clipping) gradient norm as a device tensor."""
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        gnorm = None
        if self.grad_clip and self.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            params = [p for g in self.opt.param_groups for p in g["params"]]
            gnorm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return gnorm

    def train_step(self, batch: Any) -> StepResult:
        """Forward (autocast) + optimisation of one batch; nothing is read back from the device."""
        with autocast(self.info.device, self.amp_dtype):
            out = self.step_fn(batch)
        return StepResult(out, self._optimise(out["loss"]))

    def is_log_step(self, step: int, stop_at: int) -> bool:
        return step == 1 or step % max(self.cfg.log_every, 1) == 0 or step == stop_at

    def log_step(self, res: StepResult, bar: Any = None) -> dict[str, Any]:
        """The metrics record of the step just done (one device read-back), to ``metrics.jsonl`` and ``--jsonl``."""
        st = self.state
        t0, s0 = self._clock
        rate = (st.step - s0) / max(time.monotonic() - t0, 1e-9)
        values = to_floats({**res.out, "grad_norm": res.grad_norm})
        rec = {"step": st.step, "epoch": st.epoch, "lr": self.opt.param_groups[0]["lr"]}
        rec.update({k: v for k, v in values.items() if k != "grad_norm"})
        rec.update({"grad_norm": values["grad_norm"], "steps_per_s": rate})
        self.metrics.write(rec)
        if self.info.is_main:
            self.reporter.event("step", **rec)
        if bar is not None:
            bar.set_postfix(f"loss {rec['loss']:.4f}")
        return rec

    # ------------------------------------------------------------------ the loop
    def _stop_at(self) -> int:
        budget = getattr(self.cfg, "stop_after_steps", None)
        return min(self.total_steps, self.state.step + budget) if budget else self.total_steps

    def _end_epoch_if_done(self) -> None:
        st = self.state
        if st.batch_in_epoch < self.batches_per_epoch:
            return
        st.epoch += 1
        st.batch_in_epoch = 0
        if self.val_fn is not None and self.cfg.val_every > 0 and st.epoch % self.cfg.val_every == 0:
            self.validate(st.epoch)

    def _run_epoch(self, stop_at: int, bar: Any) -> int | None:
        """This epoch's remaining batches (until ``stop_at``); returns the step of the last checkpoint written."""
        st, saved = self.state, None
        self.model.train()
        for batch in self.make_loader(st.epoch, st.batch_in_epoch):
            res = self.train_step(batch)
            st.step += 1
            st.batch_in_epoch += 1
            if self.is_log_step(st.step, stop_at):
                self.log_step(res, bar)
            if bar is not None:
                bar.update(1)
            if st.step % max(self.cfg.ckpt_every, 1) == 0:
                self.save()
                saved = st.step
            if st.step >= stop_at:
                break
        return saved

    def run(self) -> LoopState:
        """Train until ``total_steps`` or this invocation's ``stop_after_steps``; always ends with a checkpoint."""
        st = self.state
        stop_at = self._stop_at()
        last_saved = st.step
        self._clock = (time.monotonic(), st.step)
        ctx = self.reporter.progress(self.total_steps, self.desc, unit="step") if self.info.is_main else nullcontext()
        with ctx as bar:
            if bar is not None:
                bar.update(st.step)
            while st.step < stop_at and st.epoch < self.cfg.epochs:
                saved = self._run_epoch(stop_at, bar)
                last_saved = saved if saved is not None else last_saved
                self._end_epoch_if_done()
        if st.step != last_saved or st.step == 0:
            self.save()
        return st

    def validate(self, epoch: int) -> dict[str, float]:
        assert self.val_fn is not None
        self.model.eval()
        with torch.no_grad(), autocast(self.info.device, self.amp_dtype):
            res = self.val_fn(epoch)
        self.model.train()
        rec = {"event": "val", "step": self.state.step, "epoch": epoch, **to_floats(res)}
        self.metrics.write(rec)
        if self.info.is_main:
            self.reporter.event("val", **{k: v for k, v in rec.items() if k != "event"})
            shown = ", ".join(f"{k} {v:.3f}" for k, v in rec.items() if isinstance(v, float))
            self.reporter.info(f"validation after epoch {epoch}: {shown}")
        return res


def total_steps(train_cfg: Any, batches_per_epoch: int) -> int:
    """Steps of the whole run: epochs × batches per epoch, capped by ``max_steps``."""
    n = train_cfg.epochs * batches_per_epoch
    return min(n, train_cfg.max_steps) if train_cfg.max_steps else n
