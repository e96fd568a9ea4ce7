"""Per-slide lock files: any number of processes, on any number of nodes, share one output folder (issue 5).

A process that wants to work on a slide creates ``OUT/.locks/<slide_id>.lock`` with its content already in
it: the JSON ``{slide_id, host, pid, start, cmd, token, proc_start}`` is written and fsynced to a temp file
(``.<lock name>.<host>.<pid>.<8 hex>.tmp``), which is then hard-linked to the lock's name with ``os.link``.
A link never replaces an existing file, so exactly one creator succeeds (atomic on local file systems, on NFSv3
and later, and on Lustre/GPFS/BeeGFS: the classic O_EXCL-with-content trick of NFS), and a lock file is never
seen empty or half-written, even when the disk fills while it is created (the temp write fails and no lock
appears: :class:`~mstar_extract.errors.RunError`). On NFS a retransmitted LINK can answer "exists" although
it worked; the temp's link count (2) tells. File systems without hard links fall back to
``os.open(O_CREAT | O_EXCL)`` + write (a failed write removes the file). Protocol for callers (the lock
protects only the *in-progress* window)::

    lock = try_acquire(out_dir, slide_id)
    if lock is None:            # another live process is working on it -> count as skipped
        ...
    with lock:                  # released on success, exception, Ctrl-C and (with sigterm_as_interrupt) SIGTERM
        if output_complete():   # re-check AFTER acquiring: another process may have finished it meanwhile
            ...skip...
        else:
            ...process, write outputs atomically...

**Heartbeat.** While held, a daemon thread touches the lock's mtime every ``heartbeat_s`` seconds (default
30). The age of a lock is measured from its mtime, so ``--lock-timeout`` only has to exceed a few missed
heartbeats, not the longest slide: the default 600 s is safe for slides of any size. The heartbeat also
checks that the file still carries this lock's token; if another process took the lock over (this process was
frozen for longer than the timeout), :attr:`SlideLock.lost` becomes true and a warning is logged.

**Stale locks** are taken over (with a warning line) when the owner is on this host and its pid is gone (or was
reused by a newer process), when the lock is older than ``timeout_s`` (any host; ``timeout_s <= 0``
disables this), or when its content cannot be read (empty, truncated, not JSON: left by an older version when
the disk filled, or damaged) and it is older than :data:`UNREADABLE_GRACE_S` (5 s), whatever the timeout: this
version never makes such a file, so an unreadable lock is never a live owner's.

Takeover is race-free among takers: the taker renames the stale file to a unique name (only one rename can
succeed), checks that what it renamed is the very lock it judged stale (token), deletes it, and then competes
for a fresh create like everyone else. If it renamed a *fresh* lock by mistake (someone
else completed a takeover in between), it links it back with ``os.link`` (which never overwrites).

**No window for signals.** :meth:`SlideLock.acquire` notes the owner process *before* the file is created, and
:meth:`SlideLock.release` removes a lock file carrying this lock's token whether or not ``acquire`` returned
(and this lock's temp or takeover files), so a caller that registers the :class:`SlideLock` object before calling
``acquire`` (as :class:`mstar_extract.pipeline.runner.SlideRunner` does) and releases every registered lock on
Ctrl-C/SIGTERM leaves no lock behind, whatever bytecode the signal interrupts.

Shared file systems: ages compare the server's mtime with this node's clock, so node clocks must agree to
well within the timeout (NTP does this); NFS attribute caching (``acregmax``, ≤ 60 s) also stays far below it.
"""

from __future__ import annotations

import atexit
import errno
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from mstar_extract.envdefaults import DEFAULT_LOCK_TIMEOUT_S
from mstar_extract.errors import MstarError, RunError
from mstar_extract.store.atomic import temp_path_for
from mstar_extract.store.layout import (
    LOCK_SUFFIX,
    LOCKS_DIR as LOCKS_DIR,  # re-exported: the folder of the lock files
    OutLayout,
    lock_file_name,
)

log = logging.getLogger("mstar")

# DEFAULT_LOCK_TIMEOUT_S (600 s, from envdefaults): a lock not refreshed for this long is stale.
DEFAULT_HEARTBEAT_S = 30.0
UNREADABLE_GRACE_S = 5.0
"""A lock whose content cannot be read (empty, truncated, not JSON) is stale once older than this many seconds,
whatever ``--lock-timeout`` says. Locks are written with their content before they appear, so only an older
version's lock, caught between its ``O_EXCL`` create and its write (microseconds; forever when the disk was
full), can be unreadable; 5 s covers a slow write on a loaded shared file system many times over."""
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EXDEV}


