"""Reader worker processes that persist across slides (docs/architecture.md, "reading").

The main process submits :class:`SlideJob` objects; :meth:`ReaderPool.results` yields one :class:`SlideStream`
per job, in submission order, and each stream yields that slide's :class:`PatchBatch` objects in grid order
(``batch.indices`` are plan rows, so the consumer can also reassemble any order).

How work flows:

* each slide's plan is cut into batch-sized *tasks* (plan rows in row-major order). Tasks of the current slide
  and of the next ``lookahead`` slides are handed out in order, so while the consumer runs inference on slide k
  the workers already read slide k+1;
* the main process gives each worker up to ``depth`` tasks at a time, each with a *slot* of a shared-memory ring
  (one block of ``slots`` x batch x S x S x 3 uint8); the worker decodes the batch straight into its slot and
  answers with a few bytes (rows kept, rows dropped). Slots bound the memory in flight. The ring is sized to the
  free space of ``/dev/shm`` (less a headroom) and its pages are reserved before any worker starts, so a small
  ``/dev/shm`` (Docker's 64 MB default) means fewer slots, never a worker killed by SIGBUS. Without usable shared
  memory (``transport="queue"``, or fewer than ``workers + 1`` slots fit) pixels travel pickled through the
  worker's pipe; one warning line says which;
* one pipe per direction per worker (no lock shared between workers), so a worker killed at any moment cannot
  block the others; the main process watches each worker's process sentinel: a dead worker fails the slide
  whose batch it was reading (clear reason), its other tasks are handed to a fresh worker;
* a worker keeps the current and the next slide open (one :class:`PatchReader` each: file handles and the tile
  cache), opening each slide once per job;
* a slide-level error (cannot open, corrupt tile) travels as a message and fails only that slide's stream;
* workers ignore SIGINT (Ctrl-C reaches the main process, whose ``close()`` stops them) and exit on their own
  when the main process goes away (their pipe closes).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from mstar_extract.errors import MstarError, SlideError
from mstar_extract.reading._worker import ERRORS, WorkerOptions, error_message, worker_main
from mstar_extract.reading.batch import PatchBatch
from mstar_extract.reading.reader import DEFAULT_OUT_SIZE, PatchReader, grid_order
from mstar_extract.tiling import ReadPlan

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.context import ForkContext, ForkServerContext, SpawnContext
    from multiprocessing.shared_memory import SharedMemory

log = logging.getLogger("mstar.reading")

@dataclass
class SlideJob:
    """One slide to read: its id, file, backend and read plan."""

    slide_id: str
    path: str
    plan: ReadPlan
    backend: str = "auto"



# ------------------------------------------------------------------------------------------- shared memory
SHM_DIR = "/dev/shm"
SHM_HEADROOM = 0.25
"""Fraction of the free ``/dev/shm`` left to others (NCCL, data loaders, the other ranks of the node)."""
SHM_MIN_HEADROOM = 16 << 20
"""... and never less than this many bytes."""


def shm_free_bytes(path: str = SHM_DIR) -> int | None:
    """Free bytes of the shared-memory file system (``statvfs``), or ``None`` where there is none to ask."""
    try:
        st = os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return int(st.f_bavail) * int(st.f_frsize)


def ring_slots(wanted: int, minimum: int, slot_bytes: int, free: int | None) -> int:
    """How many ring slots to create: ``wanted``, cut to what fits in ``free`` bytes less the headroom;
    ``0`` (use pipes) when fewer than ``minimum`` fit. ``free=None`` (unknown) keeps ``wanted``."""
    if free is None:
        return wanted
    budget = free - max(SHM_MIN_HEADROOM, int(free * SHM_HEADROOM))
    fit = min(wanted, max(0, budget) // max(1, slot_bytes))
    return fit if fit >= min(minimum, wanted) else 0


def _reserve(shm: Any, nbytes: int) -> None:
    """Allocate the segment's pages now (ENOSPC here instead of SIGBUS in a worker later)."""
    fd = getattr(shm, "_fd", -1)
    if fd >= 0 and hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, nbytes)


def _discard(shm: Any) -> None:
    for step in (shm.close, shm.unlink):
        try:
            step()
        except Exception:  # noqa: BLE001 - best effort
            pass


