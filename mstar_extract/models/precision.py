"""Which autocast precision a device runs well: the one rule shared by extraction and pretraining.

``torch.cuda.is_bf16_supported()`` answers True on GPUs that only *emulate* bf16 (V100, T4: compute capability
< 8.0), where bf16 matmuls are several times slower than fp16. We ask with ``including_emulation=False`` for the
target device, and pick fp16 there instead (training then needs a ``GradScaler``; the callers say so).
"""

from __future__ import annotations

from typing import Any


def native_bf16(device: Any) -> bool:
    """True when ``device`` (a ``torch.device``) is a CUDA GPU with bf16 hardware (compute capability >= 8.0)."""
    import torch

    if getattr(device, "type", None) != "cuda" or not torch.cuda.is_available():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch < 2.3 has no including_emulation: compute capability decides
            return torch.cuda.get_device_capability(index) >= (8, 0)


def precision_for(device_type: str, bf16_hardware: bool) -> str:
    """The rule: ``fp32`` off CUDA; on CUDA ``bf16`` with bf16 hardware, else ``fp16``."""
    if device_type != "cuda":
        return "fp32"
    return "bf16" if bf16_hardware else "fp16"


def auto_precision(device: Any) -> str:
    """``bf16`` on a CUDA GPU with bf16 hardware, ``fp16`` on an older GPU, ``fp32`` on the CPU."""
    device_type = getattr(device, "type", None) or "cpu"
    return precision_for(device_type, device_type == "cuda" and native_bf16(device))