class LockHeldError(MstarError):
    """The slide is being processed by another live process."""


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM inside :func:`sigterm_as_interrupt` (a KeyboardInterrupt, so the
    same clean-up paths run as for Ctrl-C)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


REDELIVER_S = 0.01
"""Delay before a signal whose exception a finalizer swallowed is delivered again (:func:`sigterm_as_interrupt`)."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread; the old handler is restored after.

    A signal handler runs wherever the main thread is, also inside a ``__del__`` or a weakref callback (the
    garbage collector runs them at any moment); CPython prints an exception raised there as "Exception ignored
    in ..." with a traceback and goes on, so the signal would be lost. Within the block, such a swallowed
    :class:`Terminated` or ``KeyboardInterrupt`` is delivered again :data:`REDELIVER_S` later instead
    (``sys.unraisablehook``), once the main thread has left that hook (where Python would swallow it too), and
    lands in ordinary code; one still waiting when the block ends is raised there
    (never delivered later, to a process whose SIGTERM has its default action again). Outside the main thread
    (where Python cannot install handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    red = _Redelivery(sys.unraisablehook)
    old = signal.signal(signal.SIGTERM, red.handle)
    old_int = signal.getsignal(signal.SIGINT)
    if old_int is signal.default_int_handler:
        signal.signal(signal.SIGINT, red.handle)
    sys.unraisablehook = red.hook
    try:
        yield
    finally:
        waiting = red.cancel()
        sys.unraisablehook = red.old_hook
        signal.signal(signal.SIGTERM, old)
        if old_int is signal.default_int_handler:
            signal.signal(signal.SIGINT, old_int)
        if waiting is not None and sys.exc_info()[1] is None:
            raise Terminated(waiting) if waiting == signal.SIGTERM else KeyboardInterrupt()


class _Redelivery:
    """The signal handler and ``sys.unraisablehook`` of one :func:`sigterm_as_interrupt` block (main thread)."""

    def __init__(self, old_hook: Any) -> None:
        self.old_hook = old_hook
        self.main = threading.get_ident()
        self.in_hook = False
        self.timers: list[tuple[threading.Timer, int]] = []

    def handle(self, signum: int, frame: Any) -> None:
        if self.in_hook:  # raised inside the hook, it would be swallowed with the hook's own exception: after it
            self.later(signum)
            return
        raise Terminated(signum) if signum == signal.SIGTERM else KeyboardInterrupt()

    def hook(self, unraisable: Any) -> None:
        self.in_hook = True
        try:
            if isinstance(unraisable.exc_value, KeyboardInterrupt):
                self.later(getattr(unraisable.exc_value, "signum", signal.SIGINT))
            else:
                self.old_hook(unraisable)
        finally:
            self.in_hook = False

    def later(self, signum: int) -> None:
        timer = threading.Timer(REDELIVER_S, self._send, (signum,))
        timer.daemon = True
        self.timers.append((timer, signum))
        timer.start()

    def _send(self, signum: int) -> None:
        while self.in_hook:  # the main thread is still in the hook: a signal handled there would be swallowed too
            time.sleep(REDELIVER_S / 10)
        # to the main thread itself, so that a blocking call there (a sleep, a wait) is interrupted too
        signal.pthread_kill(self.main, signum)

    def cancel(self) -> int | None:
        """Cancel the deliveries not yet made; the signal of the first of them, if any."""
        waiting = [signum for timer, signum in self.timers if timer.is_alive()]
        for timer, _ in self.timers:
            timer.cancel()
        return waiting[0] if waiting else None


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block: one that arrives meanwhile is delivered (to the handler that was
    in place) when the block ends. Python runs signal handlers in the main thread only, so this makes a block of
    the main thread atomic for them whatever thread the signal hit; elsewhere it does nothing. Used around
    :meth:`SlideLock.acquire` and :meth:`SlideLock.release`, which therefore never stop half-way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        pending.append(signum)

    old: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not None:  # None: a handler installed from C, left alone
                old[sig] = signal.signal(sig, hold)
        yield
    finally:
        for held, handler in old.items():
            signal.signal(held, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


# ------------------------------------------------------------------------------------------------ the last resort
_UNRELEASED: set[SlideLock] = set()
"""Locks of this process from the start of :meth:`SlideLock.acquire` until a :meth:`SlideLock.release` finished."""


def release_unreleased() -> None:
    """Release every lock of this process whose release has not finished: a signal can land at the first bytecode
    of ``release`` (before it holds signals back), so the ``finally`` of its caller did not remove the file. Runs
    at exit (``atexit``: a normal exit, ``sys.exit``, an exception that ends the program), never in a forked
    child for its parent's locks."""
    for lock in list(_UNRELEASED):
        try:
            lock.release()
        except BaseException:  # noqa: BLE001 - a second signal while leaving: the next lock still gets its turn
            _UNRELEASED.discard(lock)