def _mb(nbytes: int | None) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes is not None else "? MiB"


def _shm_text(free: int | None) -> str:
    return f"{SHM_DIR} has {_mb(free)} free" if free is not None else "shared memory"


# ------------------------------------------------------------------------------------------------ main side
@dataclass
class _Worker:
    proc: Any
    tasks: Any
    results: Any
    inflight: list[tuple[int, int, int]] = field(default_factory=list)
    """(seq, chunk, slot) handed to this worker, oldest (being read) first."""
    ready: bool = False
    """The worker has imported everything and attached the shared memory."""


class SlideStream:
    """The batches of one slide, from a :class:`ReaderPool`. Iterate once; raises the slide's error if it fails.

    After iteration: ``bad_indices``/``bad_reasons`` (patches dropped with ``skip_bad_patches``), ``n_bad``.
    """

    def __init__(self, pool: ReaderPool, seq: int, job: SlideJob) -> None:
        self._pool = pool
        self.seq = seq
        self.job = job
        self.slide_id = job.slide_id
        self.path = job.path
        self.n_patches = len(job.plan)
        self.bad_indices: list[int] = []
        self.bad_reasons: list[str] = []
        self.error: SlideError | None = None
        self.finished = False

    @property
    def n_bad(self) -> int:
        return len(self.bad_indices)

    def __iter__(self) -> Iterator[PatchBatch]:
        return self._pool._iterate(self)


@contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start a worker without re-running the caller's ``__main__``: spawn/forkserver children re-import the main
    script (running its unguarded top level again, and failing outright for code read from stdin), but reader
    workers need only this package. Hides ``__main__.__file__``/``__spec__`` while the child is launched."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved: dict[str, Any] = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    main.__dict__.pop("__file__", None)
    main.__dict__["__spec__"] = None
    try:
        yield
    finally:
        main.__dict__.pop("__spec__", None)
        main.__dict__.update(saved)


