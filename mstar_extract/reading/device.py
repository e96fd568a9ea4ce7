"""Consumer side: move uint8 patch batches to the model's device (pinned memory, non-blocking copy).

Workers ship uint8 (4x less than float32); resizing is already done, normalisation happens on the device.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class DeviceFeeder:
    """Copies (B, S, S, 3) uint8 batches to ``device`` as (B, 3, S, S) uint8 tensors in channels-last layout.

    On CUDA the batch is first copied into a pinned host buffer (reused, one per in-flight copy) and then sent
    with ``non_blocking=True`` on a side stream, so the next batch's copy overlaps the current batch's compute.
    The returned tensor is safe to use on the current stream (the feeder makes it wait for the copy). On CPU the
    pixels are copied once (a reader pool's shared-memory slot is reused after the next batch) and wrapped with
    ``torch.from_numpy``.
    """

    def __init__(self, device: Any = "cpu", buffers: int = 2) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self._pinned: list[Any] = []
        self._events: list[Any] = []
        self._next = 0
        self._n = max(1, buffers)
        self._stream = torch.cuda.Stream(device=self.device) if self.cuda else None

    def __call__(self, pixels: np.ndarray) -> Any:
        """(B, S, S, 3) uint8 numpy -> (B, 3, S, S) uint8 tensor on the device (channels-last memory)."""
        torch = self.torch
        if not self.cuda:
            return torch.from_numpy(np.array(pixels, copy=True)).permute(0, 3, 1, 2)
        b = pixels.shape[0]
        k = self._next
        self._next = (k + 1) % self._n
        if len(self._pinned) <= k:
            self._pinned.append(torch.empty(pixels.shape, dtype=torch.uint8).pin_memory())
            self._events.append(None)
        elif self._pinned[k].shape[0] < b or self._pinned[k].shape[1:] != pixels.shape[1:]:
            self._pinned[k] = torch.empty(pixels.shape, dtype=torch.uint8).pin_memory()
        if self._events[k] is not None:
            self._events[k].synchronize()  # the previous copy out of this pinned buffer is finished
        host = self._pinned[k][:b]
        host.numpy()[...] = pixels
        with torch.cuda.stream(self._stream):
            dev = host.to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._stream)
        self._events[k] = ev
        torch.cuda.current_stream(self.device).wait_event(ev)
        dev.record_stream(torch.cuda.current_stream(self.device))
        return dev.permute(0, 3, 1, 2)


def to_device(pixels: np.ndarray, device: Any = "cpu") -> Any:
    """One-off helper: (B, S, S, 3) uint8 -> (B, 3, S, S) uint8 tensor on ``device`` (pinned + non-blocking on CUDA)."""
    return DeviceFeeder(device, buffers=1)(pixels)