atexit.register(release_unreleased)


# ------------------------------------------------------------------------------------------------ lock identity
def hostname() -> str:
    """This node's host name, as written into locks."""
    return socket.gethostname() or "localhost"


def _proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), to detect a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("ascii", "replace")
        return int(data[data.rindex(")") + 2 :].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int, proc_start: int | None = None) -> bool:
    """Whether ``pid`` runs on this host (and, when ``proc_start`` is known, is the same process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if proc_start is not None:
        now = _proc_start(pid)
        if now is not None and now != proc_start:
            return False  # the pid was reused by a newer process
    return True


def lock_name(slide_id: str) -> str:
    """File name of a slide's lock (percent-encoded, so any slide id gives a distinct, safe name)."""
    return lock_file_name(slide_id)


def lock_path(out_dir: str | os.PathLike[str], slide_id: str) -> Path:
    """``OUT/.locks/<encoded id>.lock`` (:meth:`mstar_extract.store.layout.OutLayout.lock`)."""
    return OutLayout(out_dir).lock(slide_id)


@dataclass
class LockInfo:
    """What a lock file says, plus its age (from mtime). Fields are ``None`` when the file is unreadable/empty."""

    path: Path
    slide_id: str
    host: str | None
    pid: int | None
    start: float | None
    cmd: str | None
    token: str | None
    proc_start: int | None
    mtime: float
    ino: int
    age_s: float
    readable: bool = True
    """False when the content is not a JSON object naming an owner (empty, truncated, damaged)."""

    def same_file(self, other: LockInfo) -> bool:
        """Is ``other`` (read later) the very lock this one describes?"""
        if self.token is not None or other.token is not None:
            return self.token == other.token
        return (self.ino, self.mtime) == (other.ino, other.mtime)

    def stale_reason(self, timeout_s: float, this_host: str | None = None) -> str | None:
        """Why this lock may be taken over, or ``None`` when its owner must be presumed alive."""
        this_host = this_host or hostname()
        if not self.readable:
            if self.age_s > UNREADABLE_GRACE_S:
                return f"its content cannot be read (empty or damaged) and it is {self.age_s:.0f} s old"
            return None  # an older version's lock being written right now
        if self.host == this_host and self.pid is not None and not pid_alive(self.pid, self.proc_start):
            return f"its process {self.pid} on {self.host} is gone"
        if timeout_s > 0 and self.age_s > timeout_s:
            return f"not refreshed for {self.age_s:.0f} s (> lock timeout {timeout_s:.0f} s)"
        return None

    def as_dict(self) -> dict[str, Any]:
        return {
            "slide_id": self.slide_id, "host": self.host, "pid": self.pid, "start": self.start,
            "age_s": round(self.age_s, 1), "cmd": self.cmd, "readable": self.readable,
        }


