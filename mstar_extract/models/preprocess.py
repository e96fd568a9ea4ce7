"""Model-side preprocessing of uint8 patch batches, on the model's device (docs/models.md).

Reference meaning (mSTAR): the 20x 256-px patch resized to 224 (bilinear, antialiased), scaled to [0, 1],
normalised with the ImageNet mean/std. Readers ship uint8 ``(B, H, W, 3)`` batches (4x smaller than float32);
this module turns them into the network's ``(B, 3, S, S)`` float input, channels-last:

1. to float32 and ``(B, 3, H, W)``;
2. only when ``H`` or ``W`` differs from ``S``: ``torch.nn.functional.interpolate(mode="bilinear",
   antialias=True, align_corners=False)`` — the same triangle filter with support scaled by the
   downsampling factor as PIL's ``Image.resize(BILINEAR)`` / torchvision ``Resize`` (so 256 -> 224 matches
   the reference up to PIL's rounding to uint8, < 0.5/255);
3. ``/ 255``, then ``(x - mean) / std``; the result is channels-last (``torch.channels_last``).

The resize runs in float32 whatever the inference precision; autocast casts afterwards.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def as_uint8_batch(batch: "torch.Tensor | np.ndarray", device: torch.device | str | None = None) -> torch.Tensor:
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
def _mean_std_255(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean * 255`` and ``std * 255`` as (1, 3, 1, 1) tensors on ``device``, made once: building them per batch
    copies from pageable host memory, which synchronises the CUDA stream on every batch."""
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable inside and outside inference_mode
        m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
        s = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1) * 255.0
    return m, s


def preprocess(
    batch: "torch.Tensor | np.ndarray",
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
    m, s = _mean_std_255(tuple(float(v) for v in mean), tuple(float(v) for v in std), x.device)
    x = (x - m) / s  # == (x / 255 - mean) / std, in one pass
    return x.contiguous(memory_format=torch.channels_last)
