"""The client of :mod:`mstar_extract.testing.launcher`: ``mstar`` runs forked from one pre-imported process, with
the part of :class:`subprocess.Popen`'s surface the tests use (``pid``, ``stdin``/``stdout``/``stderr``,
``poll``, ``wait``, ``communicate``, ``send_signal``, ``terminate``, ``kill``, ``returncode``).

One launcher per test process, started on first use and stopped at exit. ``MSTAR_TEST_FORK=0`` turns it off
(every run is then a fresh ``python -m mstar_extract``); a run whose environment differs from the launcher's in a
variable read at import time is always a fresh process (:func:`mstar_extract.testing.launcher.forkable_env`).
"""

from __future__ import annotations

import atexit
import io
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

_STREAM_KW = ("stdin", "stdout", "stderr")
SUPPORTED_KW = frozenset({"stdin", "stdout", "stderr", "cwd", "start_new_session"})
"""Popen keyword arguments a forked run honours (any other one means a fresh process)."""


class Launcher:
    """The running launcher process and its socket."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = dict(env)
        self._dir = tempfile.mkdtemp(prefix="mstar-launcher-")
        self.path = os.path.join(self._dir, "sock")
        self.proc = subprocess.Popen([sys.executable, "-m", "mstar_extract.testing.launcher", self.path],
                                     env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # a library may print something of its own first
            if line.strip() == "ready":
                return
        self.close()
        raise RuntimeError("the test launcher ended before it was ready")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the launcher ends at EOF
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self._dir, ignore_errors=True)


_launcher: Launcher | None = None
_launcher_failed = False
_launcher_lock = threading.Lock()


def launcher() -> Launcher | None:
    """This process's launcher (started on first use with this process's environment, this checkout first on
    ``PYTHONPATH``, without the variables a child applies itself); None when ``MSTAR_TEST_FORK=0``."""
    global _launcher, _launcher_failed
    if os.environ.get("MSTAR_TEST_FORK", "1") == "0" or _launcher_failed:
        return None
    with _launcher_lock:
        if _launcher is None or _launcher.proc.poll() is not None:
            from mstar_extract.testing.cli import mstar_env

            env = {k: v for k, v in mstar_env().items() if k not in ("OMP_NUM_THREADS", "PYTHONWARNINGS")}
            try:
                _launcher = Launcher(env)
            except (OSError, RuntimeError) as exc:  # every run is then a fresh interpreter: slower, not wrong
                print(f"mstar tests: no launcher ({exc}); starting a fresh interpreter per run", file=sys.stderr)
                _launcher_failed = True
                return None
            atexit.register(_launcher.close)
        return _launcher


def can_fork(env: Mapping[str, str], popen_kw: Mapping[str, Any]) -> Launcher | None:
    """The launcher to use for a run with ``env`` and ``popen_kw``, or None for a fresh process."""
    from mstar_extract.testing.launcher import forkable_env

    if any(k not in SUPPORTED_KW for k in popen_kw):
        return None
    current = launcher()
    if current is None or not forkable_env(dict(env), current.env):
        return None
    return current


def _child_fd(spec: Any, default_fd: int, write: bool) -> tuple[int, int | None, bool]:
    """(fd for the child, our end of a pipe or None, whether the child's fd must be closed here afterwards)."""
    if spec == subprocess.PIPE:
        r, w = os.pipe()
        return (r, w, True) if not write else (w, r, True)
    if spec == subprocess.DEVNULL:
        return os.open(os.devnull, os.O_RDWR), None, True
    if spec is None:
        return default_fd, None, False
    if isinstance(spec, int):
        return spec, None, False
    return spec.fileno(), None, False


class LaunchedProcess:
    """A forked ``mstar`` run (module docstring); text mode."""

    def __init__(self, launcher: Launcher, argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None,
                 stdin: Any = None, stdout: Any = None, stderr: Any = None, start_new_session: bool = False,
                 mount_namespace: int | None = None) -> None:
        self.args = ["mstar", *argv]
        self.returncode: int | None = None
        specs = [_child_fd(stdin, 0, False), _child_fd(stdout, 1, True)]
        specs.append((specs[1][0], None, False) if stderr == subprocess.STDOUT else _child_fd(stderr, 2, True))
        request = {"argv": list(argv), "env": dict(env), "cwd": os.fspath(cwd or os.getcwd()),
                   "new_session": bool(start_new_session), "mount_namespace": mount_namespace}
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._conn.connect(launcher.path)
        socket.send_fds(self._conn, [json.dumps(request).encode()], [s[0] for s in specs])
        for fd, _, close in specs:
            if close:
                os.close(fd)
        self.stdin: IO[str] | None = _wrap(specs[0][1], "w")
        self.stdout: IO[str] | None = _wrap(specs[1][1], "r")
        self.stderr: IO[str] | None = _wrap(specs[2][1], "r")
        self.pid = int(self._recv_line(None) or -1)
        self._readers: list[threading.Thread] = []
        self._output: dict[str, list[str]] = {}

    # -- exit status -------------------------------------------------------------------------------------
    def _recv_line(self, timeout: float | None) -> str | None:
        ready, _, _ = select.select([self._conn], [], [], timeout)
        if not ready:
            return None
        data = self._conn.recv(64)
        return data.decode().strip() if data else ""

    def poll(self) -> int | None:
        if self.returncode is None:
            line = self._recv_line(0)
            if line is not None:
                self.returncode = int(line) if line else -9
                self._conn.close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            line = self._recv_line(timeout)
            if line is None:
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
            self.returncode = int(line) if line else -9
            self._conn.close()
        return self.returncode

    # -- signals -----------------------------------------------------------------------------------------
    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    # -- streams -----------------------------------------------------------------------------------------
    def communicate(self, input: str | None = None, timeout: float | None = None) -> tuple[str | None, str | None]:
        """Write ``input``, read stdout and stderr to their ends, wait for the exit (as Popen's)."""
        if not self._readers:
            for name in ("stdout", "stderr"):
                stream = getattr(self, name)
                if stream is not None:
                    chunks = self._output.setdefault(name, [])
                    t = threading.Thread(target=lambda s=stream, c=chunks: c.append(s.read()), daemon=True)
                    t.start()
                    self._readers.append(t)
            if self.stdin is not None:
                try:
                    if input:
                        self.stdin.write(input)
                    self.stdin.close()
                except BrokenPipeError:
                    pass
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._readers:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        out = "".join(self._output["stdout"]) if "stdout" in self._output else None
        err = "".join(self._output["stderr"]) if "stderr" in self._output else None
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        return out, err

    def __enter__(self) -> LaunchedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                stream.close()
        self.wait()


def _wrap(fd: int | None, mode: str) -> IO[str] | None:
    if fd is None:
        return None
    raw = open(fd, mode + "b", buffering=0 if mode == "w" else -1)
    return io.TextIOWrapper(raw, write_through=(mode == "w"))
