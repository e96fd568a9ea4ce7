"""The reader worker process (runs in a child of :class:`~mstar_extract.reading.pool.ReaderPool`)."""

from __future__ import annotations

import signal
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from mstar_extract.errors import ReadError, SlideError, SlideOpenError
from mstar_extract.reading.reader import PatchReader
from mstar_extract.tiling import ReadPlan

ERRORS: dict[str, type[SlideError]] = {"ReadError": ReadError, "SlideOpenError": SlideOpenError, "SlideError": SlideError}


@dataclass
class WorkerOptions:
    batch_size: int
    out_size: int
    skip_bad_patches: bool
    tile_cache_mb: float
    method: str
    decode: str = "full"


def error_message(exc: BaseException, path: str) -> tuple[str, str, str]:
    """(error class name, path, reason) of an exception, to rebuild it in the main process."""
    if isinstance(exc, SlideError):
        kind = type(exc).__name__ if type(exc).__name__ in ERRORS else "SlideError"
        return kind, exc.path, exc.reason
    return "SlideError", path, f"unexpected {type(exc).__name__} while reading: {exc}"


# ------------------------------------------------------------------------------------------------ worker side
def warm_up() -> None:  # pragma: no cover - child
    """Import the decoders and the usual slide backend before the first job (they are imported lazily)."""
    import importlib

    for name in ("tifffile", "imagecodecs", "PIL.Image", "openslide", "mstar_extract.slides.openslide_backend"):
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a missing optional backend is found out when a slide needs it
            pass


class WorkerState:  # pragma: no cover - child
    """One reader worker's state: the shared-memory ring (or none: pipes) and the open slides' readers."""

    def __init__(self, shm_name: str | None, n_slots: int, opts: WorkerOptions) -> None:
        self.opts = opts
        self.shm: Any = None
        self.slots: np.ndarray | None = None
        if shm_name is not None:
            from multiprocessing import shared_memory

            s = opts.out_size
            self.shm = shared_memory.SharedMemory(name=shm_name)
            self.slots = np.ndarray((n_slots, opts.batch_size, s, s, 3), np.uint8, buffer=self.shm.buf)
        self.readers: OrderedDict[int, PatchReader | BaseException] = OrderedDict()

    def reader_for(self, seq: int, path: str, backend: str, meta: ReadPlan) -> PatchReader:
        """The reader of job ``seq`` (opened once; an open failure is remembered and raised again)."""
        if seq in self.readers:
            r = self.readers[seq]
            if isinstance(r, BaseException):
                raise r
            return r
        while len(self.readers) >= 2:  # keep the current and the next slide open
            _, old = self.readers.popitem(last=False)
            if isinstance(old, PatchReader):
                old.close()
        o = self.opts
        try:
            r = PatchReader(meta, path, backend, o.out_size, o.batch_size, method=o.method,  # type: ignore[arg-type]
                            skip_bad_patches=o.skip_bad_patches, tile_cache_mb=o.tile_cache_mb,
                            decode=o.decode)  # type: ignore[arg-type]
            _ = r.slide  # open now: an unreadable file fails here, once per job and worker
        except Exception as exc:
            self.readers[seq] = exc
            raise
        self.readers[seq] = r
        return r

    def answer(self, task: tuple) -> tuple:
        """Read one chunk of patches: a ``batch`` message (pixels in the ring slot, or in the message) or an
        ``error`` message (every failure is a per-slide message)."""
        seq, chunk, slot, path, backend, meta, coords = task
        try:
            reader = self.reader_for(seq, path, backend, meta)
            n, s = coords.shape[0], self.opts.out_size
            out = self.slots[slot] if self.slots is not None else np.empty((n, s, s, 3), np.uint8)
            ok, msgs = reader.read_coords(coords, out)
            good = np.flatnonzero(ok)
            if good.shape[0] < n and good.shape[0]:
                out[: good.shape[0]] = out[good]
            pixels = None if self.slots is not None else out[: good.shape[0]]
            return ("batch", seq, chunk, slot, good, np.flatnonzero(~ok), msgs, pixels)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a per-slide message
            kind, epath, reason = error_message(exc, path)
            return ("error", seq, chunk, slot, kind, epath, reason)

    def close(self) -> None:
        for r in self.readers.values():
            if isinstance(r, PatchReader):
                r.close()
        if self.shm is not None:
            self.slots = None  # the ring's view goes before the segment is closed
            self.shm.close()


def worker_main(tasks: Any, results: Any, shm_name: str | None, n_slots: int,
                opts: WorkerOptions) -> None:  # pragma: no cover - child
    """Worker loop: receive ``(seq, chunk, slot, path, backend, meta_plan, coords)``, answer one message each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import cv2

        cv2.setNumThreads(1)
    except Exception:  # noqa: BLE001 - cv2 is only a speed-up here
        pass
    worker = WorkerState(shm_name, n_slots, opts)
    warm_up()
    try:
        results.send(("ready", -1, -1, -1))
    except (BrokenPipeError, OSError):
        worker.close()
        return
    try:
        while True:
            try:
                task = tasks.recv()
            except (EOFError, OSError):
                break  # the main process went away
            if task is None:
                break
            try:
                results.send(worker.answer(task))
            except (BrokenPipeError, OSError):
                break
    finally:
        worker.close()
