"""The writer thread of ``mstar extract``: what a slide still needs once the model is done with it.

The main thread feeds the model; at a slide boundary it only hands the slide over and starts on the next one.
Everything else runs here, slide after slide, in the order the slides were handed over:

* **copy-back**: :class:`HostFeatures` gathers a slide's features on the device and copies them to pinned host
  memory with ``non_blocking`` copies, a group of :data:`GROUP_BATCHES` batches at a time (so the device holds
  at most one group); a CUDA event recorded after the slide's last copy is the one thing the writer waits for
  (never a device-wide synchronise, which would drain the model's queue);
* **the outputs**: the ``.pt`` (when asked) and the bag, each atomic (``extract_job.write_outputs``);
* **the record**: the slide's manifest row, its final JSONL event, its lock released — after its bag is on disk.

Outcomes decided on the main thread (skipped, failed while planning) go through the same queue, so manifest rows
and events keep the order of the slides. A problem with one slide's outputs is that slide's ``failed`` outcome;
an error that no slide can escape (a full or read-only OUT: ``write`` raises it, see ``whole_run.py``) is kept
as :attr:`SlideWriter.fatal`: the writer drops the jobs after it (their locks are released by the run, no rows)
and the main thread re-raises it (:meth:`SlideWriter.check`).

At most ``max_pending`` slides wait to be written (each holds its features in host memory): the main thread
blocks when the writer is that far behind. :meth:`SlideWriter.close` ends the thread: ``drain=True`` writes what
was handed over (normal end, Ctrl-C/SIGTERM: a handful of finished bags are kept), ``drain=False`` finishes only
the write under way. A bag is written atomically either way, so no half-written bag is ever visible.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

GROUP_BATCHES = 16
"""Batches whose features are gathered on the device before one non-blocking copy to the host."""


class HostFeatures:
    """One slide's features on their way from the device to a ``(n, D)`` float32 array (rows in plan order)."""

    def __init__(self, n: int, dim: int, device: Any) -> None:
        self.n, self.dim = int(n), int(dim)
        self.cuda = getattr(device, "type", str(device)) == "cuda"
        self._indices: list[np.ndarray] = []
        self._on_device: list[Any] = []
        self._on_host: list[Any] = []
        self._event: Any = None

    def add(self, indices: np.ndarray, feats: Any) -> None:
        """Features ``(B, D)`` of the patches ``indices`` (a device tensor; nothing waits for it here)."""
        self._indices.append(np.asarray(indices, dtype=np.int64).copy())
        self._on_device.append(feats.detach())
        if len(self._on_device) >= GROUP_BATCHES:
            self._copy_group()

    def _copy_group(self) -> None:
        import torch

        if not self._on_device:
            return
        block = torch.cat(self._on_device) if len(self._on_device) > 1 else self._on_device[0]
        self._on_device.clear()
        if self.cuda:  # queued behind the model's kernels on the same stream; pinned memory makes it asynchronous
            host = torch.empty(block.shape, dtype=block.dtype, pin_memory=True)
            host.copy_(block, non_blocking=True)
            block = host
        self._on_host.append(block)

    def seal(self) -> None:
        """Queue the last copy and record the event :meth:`result` waits for (the main thread never waits)."""
        import torch

        self._copy_group()
        if self.cuda:
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(features (n, D) float32, computed (n,) bool)``, after this slide's copies only have finished."""
        if self._event is not None:
            self._event.synchronize()
        out = np.zeros((self.n, self.dim), np.float32)
        done = np.zeros(self.n, bool)
        if self._on_host:
            idx = np.concatenate(self._indices)
            out[idx] = np.concatenate([h.float().numpy() for h in self._on_host])
            done[idx] = True
        self._on_host.clear()
        return out, done


@dataclass
class WriteJob:
    """A slide handed to the writer: its planned work, its features (None: no tissue, an empty bag) and the
    facts of its reading."""

    planned: Any
    features: HostFeatures | None = None
    n_bad: int = 0
    bad_indices: list[int] = field(default_factory=list)
    bad_reasons: list[str] = field(default_factory=list)
    read_seconds: float = 0.0
    """From the slide's first batch to its last forward pass (its patches/s)."""


class SlideWriter:
    """The thread that writes slides (``write(job) -> outcome``) and records outcomes (``record(outcome)``),
    one item at a time, in the order they were handed over (module docstring)."""

    def __init__(self, write: Callable[[WriteJob], Any], record: Callable[[Any], None], max_pending: int = 2) -> None:
        self._write, self._record = write, record
        self._queue: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._slots = threading.Semaphore(max(1, max_pending))
        self._abandon = threading.Event()
        self.fatal: BaseException | None = None
        """The error that stopped the writer (a whole-run error, or a bug); re-raised by :meth:`check`."""
        self._thread = threading.Thread(target=self._main, name="mstar-writer")
        self._thread.start()

    # -- main thread -----------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise the writer's fatal error, if it has one."""
        if self.fatal is not None:
            raise self.fatal

    def write(self, job: WriteJob) -> None:
        """Hand a finished slide over; blocks while ``max_pending`` slides are waiting to be written."""
        while not self._slots.acquire(timeout=0.5):
            self.check()
        self.check()
        self._queue.put(("write", job))

    def record(self, outcome: Any) -> None:
        """Record an outcome after every slide handed over before it."""
        self.check()
        self._queue.put(("record", outcome))

    def close(self, drain: bool = True) -> None:
        """End the thread: write what was handed over (``drain``) or only finish the write under way."""
        if not drain:
            self._abandon.set()
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    # -- writer thread ---------------------------------------------------------------------------------------
    def _main(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, payload = item
            try:
                if self.fatal is None and not self._abandon.is_set():
                    self._record(self._write(payload) if kind == "write" else payload)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread (check)
                self.fatal = exc
            finally:
                if kind == "write":
                    self._slots.release()
