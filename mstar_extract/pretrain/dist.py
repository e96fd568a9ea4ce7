"""torch.distributed helpers: torchrun environment → process group, gathers with gradients, rank-0 helpers.

Layout comes from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR/PORT``);
without it the process is a world of one and no process group is created. Backend ``auto`` = NCCL when the
device is CUDA, gloo otherwise.

Gradient of the gathered loss: every rank computes the same global loss L from the gathered embeddings; the
backward of :func:`all_gather_with_grad` sums the incoming gradients over ranks (all-reduce) and keeps this
rank's rows, so each rank holds W·∂L/∂z_local; DDP's gradient averaging then divides by W, which gives exactly
∂L/∂θ of the single-process computation on the global batch.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from mstar_extract.errors import UsageError


@dataclass
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` → cuda:LOCAL_RANK if CUDA is available else cpu; ``cuda`` → cuda:LOCAL_RANK; else as given."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"device '{spec}' requested but CUDA is not available")
        return torch.device(f"cuda:{local_rank}") if spec == "cuda" else torch.device(spec)
    if spec != "cpu":
        raise UsageError(f"unknown device '{spec}' (auto, cpu, cuda, cuda:N)")
    return torch.device("cpu")


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Join the torchrun job described by the environment (or stay single-process) and pick the device."""
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, None)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise UsageError("dist.backend nccl needs a CUDA device; use gloo on CPU")
    if not dist.is_initialized():
        kw: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kw["device_id"] = dev
        dist.init_process_group(**kw)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, backend)


def cleanup() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_dist() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_dist():
        dist.barrier()


def _gather_sizes(n: int, device: torch.device, same_size: bool = False) -> list[int]:
    """Every rank's first-dimension size. ``same_size`` = the caller knows they are all ``n`` (no exchange, and
    no host-device synchronisation: reading the gathered sizes back to Python waits for the device)."""
    if same_size:
        return [n] * dist.get_world_size()
    t = torch.tensor([n], device=device, dtype=torch.long)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(s.item()) for s in out]


def _gather_padded(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """all_gather of tensors whose first dimension differs per rank (pad to the max, then trim)."""
    top = max(sizes)
    if x.shape[0] < top:
        x = torch.cat([x, x.new_zeros((top - x.shape[0], *x.shape[1:]))], dim=0)
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)], dim=0)


class _AllGatherGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, same_size: bool) -> torch.Tensor:
        sizes = _gather_sizes(x.shape[0], x.device, same_size)
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return _gather_padded(x, sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None


def all_gather_with_grad(x: torch.Tensor, same_size: bool = False) -> torch.Tensor:
    """Concatenate ``x`` (n_r, ...) from all ranks in rank order; gradients flow back to every rank's rows.

    ``same_size=True`` when every rank passes the same first dimension (a training step's equal batches):
    the sizes are then not exchanged, which keeps the step free of host-device synchronisation."""
    if not is_dist():
        return x
    return _AllGatherGrad.apply(x, same_size)


@torch.no_grad()
def all_gather_nograd(x: torch.Tensor, same_size: bool = False) -> torch.Tensor:
    """Concatenate ``x`` from all ranks in rank order (first dimension may differ per rank unless
    ``same_size``, see :func:`all_gather_with_grad`); no gradient."""
    if not is_dist():
        return x
    dtype = x.dtype
    if dtype == torch.bool:
        x = x.to(torch.uint8)
    out = _gather_padded(x, _gather_sizes(x.shape[0], x.device, same_size))
    return out.to(dtype)


def all_gather_object(obj: Any) -> list[Any]:
    """Python objects from every rank (list in rank order)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