def read_lock(path: str | os.PathLike[str], now: float | None = None) -> LockInfo | None:
    """Parse a lock file; ``None`` if it does not exist (any more)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            raw = fh.read(65536)
    except FileNotFoundError:
        return None
    data: dict[str, Any] = {}
    try:
        obj = json.loads(raw.decode("utf-8"))
        if isinstance(obj, dict):
            data = obj
    except (ValueError, UnicodeDecodeError):
        pass  # being written right now, or truncated: only its age counts

    def _int(v: Any) -> int | None:
        try:
            return int(v) if v is not None else None
        except (TypeError, ValueError):
            return None

    now = time.time() if now is None else now
    name = path.name[: -len(LOCK_SUFFIX)] if path.name.endswith(LOCK_SUFFIX) else path.name
    return LockInfo(
        path=path,
        slide_id=str(data.get("slide_id") or unquote(name)),
        host=data.get("host"),
        pid=_int(data.get("pid")),
        start=data.get("start"),
        cmd=data.get("cmd"),
        token=data.get("token"),
        proc_start=_int(data.get("proc_start")),
        mtime=st.st_mtime,
        ino=st.st_ino,
        age_s=max(0.0, now - st.st_mtime),
        readable=any(data.get(k) for k in ("host", "pid", "token")),
    )


def list_locks(out_dir: str | os.PathLike[str], now: float | None = None) -> list[LockInfo]:
    """All current lock files of ``out_dir``, sorted by slide id."""
    d = OutLayout(out_dir).locks_dir
    if not d.is_dir():
        return []
    out = []
    for p in d.glob("*" + LOCK_SUFFIX):
        info = read_lock(p, now)
        if info is not None:
            out.append(info)
    return sorted(out, key=lambda i: i.slide_id)


def _command_line() -> str:
    cmd = " ".join(sys.argv) if sys.argv and sys.argv[0] else sys.executable
    return cmd if len(cmd) <= 1000 else cmd[:997] + "..."


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (``O_EXCL``: FileExistsError if it exists), write ``data`` in full and fsync it; on any
    failure the file is removed again, so no empty or partial file stays behind."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(path)
        raise
    os.close(fd)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ------------------------------------------------------------------------------------------------------- the lock
class SlideLock:
    """One slide's lock. Use :func:`try_acquire`, or ``with SlideLock(out, id):`` (raises :class:`LockHeldError`)."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        slide_id: str,
        *,
        timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        cmd: str | None = None,
        path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.slide_id = slide_id
        self.path = Path(path) if path is not None else lock_path(out_dir, slide_id)
        """``OUT/.locks/<slide_id>.lock``, unless ``path`` names another file (e.g. the settings record's lock)."""
        self.timeout_s = float(timeout_s)
        self.heartbeat_s = float(heartbeat_s)
        self.cmd = cmd if cmd is not None else _command_line()
        self.token = secrets.token_hex(16)
        self.held = False
        self.lost = False
        self.took_over: str | None = None
        """Why a stale lock was taken over to get this one (``None`` if the slide was free)."""
        self._owner_pid = 0
        """The process that started acquiring (0: none, or released); only it releases."""
        self._temp: Path | None = None
        self._aside: Path | None = None
        self._seen: LockInfo | None = None
        self._sigterm: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquire ---------------------------------------------------------------------------------------------
    def _content(self) -> bytes:
        return json.dumps({
            "slide_id": self.slide_id, "host": hostname(), "pid": os.getpid(), "start": time.time(),
            "cmd": self.cmd, "token": self.token, "proc_start": _proc_start(os.getpid()),
        }).encode("utf-8")

    def _create(self) -> bool:
        """Make the lock file with its content, never overwriting one; True when this call made it.
        RunError when OUT cannot take the file (disk full, read-only, no permission)."""
        tmp = self._temp = temp_path_for(self.path)
        try:
            _write_new(tmp, self._content())
            try:
                os.link(tmp, self.path)
                return True
            except FileExistsError:
                return os.stat(tmp).st_nlink == 2  # NFS: a retransmitted LINK that had worked says "exists"
            except OSError as exc:
                if exc.errno not in _NO_HARD_LINKS:
                    raise
            return self._create_in_place()  # a file system without hard links
        except FileExistsError:
            return False
        except OSError as exc:
            raise RunError(f"{self.path}: cannot create the lock file: {exc.strerror or exc}") from exc
        finally:
            _unlink(tmp)
            self._temp = None

    def _create_in_place(self) -> bool:
        """``O_CREAT | O_EXCL`` then write: the fallback without hard links (a failed write removes the file)."""
        try:
            _write_new(self.path, self._content())
        except FileExistsError:
            return False
        return True

    def _take_over(self, seen: LockInfo, reason: str) -> bool:
        """Remove the stale lock ``seen`` if it is still the same file; True if this process removed it."""
        aside = self._aside = self.path.with_name(
            f"{self.path.name}.takeover-{hostname()}-{os.getpid()}-{secrets.token_hex(4)}")
        self._seen = seen
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False  # someone else removed it first
        if self._put_aside_back():
            log.warning(
                "taking over the lock of slide %s (held by host %s pid %s): %s",
                self.slide_id, seen.host, seen.pid, reason,
            )
            self.took_over = reason
            return True
        return False

    def _put_aside_back(self) -> bool:
        """Deal with the file a takeover renamed aside: delete it when it is the stale lock that was judged (True);
        else it is a fresh lock that another process made after its own takeover: link it back, never clobbering."""
        aside, seen = self._aside, self._seen
        if aside is None:
            return False
        try:
            moved = read_lock(aside)
            if moved is None:
                return False
            if seen is not None and seen.same_file(moved):
                _unlink(aside)
                return True
            try:
                os.link(aside, self.path)
            except FileExistsError:
                log.warning("lock of slide %s changed hands during a takeover; its owner will notice", self.slide_id)
            _unlink(aside)
            return False
        finally:
            self._aside = self._seen = None

    def acquire(self) -> bool:
        """Try to take the lock (never blocks). True when this process now holds it.

        SIGINT/SIGTERM wait until it returns (:func:`deferred_signals`); and should the process be stopped inside
        anyway, :meth:`release` undoes whatever it did (the owner process is noted before any file is made)."""
        with deferred_signals():
            return self._acquire()

    def _acquire(self) -> bool:
        if self.held:
            return True
        self._owner_pid = os.getpid()
        _UNRELEASED.add(self)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunError(f"{self.path.parent}: cannot create the folder of the lock files: {exc.strerror or exc}") from exc
        me = hostname()
        for _ in range(5):
            if self._create():
                self.held = True
                self._start_heartbeat()
                return True
            seen = read_lock(self.path)
            if seen is None:
                continue  # released in between: try again
            reason = seen.stale_reason(self.timeout_s, me)
            if reason is None:
                return False
            if not self._take_over(seen, reason):
                again = read_lock(self.path)
                if again is not None and again.stale_reason(self.timeout_s, me) is None:
                    return False
        return False

    # -- heartbeat -------------------------------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        if self.heartbeat_s <= 0:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"mstar-lock-{self.slide_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                mine = self.still_mine()
            except OSError:
                continue  # a transient file-system error (e.g. NFS ESTALE): try again at the next beat
            if not mine:
                if self._stop.is_set():
                    return  # released meanwhile
                self.lost = True
                log.warning("lost the lock of slide %s (another process took it over)", self.slide_id)
                return
            try:
                os.utime(self.path, None)
            except OSError:
                pass

    def still_mine(self) -> bool:
        """Does the lock file still carry this lock's token?"""
        info = read_lock(self.path)
        return info is not None and info.token == self.token

    def refresh(self) -> None:
        """Touch the lock now (the heartbeat does this by itself)."""
        if self.held and self.still_mine():
            os.utime(self.path, None)

    # -- release ---------------------------------------------------------------------------------------------
    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still ours. Safe to call twice, and after an
        :meth:`acquire` that a signal interrupted at any point (the file, if made, carries this lock's token).
        SIGINT/SIGTERM wait until it returns (:func:`deferred_signals`)."""
        if self._owner_pid != os.getpid():
            return  # never acquired here, already released, or a forked child
        try:
            with deferred_signals():
                self._release()
        except BaseException:
            if self._owner_pid == os.getpid():  # a signal came before they were held back: finish first
                self._release()
            raise

    def _release(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            try:
                self._thread.join(timeout=5)
            except RuntimeError:
                pass  # a signal stopped Thread.start() before the thread ran: nothing to wait for
        self._thread = None
        self.held = False
        if self._temp is not None:
            _unlink(self._temp)
        if self._aside is not None:
            self._put_aside_back()
        if self.still_mine():
            _unlink(self.path)
        self._owner_pid = 0
        _UNRELEASED.discard(self)

    def __enter__(self) -> SlideLock:
        """Hold the lock for the block. In the main thread, when SIGTERM still has its default action, SIGTERM
        raises :class:`Terminated` inside the block so that the lock is released (old handler restored after)."""
        try:
            got = self.held or self.acquire()
        except BaseException:
            self.release()  # a signal or an error inside acquire: leave nothing behind
            raise
        if not got:
            raise LockHeldError(f"slide {self.slide_id} is being processed by another process ({self.path})")
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            self._sigterm = sigterm_as_interrupt()
            self._sigterm.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.release()
        finally:
            if self._sigterm is not None:
                cm, self._sigterm = self._sigterm, None
                cm.__exit__(None, None, None)

    def __repr__(self) -> str:
        return f"SlideLock({self.slide_id!r}, held={self.held}, path={str(self.path)!r})"


def try_acquire(
    out_dir: str | os.PathLike[str],
    slide_id: str,
    *,
    timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    cmd: str | None = None,
) -> SlideLock | None:
    """The slide's lock, held (use it as a context manager to release), or ``None`` if a live process holds it."""
    lock = SlideLock(out_dir, slide_id, timeout_s=timeout_s, heartbeat_s=heartbeat_s, cmd=cmd)
    if lock.acquire():
        return lock
    lock.release()  # nothing of ours exists; forget it (release_unreleased)
    return None