class ReaderPool:
    """Persistent reader processes. ``workers=0`` reads in the calling process (debugging).

    Usage::

        with ReaderPool(workers=4, batch_size=256) as pool:
            for job in jobs:
                pool.submit(job)
            for stream in pool.results():          # one per job, in submission order
                try:
                    for batch in stream:           # PatchBatch, grid order; pixels valid until the next batch
                        ...
                except SlideError as err:          # this slide failed; the pool goes on with the next
                    ...

    ``results()`` may start before every job is submitted; it ends once every submitted job was yielded.
    """

    def __init__(self, workers: int = 1, batch_size: int = 64, out_size: int = DEFAULT_OUT_SIZE, *,
                 skip_bad_patches: bool = False, tile_cache_mb: float = 128, method: str = "auto",
                 lookahead: int = 1, depth: int = 2, slots: int | None = None, transport: str = "shm",
                 mp_context: str | None = None, decode: str = "full") -> None:
        if workers < 0:
            raise ValueError("workers must be >= 0")
        if transport not in ("shm", "queue"):
            raise ValueError("transport must be 'shm' or 'queue'")
        if decode not in ("full", "reduced"):
            raise ValueError(f"decode must be 'full' or 'reduced', got {decode!r}")
        self.workers = int(workers)
        self.opts = WorkerOptions(int(batch_size), int(out_size), bool(skip_bad_patches), float(tile_cache_mb), method,
                             str(decode))
        self.lookahead = max(0, int(lookahead))
        self.depth = max(1, int(depth))
        self.n_slots = int(slots) if slots else self.workers * self.depth + 2
        self.transport = transport
        self._jobs: list[SlideJob] = []
        self._paths: list[str] = []
        self._chunks: dict[int, list[np.ndarray]] = {}
        self._backlog: deque[tuple[int, int]] = deque()
        self._queued_upto = -1  # jobs with seq <= this have their tasks in the backlog
        self._current = 0
        self._pending: dict[int, dict[int, tuple]] = {}
        self._errors: dict[int, SlideError] = {}
        self._free: list[int] = list(range(self.n_slots))
        self._closed = False
        self._shm: SharedMemory | None = None
        self._slots: np.ndarray | None = None
        self._workers: list[_Worker] = []
        self._deaths = 0
        self._answers = 0
        if self.workers == 0:
            return
        # typeshed types a context picked by a run-time name as BaseContext, which lacks Process; every real one has it
        self._ctx = cast("SpawnContext | ForkServerContext | ForkContext",
                         mp.get_context(mp_context or ("forkserver" if sys.platform.startswith("linux") else "spawn")))
        if transport == "shm":
            self._open_ring(out_size)
        self._workers = [self._start_worker() for _ in range(self.workers)]

    def _open_ring(self, out_size: int) -> None:
        """Create the shared-memory ring, sized to the free space of ``/dev/shm`` and reserved up front.

        A shared-memory segment larger than the free space is created without complaint and fails only when a
        worker writes into it (SIGBUS), so the ring is cut to what fits (at least ``workers + 1`` slots) and its
        pages are reserved with ``posix_fallocate`` before any worker starts; when even that fails, reader
        batches travel through pipes. Either way one warning line says so.
        """
        from multiprocessing import shared_memory

        slot_bytes = self.opts.batch_size * out_size * out_size * 3
        wanted, free = self.n_slots, shm_free_bytes()
        n = ring_slots(wanted, self.workers + 1, slot_bytes, free)
        shm, why = None, None
        if n == 0:
            why = "too small"
        else:
            try:
                shm = shared_memory.SharedMemory(create=True, size=n * slot_bytes)
                _reserve(shm, n * slot_bytes)
            except OSError as exc:
                why = f"cannot hold it ({exc})"
                if shm is not None:
                    _discard(shm)
                    shm = None
        if shm is None:
            log.warning("%s: %s for the reader ring (at least %d slots of %s: --workers %d, --batch-size %d); "
                        "reader batches travel through pipes instead (slower; give the container more, e.g. "
                        "docker --shm-size=8g)",
                        _shm_text(free), why, self.workers + 1, _mb(slot_bytes), self.workers, self.opts.batch_size)
            self.transport = "queue"
            return
        if n < wanted:
            log.warning("%s: reader ring cut to %d of %d slots of %s (--workers %d, --batch-size %d) so that it fits",
                        _shm_text(free), n, wanted, _mb(slot_bytes), self.workers, self.opts.batch_size)
        self._shm = shm
        self.n_slots = n
        self._free = list(range(n))
        self._slots = np.ndarray((n, self.opts.batch_size, out_size, out_size, 3), np.uint8, buffer=shm.buf)

    # -- workers ----------------------------------------------------------------------------------------------
    def _start_worker(self) -> _Worker:
        task_r, task_w = self._ctx.Pipe(duplex=False)
        res_r, res_w = self._ctx.Pipe(duplex=False)
        shm_name = self._shm.name if self._shm is not None and self.transport == "shm" else None
        proc = self._ctx.Process(target=worker_main, name="mstar-reader", daemon=True,
                                 args=(task_r, res_w, shm_name, self.n_slots, self.opts))
        with _main_module_hidden():
            proc.start()
        task_r.close()
        res_w.close()
        return _Worker(proc, task_w, res_r)

    def _worker_died(self, wid: int) -> None:
        """Fail the slide whose batch the dead worker was reading; hand its other tasks to a new worker."""
        w = self._workers[wid]
        w.proc.join(0.1)
        if w.proc.is_alive():  # its pipe broke but it still runs: stop it before its slots are handed out again
            w.proc.kill()
            w.proc.join(1.0)
        code = w.proc.exitcode
        how = f"exit code {code}"
        if code is not None and code < 0:
            try:
                how = f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        retry: list[tuple[int, int]] = []
        for k, (seq, chunk, slot) in enumerate(w.inflight):
            self._free.append(slot)
            if k == 0:
                self._fail(seq, SlideError(self._paths[seq], f"reader worker process died ({how}) while reading "
                                                                 f"patch batch {chunk} of this slide (out of memory? "
                                                                 f"a crash in the image decoder?)"))
            elif seq not in self._errors:
                retry.append((seq, chunk))
        self._backlog.extendleft(reversed(retry))  # first in task order
        log.warning("reader worker pid %s died (%s); starting a new one", w.proc.pid, how)
        self._deaths += 1
        if self._deaths > 3 * self.workers + 3 and self._deaths > 2 * self._answers:
            raise MstarError(f"reader worker processes keep dying ({how}, {self._deaths} times); "
                             "rerun with --workers 0 to read in the main process and see the error")
        for conn in (w.tasks, w.results):
            conn.close()
        self._workers[wid] = self._start_worker()

    def _fail(self, seq: int, err: SlideError) -> None:
        if seq >= self._current and seq not in self._errors:
            self._errors[seq] = err

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Block until every worker has started (imports done); True if all are ready within ``timeout``."""
        deadline = time.monotonic() + timeout
        while not all(w.ready for w in self._workers) and time.monotonic() < deadline:
            self._receive(timeout=0.2)
        return all(w.ready for w in self._workers)

    # -- jobs and dispatch ------------------------------------------------------------------------------------
    def submit(self, job: SlideJob) -> int:
        """Queue a slide; returns its sequence number. Reading starts when it is within ``lookahead`` slides."""
        if self._closed:
            raise RuntimeError("the reader pool is closed")
        self._jobs.append(job)
        self._paths.append(str(job.path))
        seq = len(self._jobs) - 1
        order = grid_order(job.plan.coords)
        self._chunks[seq] = [order[i : i + self.opts.batch_size] for i in range(0, order.shape[0], self.opts.batch_size)]
        self._dispatch()
        return seq

    def _dispatch(self) -> None:
        """Hand tasks to workers while slots are free and workers have room (in task order)."""
        if self.workers == 0:
            return
        while self._queued_upto + 1 < len(self._jobs) and self._queued_upto + 1 <= self._current + self.lookahead:
            self._queued_upto += 1
            seq = self._queued_upto
            self._backlog.extend((seq, c) for c in range(len(self._chunks[seq])))
        while self._backlog and self._free:
            seq, chunk = self._backlog[0]
            if seq in self._errors or seq < self._current:
                self._backlog.popleft()
                continue
            wid = min(range(len(self._workers)), key=lambda i: len(self._workers[i].inflight))
            w = self._workers[wid]
            if len(w.inflight) >= self.depth:
                return
            self._backlog.popleft()
            slot = self._free.pop()
            job = self._jobs[seq]
            meta = replace(job.plan, coords=np.zeros((0, 2), np.int64))
            rows = self._chunks[seq][chunk]
            try:
                w.tasks.send((seq, chunk, slot, str(job.path), job.backend, meta, job.plan.coords[rows]))
            except (BrokenPipeError, OSError):
                self._free.append(slot)
                self._backlog.appendleft((seq, chunk))
                self._worker_died(wid)
                continue
            w.inflight.append((seq, chunk, slot))

    def _release(self, slot: int) -> None:
        self._free.append(slot)
        self._dispatch()

    def _receive(self, timeout: float = 1.0) -> None:
        """Wait for worker messages (or a dead worker) and file them."""
        self._dispatch()
        conns = {w.results: i for i, w in enumerate(self._workers)}
        sentinels = {w.proc.sentinel: i for i, w in enumerate(self._workers)}
        ready = wait(list(conns) + list(sentinels), timeout)
        dead: set[int] = set()
        for obj in ready:
            if obj in conns:
                wid, conn = conns[obj], cast("Connection", obj)
                try:
                    while conn.poll():
                        self._file(wid, conn.recv())
                except (EOFError, OSError):
                    dead.add(wid)
            else:
                dead.add(sentinels[obj])
        for wid in sorted(dead):
            w = self._workers[wid]
            try:  # messages it sent before dying still count
                while w.results.poll():
                    self._file(wid, w.results.recv())
            except (EOFError, OSError):
                pass
            self._worker_died(wid)
        self._dispatch()

    def _file(self, wid: int, msg: tuple) -> None:
        kind, seq, chunk, slot = msg[:4]
        w = self._workers[wid]
        if kind == "ready":
            w.ready = True
            return
        self._answers += 1
        w.inflight = [t for t in w.inflight if (t[0], t[1]) != (seq, chunk)]
        if seq < self._current or kind != "batch" or seq in self._errors:
            self._free.append(slot)
            if kind == "error":
                _, _, _, _, ekind, epath, reason = msg
                self._fail(seq, ERRORS.get(ekind, SlideError)(epath, reason))
            return
        self._pending.setdefault(seq, {})[chunk] = msg

    # -- consumption ------------------------------------------------------------------------------------------
    def results(self) -> Iterator[SlideStream]:
        """One :class:`SlideStream` per submitted job, in submission order."""
        while self._current < len(self._jobs):
            seq = self._current
            stream = SlideStream(self, seq, self._jobs[seq])
            yield stream
            if not stream.finished:  # the consumer did not read it to the end: drop the rest
                self._fail(seq, SlideError(stream.path, "reading abandoned by the consumer"))
            for msg in self._pending.pop(seq, {}).values():
                self._free.append(msg[3])
            self._chunks.pop(seq, None)
            self._errors.pop(seq, None)
            self._jobs[seq] = None  # type: ignore[call-overload]  # free the plan (thousands of slides per run)
            self._current += 1
            self._dispatch()

    def _iterate(self, stream: SlideStream) -> Iterator[PatchBatch]:
        if self.workers == 0:
            yield from self._iterate_inline(stream)
            return
        seq = stream.seq
        self._dispatch()
        for c, rows in enumerate(self._chunks.get(seq, [])):
            while True:
                if seq in self._errors:
                    for held in self._pending.pop(seq, {}).values():
                        self._free.append(held[3])
                    stream.error = self._errors[seq]
                    stream.finished = True
                    raise stream.error
                msg = self._pending.get(seq, {}).pop(c, None)
                if msg is not None:
                    break
                self._receive()
            _, _, _, slot, good, bad, msgs, pixels = msg
            if pixels is None:
                assert self._slots is not None
                pixels = self._slots[slot][: good.shape[0]]
            if bad.shape[0]:
                stream.bad_indices.extend(rows[bad].tolist())
                stream.bad_reasons.extend(msgs)
            try:
                yield PatchBatch(rows[good], pixels, stream.job.plan.coords[rows[good]], rows[bad], list(msgs))
            finally:
                self._release(slot)
        stream.finished = True

    def _iterate_inline(self, stream: SlideStream) -> Iterator[PatchBatch]:
        job = stream.job
        try:
            with PatchReader(job.plan, job.path, job.backend, self.opts.out_size, self.opts.batch_size,
                             method=self.opts.method, skip_bad_patches=self.opts.skip_bad_patches,  # type: ignore[arg-type]
                             tile_cache_mb=self.opts.tile_cache_mb, decode=self.opts.decode) as reader:  # type: ignore[arg-type]
                for batch in reader:
                    stream.bad_indices.extend(batch.bad_indices.tolist())
                    stream.bad_reasons.extend(batch.bad_reasons)
                    yield batch
        except SlideError as exc:
            stream.error = exc
            stream.finished = True
            raise
        except Exception as exc:
            kind, epath, reason = error_message(exc, job.path)
            stream.error = ERRORS[kind](epath, reason)
            stream.finished = True
            raise stream.error from exc
        stream.finished = True

    # -- lifetime ---------------------------------------------------------------------------------------------
    @property
    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [int(w.proc.pid) for w in self._workers]

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers (sentinel, then terminate stragglers) and free the shared memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.tasks.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + timeout
        for w in self._workers:
            while w.proc.is_alive() and time.monotonic() < deadline:
                try:  # keep reading so that a worker blocked on sending a large batch can finish
                    while w.results.poll():
                        w.results.recv()
                except (EOFError, OSError):
                    pass
                w.proc.join(0.05)
            if w.proc.is_alive():
                w.proc.terminate()
                w.proc.join(2.0)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(1.0)
            for conn in (w.tasks, w.results):
                conn.close()
        self._workers = []
        if self._shm is not None:
            self._slots = None
            try:
                self._shm.unlink()
            except Exception:  # noqa: BLE001
                pass
            try:
                self._shm.close()
            except BufferError:  # the consumer still holds a batch view: the mapping goes with the last view
                pass
            self._shm = None

    def __enter__(self) -> ReaderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close(timeout=1.0)
        except Exception:  # noqa: BLE001
            pass
