"""The per-slide bookkeeping of a run: JSONL events, manifest rows, stderr lines, progress, the exit code.

Used by ``mstar tile`` and ``mstar extract``; the command owns the loop::

    runner = SlideRunner(out_dir, reporter, total=len(entries), command="tile")
    for entry in entries:
        if not runner.begin(entry):          # "started" event; False -> another process owns it
            continue
        outcome = do_the_work(entry)         # -> SlideOutcome (never raises for per-slide problems)
        runner.finish(outcome)               # manifest row + final event + stderr line on failure + progress
    return runner.close()                    # merged manifest, "summary" event, summary line, exit code

``begin`` and ``finish`` may run on different threads (``mstar extract`` records outcomes on its writer thread,
:mod:`mstar_extract.pipeline.writer`): the runner's state and its output are guarded by one lock.

JSONL events (stable field names; documented in the README): ``started`` {slide_id, path, command};
``done`` / ``skipped`` / ``no_tissue`` / ``failed`` {slide_id, path, status, n_patches, seconds, error, mpp,
command}; ``summary`` {command, total, counts{done, skipped, no_tissue, failed}, seconds, exit_code, out_dir,
unfinished, and ``interrupted: true`` after Ctrl-C/SIGTERM, ``error`` after a whole-run error}. Full schema:
docs/cli-events.md.

Exit codes: 0; 1 when a slide failed (``failed_code``: 0 for a torchrun rank, whose per-slide failures are in the
manifest, so that one bad slide does not make torchrun stop the other ranks); 3 after a whole-run error; 4 when
slides held by other processes were not done (below); 130/143 after a signal.

**Slides held by other processes.** A slide whose lock another live process holds is recorded ``skipped`` with
the reason :data:`HELD_BY_OTHERS`. Such a slide is not done: before its summary the run waits for the slides it
left to others (polling their locks every :data:`HELD_POLL_S` s) until each lock is released or stale, at most
the lock timeout, and then looks at the merged manifest. A held slide that its holder did not record as
``done``/``no_tissue`` is listed in the summary's ``unfinished`` and makes the exit code
:data:`~mstar_extract.errors.EXIT_INCOMPLETE` (4) unless a slide failed (1): a run never exits 0 while slides
of its list are not done. (No wait after a failure, an interruption or a whole-run error: the exit code is
decided then.)

**Signals.** :meth:`SlideRunner.claim` registers a slide's :class:`~mstar_extract.locks.SlideLock` before
acquiring it and :meth:`SlideRunner.release` forgets it only once it is released, so Ctrl-C/SIGTERM at any
moment (:meth:`release_all` in the callers' clean-up) leaves no lock file behind.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mstar_extract.console import Progress, Reporter
from mstar_extract.errors import EXIT_FAILED, EXIT_INCOMPLETE, EXIT_OK, EXIT_RUN
from mstar_extract.manifest import FINISHED_STATUSES, STATUSES, ManifestRow, ManifestWriter, SlideRecord
from mstar_extract.store.layout import OutLayout

if TYPE_CHECKING:
    from mstar_extract.inputs import SlideEntry, SlideRef

HELD_BY_OTHERS = "taken by another process"
"""The reason of a ``skipped`` outcome whose slide another live process holds (it is not done)."""
HELD_POLL_S = 0.5
"""Seconds between two looks at the locks of held slides while the run waits for them."""


@dataclass
class SlideOutcome(SlideRecord):
    """How one slide ended: the manifest's :class:`~mstar_extract.manifest.SlideRecord` columns plus facts
    for the final JSONL event."""

    extra: dict[str, Any] = field(default_factory=dict)
    """Additional JSON-able facts for the final event (not in the manifest)."""

    def to_row(self) -> ManifestRow:
        """The manifest row (host, pid and the finishing time are the row's own defaults)."""
        return ManifestRow(**self.record())

    @classmethod
    def failed(cls, entry: SlideRef, error: str, seconds: float | None = None, **kw: Any) -> SlideOutcome:
        return cls(slide_id=str(entry.slide_id), path=str(entry.path), status="failed", error=error, seconds=seconds, **kw)

    @classmethod
    def skipped(cls, entry: SlideRef, reason: str = "", n_patches: int | None = None, **kw: Any) -> SlideOutcome:
        return cls(slide_id=str(entry.slide_id), path=str(entry.path), status="skipped", error=reason,
                   n_patches=n_patches, seconds=0.0, **kw)


class SlideRunner:
    """Bookkeeping for one command invocation over ``total`` slides writing into ``out_dir``."""

    def __init__(self, out_dir: str | Path, reporter: Reporter, total: int, command: str,
                 lock_timeout: float | None = None, locks: bool = True, failed_code: int = EXIT_FAILED) -> None:
        self.out_dir = Path(out_dir)
        self.failed_code = failed_code
        """The exit code when slides failed (and nothing worse happened): 1, or 0 for a torchrun rank."""
        self.lock_timeout = lock_timeout
        self.use_locks = locks
        self.reporter = reporter
        self.total = int(total)
        self.command = command
        self.counts: dict[str, int] = {s: 0 for s in STATUSES}
        self.outcomes: list[SlideOutcome] = []
        self._start = time.monotonic()
        self._active: dict[str, Any] = {}
        self._locks: dict[str, Any] = {}
        self.held: dict[str, Any] = {}
        """Slides another live process held when this run reached them (slide id -> entry)."""
        self.unfinished: list[str] = []
        """Held slides still not done when the run ended (set by :meth:`close`)."""
        self._manifest: ManifestWriter | None = None
        self._progress: Progress | None = None
        self._closed = False
        self._lock = threading.RLock()

    # -- lifecycle ------------------------------------------------------------------------------------
    @property
    def manifest(self) -> ManifestWriter:
        if self._manifest is None:
            self._manifest = ManifestWriter(self.out_dir)
        return self._manifest

    @property
    def progress(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(self.reporter, self.total, f"{self.command}: slides", "slide")
        return self._progress

    def claim(self, entry: SlideEntry) -> bool:
        """Take ownership of ``entry`` for this process with its lock file ``OUT/.locks/<slide_id>.lock``
        (atomic create; stale locks of dead processes or older than the lock timeout are taken over).
        False when another live process holds it. The lock is released in :meth:`release`."""
        if not self.use_locks:
            return True
        from mstar_extract.envdefaults import DEFAULT_LOCK_TIMEOUT_S
        from mstar_extract.locks import SlideLock

        slide_id = str(entry.slide_id)
        timeout_s = DEFAULT_LOCK_TIMEOUT_S if self.lock_timeout is None else float(self.lock_timeout)
        lock = self._locks[slide_id] = SlideLock(self.out_dir, slide_id, timeout_s=timeout_s)  # registered before any file exists
        if lock.acquire():
            return True
        self.release(slide_id)
        return False

    def release(self, slide_id: str) -> None:
        """Give up ownership of a slide taken by :meth:`claim` (deletes its lock file). The lock stays registered
        until it is released, so an interrupted release is finished by :meth:`release_all`."""
        with self._lock:
            self._active.pop(slide_id, None)
            lock = self._locks.get(slide_id)
        if lock is not None:
            lock.release()
            self._locks.pop(slide_id, None)

    def release_all(self) -> None:
        """Give up every slide this process still holds (the run ends early, by any exception)."""
        with self._lock:
            held = list(self._active) + list(self._locks)
        for slide_id in held:
            self.release(slide_id)

    def begin(self, entry: SlideEntry) -> bool:
        """Announce ``entry`` ("started" event) if this process may work on it; False means skip it silently
        (another process owns it — the caller may record it as skipped with :meth:`finish`)."""
        with self._lock:
            _ = self.progress  # the bar appears with the first slide
            if not self.claim(entry):
                self.held[str(entry.slide_id)] = entry
                return False
            self._active[str(entry.slide_id)] = entry
            self.reporter.event("started", slide_id=str(entry.slide_id), path=str(entry.path), command=self.command)
        return True

    def finish(self, outcome: SlideOutcome) -> None:
        """Record how a slide ended: manifest row, final event, one stderr line if it failed, progress."""
        with self._lock:
            try:
                self.manifest.add(outcome.to_row())
            finally:
                self.release(outcome.slide_id)
            self.outcomes.append(outcome)  # counted once its row is written (a full disk: not counted)
            self.counts[outcome.status] = self.counts.get(outcome.status, 0) + 1
            fields = {k: v for k, v in asdict(outcome).items() if k != "extra"}
            self.reporter.event(outcome.status, **fields, command=self.command, **outcome.extra)
            if outcome.status == "failed":
                self.reporter.error(f"{outcome.path}: {outcome.error or 'failed'}")
            self.progress.update(1)
            self.progress.set_postfix(self._postfix())

    def _exit_code(self, interrupted: BaseException | None = None, run_error: BaseException | None = None) -> int:
        """The run's exit code (module docstring). A torchrun rank (``failed_code`` 0) exits 0 for failed and
        unfinished slides alike: any other code makes torchrun stop the other ranks; ``mstar status`` reports them."""
        if interrupted is not None:
            signum = getattr(interrupted, "signum", None)
            return 128 + int(signum) if signum else 130
        if run_error is not None:
            return EXIT_RUN
        if self.n_failed:
            return self.failed_code
        if self.unfinished:
            return EXIT_INCOMPLETE if self.failed_code != EXIT_OK else EXIT_OK
        return EXIT_OK

    def wait_for_held(self, poll_s: float = HELD_POLL_S) -> None:
        """Wait while other live processes hold the slides this run left to them: until each lock is released or
        stale, at most the lock timeout (the default 600 s when it is 0 or unset). One line says so."""
        from mstar_extract.envdefaults import DEFAULT_LOCK_TIMEOUT_S
        from mstar_extract.locks import hostname, lock_path, read_lock

        limit = float(self.lock_timeout) if self.lock_timeout else DEFAULT_LOCK_TIMEOUT_S
        me, deadline = hostname(), time.monotonic() + limit

        def still_held() -> list[str]:
            held = []
            for slide_id in self.held:
                info = read_lock(lock_path(self.out_dir, slide_id))
                if info is not None and info.stale_reason(limit, me) is None:
                    held.append(slide_id)
            return held

        waiting = still_held()
        if waiting:
            self.reporter.info(f"{self.command}: waiting for {len(waiting)} slide(s) held by other processes "
                               f"(at most {limit:g} s): {_some(waiting)}")
        while waiting and time.monotonic() < deadline:
            time.sleep(poll_s)
            waiting = still_held()

    def _unfinished(self, merged: list[ManifestRow]) -> list[str]:
        """The held slides that no process has recorded as done/no_tissue (merged manifest)."""
        finished = {r.slide_id for r in merged if r.status in FINISHED_STATUSES}
        return sorted(sid for sid in self.held if sid not in finished)

    def _postfix(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.counts.items() if v)

    @property
    def n_failed(self) -> int:
        return self.counts.get("failed", 0)

    def close(self, interrupted: BaseException | None = None, run_error: BaseException | None = None) -> int:
        """Merge the manifest, emit the "summary" event and one human summary line; return the exit code.

        ``interrupted``: the KeyboardInterrupt (Ctrl-C, or SIGTERM as :class:`mstar_extract.locks.Terminated`)
        that ends the run early; the summary then carries ``"interrupted": true`` and the exit code the process
        will have (130, or 128 + the signal number). ``run_error``: the whole-run error
        (:class:`mstar_extract.errors.RunError`) that stopped the run; the summary carries its line as ``error``
        and exit code 3 (the caller prints the error line itself)."""
        with self._lock:
            if self._closed:
                return self._exit_code()
            self._closed = True
        if self._progress is not None:
            self._progress.close()
        self.release_all()
        stopped = interrupted is not None or run_error is not None
        if not stopped and not self.n_failed and self.held:
            self.wait_for_held()
        merged, merge_error = self._merge(stopped)
        run_error = run_error or merge_error
        if not stopped and merge_error is None:
            self.unfinished = self._unfinished(merged)
        code = self._exit_code(interrupted, run_error)
        seconds = time.monotonic() - self._start
        extra: dict[str, Any] = {"interrupted": True} if interrupted is not None else {}
        if run_error is not None:
            extra["error"] = str(run_error)
        self.reporter.event("summary", command=self.command, total=self.total, counts=dict(self.counts),
                            seconds=round(seconds, 3), exit_code=code, out_dir=str(self.out_dir),
                            unfinished=list(self.unfinished), **extra)
        self._summary_line(code, seconds, interrupted, run_error)
        if merge_error is not None:  # the run's own end could not be written: exit 3 (after the summary)
            raise merge_error
        return code

    def _merge(self, stopped: bool) -> tuple[list[ManifestRow], BaseException | None]:
        """Merge the manifest parts into ``OUT/manifest.csv`` (the merged rows); a full or read-only OUT is
        returned as the RunError that ends the run (after a stop it is ignored: the part files hold the rows,
        status merges them)."""
        if self._manifest is None and not self.outcomes:
            return [], None
        try:
            return self.manifest.merge(), None
        except OSError as exc:
            from mstar_extract.pipeline.whole_run import whole_run_error

            err = whole_run_error(exc, escaped=True)
            if err is None:
                raise
            return [], None if stopped else err

    def _summary_line(self, code: int, seconds: float, interrupted: BaseException | None,
                      run_error: BaseException | None) -> None:
        done = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in self.counts.items() if v)
        if self.unfinished:
            done += f", of which {len(self.unfinished)} held by another process and not done"
        stop = "interrupted" if interrupted is not None else ("stopped by a whole-run error" if run_error else "")
        done = ", ".join(x for x in (done, stop) if x) or "nothing to do"
        patches = sum(o.n_patches or 0 for o in self.outcomes)
        line = (f"{self.command}: {len(self.outcomes)}/{self.total} slides ({done}); {patches} patches; "
                f"{seconds:.1f} s; manifest: {OutLayout(self.out_dir).manifest}")
        if self.n_failed and code == EXIT_OK:
            line += "; exit 0 as a torchrun rank ('mstar status OUT' reports the failures, exit 1)"
        elif self.unfinished and code == EXIT_OK:
            line += "; exit 0 as a torchrun rank ('mstar status OUT' shows the slides still held)"
        if code or self.n_failed or self.unfinished:
            self.reporter.warn(line)
        else:
            self.reporter.info(line)
        if self.unfinished:
            self.reporter.warn(f"{len(self.unfinished)} slide(s) held by other processes are not done: "
                               f"{_some(self.unfinished)} (exit code {code}; 'mstar status "
                               f"{self.out_dir}' shows them, a rerun does them)")


def _some(ids: list[str], n: int = 5) -> str:
    """The first ``n`` ids, comma-separated, and how many more."""
    more = f" and {len(ids) - n} more" if len(ids) > n else ""
    return ", ".join(ids[:n]) + more
