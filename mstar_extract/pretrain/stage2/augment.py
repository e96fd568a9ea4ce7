"""Stage-2 augmentation of uint8 patch batches on the training device, before the extraction preprocessing.

Flips and 90° rotations permute pixels exactly. Colour jitter (brightness, contrast, saturation, hue) works in
float [0, 1] and is rounded back to uint8, so :func:`mstar_extract.models.preprocess.preprocess` — the very
function extraction uses — then turns the batch into the network input. Everything is drawn from an explicit
``torch.Generator`` (seeded per step and rank), so a resumed run repeats the same augmentations.
"""

from __future__ import annotations

import functools
import math

import torch

from mstar_extract.pretrain.stage2.config import AugmentConfig

# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane.
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)


@functools.lru_cache(maxsize=8)
def _yiq(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(RGB→YIQ, YIQ→RGB) on ``device``, copied once (a copy from pageable host memory per step would wait)."""
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, usable inside and outside inference_mode
        return _RGB2YIQ.to(device), _YIQ2RGB.to(device)


def _uniform(n: int, spread: float, g: torch.Generator, device: torch.device) -> torch.Tensor:
    return 1.0 + (torch.rand(n, generator=g, device=device) * 2.0 - 1.0) * spread


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _hue_matrices(theta: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) RGB→RGB matrices rotating the YIQ chroma plane by ``theta`` (B,) radians."""
    cos, sin = torch.cos(theta), torch.sin(theta)
    one, zero = torch.ones_like(theta), torch.zeros_like(theta)
    rot = torch.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos], dim=1).view(-1, 3, 3)
    rgb2yiq, yiq2rgb = _yiq(theta.device)
    return yiq2rgb @ rot @ rgb2yiq


def color_jitter(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator, apply: torch.Tensor) -> torch.Tensor:
    """Jitter float RGB ``x`` (B, 3, H, W) in [0, 1] for rows where ``apply`` (B,) is True."""
    b, dev = x.shape[0], x.device
    view = (b, 1, 1, 1)
    keep = ~apply.view(view)
    bright = torch.where(keep, 1.0, _uniform(b, cfg.brightness, g, dev).view(view))
    contr = torch.where(keep, 1.0, _uniform(b, cfg.contrast, g, dev).view(view))
    sat = torch.where(keep, 1.0, _uniform(b, cfg.saturation, g, dev).view(view))
    hue = torch.where(apply, (torch.rand(b, generator=g, device=dev) * 2 - 1) * cfg.hue, 0.0)
    x = (x * bright).clamp_(0, 1)
    mean = _gray(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * contr + mean).clamp_(0, 1)
    gray = _gray(x)
    x = ((x - gray) * sat + gray).clamp_(0, 1)
    if cfg.hue > 0:
        x = torch.einsum("bij,bjhw->bihw", _hue_matrices(hue * 2 * math.pi), x).clamp_(0, 1)
    return x


def _rot90(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate each square patch of ``x`` (B, H, W, C) by ``k[i]`` × 90°: all four rotations, then a per-row
    selection (no data-dependent indexing, so the host never waits for ``k``)."""
    view = (-1, 1, 1, 1)
    out = torch.where((k == 1).view(view), torch.rot90(x, 1, dims=(1, 2)), x)
    out = torch.where((k == 2).view(view), torch.rot90(x, 2, dims=(1, 2)), out)
    return torch.where((k == 3).view(view), torch.rot90(x, 3, dims=(1, 2)), out)


def augment_uint8(batch: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Augment a uint8 (B, H, W, 3) batch (square patches); returns a uint8 (B, H, W, 3) batch.

    Every choice is drawn on the device and applied by per-row selection (``torch.where``), never by reading
    it back: the host does not wait for the device here. Rows not chosen for colour jitter are returned
    bit-identical."""
    b, dev = batch.shape[0], batch.device
    x = batch
    if cfg.hflip > 0:
        m = (torch.rand(b, generator=g, device=dev) < cfg.hflip).view(b, 1, 1, 1)
        x = torch.where(m, x.flip(2), x)
    if cfg.vflip > 0:
        m = (torch.rand(b, generator=g, device=dev) < cfg.vflip).view(b, 1, 1, 1)
        x = torch.where(m, x.flip(1), x)
    if cfg.rot90:
        x = _rot90(x, torch.randint(0, 4, (b,), generator=g, device=dev))
    if cfg.color_jitter > 0 and (cfg.brightness > 0 or cfg.contrast > 0 or cfg.saturation > 0 or cfg.hue > 0):
        apply = torch.rand(b, generator=g, device=dev) < cfg.color_jitter
        f = x.permute(0, 3, 1, 2).float().div_(255.0)
        f = color_jitter(f, cfg, g, apply)
        jittered = f.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        x = torch.where(apply.view(b, 1, 1, 1), jittered, x)
    return x.contiguous()
