"""A launcher that starts test runs of the ``mstar`` command line as forks of one pre-imported process.

Every ``mstar extract`` started by the tests pays for importing torch and timm (about 7 CPU-seconds on a 2-core
machine, most of the test suite's time). This process imports them once, then forks one child per command: the
child is a real process of this checkout's CLI (its own pid, exit code, signals, process group, pipes), only
without the import. :func:`mstar_extract.testing.cli.start_mstar` talks to it; a test that needs a fresh
interpreter (``-X importtime``, a resource limit set before exec) builds its command with ``mstar_command``.

Protocol, over a ``SOCK_SEQPACKET`` Unix socket: the client sends one JSON message ``{"argv", "env", "cwd",
"new_session", "mount_namespace"}`` with three file descriptors (the child's stdin, stdout, stderr); the launcher
answers ``"<pid>\\n"`` at once and ``"<exit code>\\n"`` (negative: killed by that signal) when the child has
ended. ``mount_namespace`` (a pid, or null): the child joins that process's mount namespace before anything else
(:func:`join_mount_namespace`), so a test can give a run a small tmpfs made by ``unshare --mount`` without paying
for a fresh interpreter.

Run as ``python -m mstar_extract.testing.launcher SOCKET_PATH`` with a pipe on stdin; it prints ``ready`` once it
listens, and ends when that pipe is closed (the test process ended, whatever the way).
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import sys
from typing import Any

PRELOAD = ("numpy", "PIL.Image", "cv2", "h5py", "openslide", "tiffslide", "torch", "timm", "mstar_extract.cli",
           "mstar_extract.pipeline.extract_job", "mstar_extract.models.encoder", "mstar_extract.reading")
"""Modules imported once, before any fork (none of them starts a thread on import)."""

RUNTIME_ENV_PREFIXES = ("MSTAR_", "_MSTAR_", "SLURM_", "COMP_", "PYTEST_")  # PYTEST_CURRENT_TEST changes per test
RUNTIME_ENV = frozenset({"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                         "COLUMNS", "LINES", "TERM", "NO_COLOR", "OMP_NUM_THREADS", "PYTHONPATH", "PYTHONWARNINGS",
                         "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "PATH"})
"""Variables that the package reads while it runs (or that the child applies itself): they may differ from the
launcher's own environment. ``TORCHINDUCTOR_CACHE_DIR`` is one: torch reads it at each compile and, when unset,
sets it in ``os.environ`` itself when a test process first compiles (an ``mstar extract`` run in process); were it
compared, every later run of that test process would be a fresh interpreter. ``PATH`` is read when a program is
looked up (torch looks for a C++ compiler at the first compile, not at import). A command whose environment differs in
any other variable (e.g. ``HF_*``, read by huggingface_hub when it is imported) is started as a plain subprocess
instead (:func:`forkable_env`)."""


def _runtime(name: str) -> bool:
    return name in RUNTIME_ENV or name.startswith(RUNTIME_ENV_PREFIXES)


def forkable_env(env: dict[str, str], launcher_env: dict[str, str]) -> bool:
    """Whether a child forked from a launcher started with ``launcher_env`` sees the same program as a fresh
    process started with ``env`` (every variable read at import time is the same)."""
    keys = {k for k in (*env, *launcher_env) if not _runtime(k)}
    return all(env.get(k) == launcher_env.get(k) for k in keys)


CLONE_NEWNS = 0x00020000
"""``setns(2)``'s flag for a mount namespace (``os.CLONE_NEWNS`` from Python 3.12 on)."""


def join_mount_namespace(pid: int) -> None:
    """Make this process see the mounts of process ``pid`` (``setns(2)`` on ``/proc/PID/ns/mnt``; Python 3.11 has
    no ``os.setns``). Needs CAP_SYS_ADMIN and a single-threaded caller (a child forked from the launcher is); the
    working folder is reset to the namespace's root, so call it before ``chdir``."""
    import ctypes

    why = f"cannot join the mount namespace of process {pid}"
    try:
        fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise OSError(exc.errno, f"{why}: {exc.strerror}") from None
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNS) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{why}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _child(request: dict[str, Any], fds: list[int]) -> None:  # pragma: no cover - runs in the forked child
    """Become the command: its session, standard streams, environment, folder, signals; then run the CLI and exit
    with its code (:func:`_exit`)."""
    if request.get("new_session"):
        os.setsid()
    for target, fd in enumerate(fds):
        if fd != target:
            os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    if request.get("mount_namespace") is not None:
        try:
            join_mount_namespace(int(request["mount_namespace"]))
        except OSError as exc:
            print(f"mstar test launcher: {exc.strerror}", file=sys.stderr, flush=True)
            os._exit(126)  # (never back into the launcher's loop)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        import torch

        torch.set_num_threads(int(threads))
    if os.environ.get("PYTHONWARNINGS") == "ignore":
        import warnings

        warnings.simplefilter("ignore")
    import random

    random.seed()
    sys.argv = ["mstar", *request["argv"]]
    from mstar_extract.cli import main

    try:
        main(args=list(request["argv"]), prog_name="mstar")  # click ends it with SystemExit(code)
        code: Any = 0
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - what the interpreter would print before exiting 1
        import traceback

        traceback.print_exc()
        code = 1
    _exit(code)


def _exit(code: Any) -> None:  # pragma: no cover - runs in the forked child
    """Leave as the interpreter's exit would (non-daemon threads joined, atexit handlers run, streams flushed,
    SystemExit's code rules), but without tearing down the modules: with torch and timm loaded that teardown
    takes ~1.6 s of a 2-core machine and does nothing a test could see."""
    import atexit
    import threading

    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # what Py_Finalize does first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code & 0xFF)


def _reap(waiting: dict[int, socket.socket]) -> None:
    """Tell each ended child's client its exit code."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = waiting.pop(pid, None)
        if conn is not None:
            try:
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:
                pass
            conn.close()


def serve(path: str) -> None:
    """Listen on ``path`` and fork a child per request (module docstring), until the client is gone; a child
    never returns from :func:`_child`."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(128)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(wake_r, selectors.EVENT_READ, "child")
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, "client")  # the client's end of our stdin: EOF = gone
    waiting: dict[int, socket.socket] = {}
    try:
        print("ready", flush=True)
    except BrokenPipeError:  # the test process ended while this launcher was starting
        return
    while True:
        for key, _ in sel.select():
            if key.data == "child":
                os.read(wake_r, 4096)
                _reap(waiting)
                continue
            if key.data == "client":
                if not os.read(sys.stdin.fileno(), 4096):
                    return  # the test process ended (even killed): no launcher is left behind
                continue
            conn, _ = listener.accept()
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                sel.close()
                listener.close()
                os.close(wake_r)
                os.close(wake_w)
                for other in waiting.values():
                    other.close()
                conn.close()
                _child(json.loads(msg), list(fds))
            for fd in fds:
                os.close(fd)
            waiting[pid] = conn
            conn.sendall(f"{pid}\n".encode())
            _reap(waiting)


if __name__ == "__main__":
    serve(sys.argv[1])
