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


def worker_main(tasks: Any, results: Any, shm_name: str | None, n_slots: int,
                opts: WorkerOptions) -> None:  # pragma: no cover - child
    """Worker loop: receive ``(seq, chunk, slot, path, backend, meta_plan, coords)``, answer one message each."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import cv2

        cv2.setNumThreads(1)
    except Exception:  # noqa: BLE001
        pass
    shm = None
    slots: np.ndarray | None = None
    s = opts.out_size
    if shm_name is not None:
        from multiprocessing import shared_memory

        shm = shared_memory.SharedMemory(name=shm_name)
        slots = np.ndarray((n_slots, opts.batch_size, s, s, 3), np.uint8, buffer=shm.buf)
    readers: OrderedDict[int, PatchReader | BaseException] = OrderedDict()
    warm_up()
    try:
        results.send(("ready", -1, -1, -1))
    except (BrokenPipeError, OSError):
        return

    def reader_for(seq: int, path: str, backend: str, meta: ReadPlan) -> PatchReader:
        if seq in readers:
            r = readers[seq]
            if isinstance(r, BaseException):
                raise r
            return r
        while len(readers) >= 2:  # keep the current and the next slide open
            _, old = readers.popitem(last=False)
            if isinstance(old, PatchReader):
                old.close()
        try:
            r = PatchReader(meta, path, backend, opts.out_size, opts.batch_size, method=opts.method,  # type: ignore[arg-type]
                            skip_bad_patches=opts.skip_bad_patches, tile_cache_mb=opts.tile_cache_mb,
                            decode=opts.decode)  # type: ignore[arg-type]
            _ = r.slide  # open now: an unreadable file fails here, once per job and worker
        except Exception as exc:
            readers[seq] = exc
            raise
        readers[seq] = r
        return r

    try:
        while True:
            try:
                task = tasks.recv()
            except (EOFError, OSError):
                break  # the main process went away
            if task is None:
                break
            seq, chunk, slot, path, backend, meta, coords = task
            try:
                reader = reader_for(seq, path, backend, meta)
                n = coords.shape[0]
                out = slots[slot] if slots is not None else np.empty((n, s, s, 3), np.uint8)
                ok, msgs = reader.read_coords(coords, out)
                good = np.flatnonzero(ok)
                if good.shape[0] < n and good.shape[0]:
                    out[: good.shape[0]] = out[good]
                pixels = None if slots is not None else out[: good.shape[0]]
                msg: tuple = ("batch", seq, chunk, slot, good, np.flatnonzero(~ok), msgs, pixels)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a per-slide message
                kind, epath, reason = error_message(exc, path)
                msg = ("error", seq, chunk, slot, kind, epath, reason)
            try:
                results.send(msg)
            except (BrokenPipeError, OSError):
                break
    finally:
        for r in readers.values():
            if isinstance(r, PatchReader):
                r.close()
        if shm is not None:
            del slots
            shm.close()
