"""Reading patches: tile-aware batched reader, worker pool across slides, device feeding (docs/architecture.md).

Public surface::

    PatchReader(plan, slide_or_path, backend="auto", out_size=224, batch_size=64, skip_bad_patches=False,
                decode="full")   # "full": the official pipeline's pixels; "reduced": --fast-decode
        -> iterates PatchBatch(indices, pixels (B,S,S,3) uint8, coords, bad_indices, bad_reasons)
    read_patches_naive(plan, slide_or_path, backend="auto", out_size=224) -> (N,S,S,3) uint8  (baseline)
    ReaderPool(workers=N, batch_size=..., ...): submit(SlideJob(slide_id, path, plan, backend)); results()
    DeviceFeeder(device)(pixels) -> (B,3,S,S) uint8 tensor on the device (pinned, non-blocking)
    resize_patch(img, out_size)   the one resize used everywhere: PIL bilinear, as torchvision Resize(224)
"""

from mstar_extract.reading.batch import PatchBatch
from mstar_extract.reading.device import DeviceFeeder, to_device
from mstar_extract.reading.pool import ReaderPool, SlideJob, SlideStream
from mstar_extract.reading.reader import PatchReader, grid_order, read_patches_naive
from mstar_extract.reading.resize import resize_patch

__all__ = [
    "DeviceFeeder",
    "PatchBatch",
    "PatchReader",
    "ReaderPool",
    "SlideJob",
    "SlideStream",
    "grid_order",
    "read_patches_naive",
    "resize_patch",
    "to_device",
]
