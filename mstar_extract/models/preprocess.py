"""Model-side preprocessing of uint8 patch batches, on the model's device (docs/models.md).

The reference (mSTAR's ``Feature_extract``, ``models/mSTAR.py``)::

    transforms.Compose([transforms.Resize(224), transforms.ToTensor(),
                        transforms.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])

The reader (:mod:`mstar_extract.reading`) already delivers the uint8 image that ``ToTensor`` receives (the
footprint resized to 224 by PIL bilinear, bit-identical to ``Resize(224)``). This module does the rest exactly as
torchvision does it, so the float input equals the reference's bit for bit (tested):

1. to float32 and ``(B, 3, H, W)``;
2. ``/ 255`` (``ToTensor``), then ``(x - mean) / std`` with float32 mean/std (``Normalize``);
3. the result is channels-last (``torch.channels_last``).

Batches whose side is not ``S`` (callers other than the reader) are first resized on the device with
``torch.nn.functional.interpolate(mode="bilinear", antialias=True)`` in float32: the same filter as PIL's, but
not bit-identical to it (within about one grey level). The resize and normalisation run in float32 whatever
the inference precision; autocast casts afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def as_uint8_batch(batch: torch.Tensor | np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """A ``(B, H, W, 3)`` uint8 tensor on ``device`` (numpy accepted; CPU tensors copied non-blocking)."""
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(np.ascontiguousarray(batch))
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"expected a uint8 tensor or array (B, H, W, 3), got {type(batch).__name__}")
    if batch.dtype != torch.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, H, W, 3), got {batch.dtype} {tuple(batch.shape)}")
    if device is not None and batch.device != torch.device(device):
        batch = batch.to(device, non_blocking=batch.is_pinned())
    return batch


@functools.lru_cache(maxsize=16)
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` as float32 (1, 3, 1, 1) tensors on ``device`` (as ``Normalize`` makes them), made once:
    building them per batch copies from pageable host memory, which synchronises the CUDA stream every batch."""
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable inside and outside inference_mode
        m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return m, s


def preprocess(
    batch: torch.Tensor | np.ndarray,
    input_size: int = 224,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """uint8 ``(B, H, W, 3)`` -> float32 ``(B, 3, S, S)`` channels-last, resized (if needed) and normalised."""
    x = as_uint8_batch(batch, device)
    x = x.permute(0, 3, 1, 2).float()
    if x.shape[-2] != input_size or x.shape[-1] != input_size:
        x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", antialias=True, align_corners=False)
    m, s = _mean_std(tuple(float(v) for v in mean), tuple(float(v) for v in std), x.device)
    x = x.div(255.0).sub_(m).div_(s)  # ToTensor's div(255), then Normalize's sub_(mean).div_(std): same rounding
    return x.contiguous(memory_format=torch.channels_last)
