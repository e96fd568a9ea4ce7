"""Find where a piece of torch code would make the host wait for the device, on any machine (the CPU too).

:class:`HostSyncRecorder` is a :class:`~torch.utils._python_dispatch.TorchDispatchMode`: PyTorch's dispatcher
hands it every aten operation that runs inside it, on whatever device. It records the operations whose result
the host must wait for on a GPU:

* ``aten._local_scalar_dense`` — behind ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``if t:``;
* ``aten.nonzero``, ``aten.masked_select``, ``aten.unique*`` — output sizes that depend on the data;
* ``aten.index.Tensor`` with a boolean index (``x[mask]``: a nonzero underneath);
* ``aten.equal`` (``torch.equal``).

Two host-side reads are not recorded, because their tensors live on the CPU whatever the training device:
the optimisers' step counters (with ``capturable=False``, the default, torch keeps them on the CPU; frames in
``torch/optim/``) and the DataLoader's seed draw when an epoch's loader starts (``torch/utils/data/``).
Callers may ignore other frames too (``ignore=("transformers/",)``) and say so.

``step`` is a label the caller moves forward (e.g. at each batch a loader yields), so every record says during
which training step it happened. On a real GPU, ``torch.cuda.set_sync_debug_mode("error")`` is the direct check.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
SYNC_OPS = {
    _aten._local_scalar_dense.default,
    _aten.nonzero.default,
    _aten.masked_select.default,
    _aten.equal.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
}
HOST_SIDE = ("torch/optim/", "torch/utils/data/")
"""Frames whose scalar reads are host-side by design (CPU tensors: optimiser step counters, loader seeds)."""


@dataclass
class SyncRecord:
    step: int
    op: str
    where: str
    """The innermost frame outside torch itself (``file:line``): the code that asked."""


def _bool_index(func: Any, args: tuple[Any, ...]) -> bool:
    if func is not _aten.index.Tensor or len(args) < 2:
        return False
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1] if t is not None)


class HostSyncRecorder(TorchDispatchMode):
    """Records the host-synchronising aten ops run inside it (see the module docstring)."""

    def __init__(self, ignore: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.ignore = tuple(ignore)
        self.step = 0
        self.records: list[SyncRecord] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        if func in SYNC_OPS or _bool_index(func, args):
            frames = [f for f in traceback.extract_stack()[:-1] if "torch/utils/_python_dispatch" not in f.filename
                      and "mstar_extract/testing/syncs" not in f.filename]
            files = [f.filename.replace("\\", "/") for f in frames]
            if not any(h in fn for fn in files for h in (*HOST_SIDE, *self.ignore)):
                ours = [f for f in frames if "site-packages/torch/" not in f.filename.replace("\\", "/")] or frames
                where = f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "?"
                self.records.append(SyncRecord(self.step, str(func), where))
        return func(*args, **(kwargs or {}))

    def steps_with_syncs(self) -> set[int]:
        return {r.step for r in self.records}
