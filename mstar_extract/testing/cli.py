"""Run THIS checkout's ``mstar`` command line as a real subprocess (for tests).

Tests never call a bare ``mstar``: it may be missing (venv not activated) or, worse, another installed version.
They run this checkout's CLI: forked from a launcher process that has imported torch and timm once
(:mod:`mstar_extract.testing.launcher`; a real process per run, without the ~7 CPU-seconds of imports), or, where
a run needs a fresh interpreter or ``MSTAR_TEST_FORK=0``, ``sys.executable -m mstar_extract`` with the folder
that holds this very ``mstar_extract`` package first on ``PYTHONPATH``. Either way the child runs the same code
as the test process::

    from mstar_extract.testing.cli import run_mstar, start_mstar
    r = run_mstar("tile", "slides/", "out/", "--jsonl")           # CompletedProcess (text, captured)
    proc = start_mstar("extract", "slides/", "out/", stdout=subprocess.DEVNULL)   # Popen
    r = run_mstar("extract", ..., mount_namespace=holder.pid)     # sees the mounts of holder's namespace
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *MODULE, "extract", ...]
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mstar_extract

CHECKOUT = Path(mstar_extract.__file__).resolve().parent.parent
"""The folder that holds the ``mstar_extract`` package the tests import."""
MODULE: tuple[str, ...] = ("-m", "mstar_extract")
"""Arguments that make a Python interpreter (or ``torch.distributed.run``) run the command line."""


def mstar_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's environment) with :data:`CHECKOUT` first on ``PYTHONPATH``."""
    out = dict(os.environ if env is None else env)
    rest = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != CHECKOUT]
    out["PYTHONPATH"] = os.pathsep.join([str(CHECKOUT), *rest])
    return out


SCRUBBED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MSTAR_WEIGHTS",
                "MSTAR_DEVICE", "MSTAR_WORKERS", "MSTAR_LOCK_TIMEOUT")
"""Variables (besides every ``SLURM_*``) that :func:`quiet_env` leaves out: a test run must not become a torchrun
rank, a SLURM array task, or take its weights, device or workers from the environment it was started in."""


def quiet_env(**extra: str) -> dict[str, str]:
    """This process's environment for a run a test controls (:func:`mstar_env`): without :data:`SCRUBBED_ENV` and
    ``SLURM_*``, no periodic progress lines, one torch thread, then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV and not k.startswith("SLURM_")}
    return mstar_env({**env, "MSTAR_PROGRESS_INTERVAL": "3600", "OMP_NUM_THREADS": "1", **extra})


def mstar_command(*args: str | os.PathLike[str]) -> list[str]:
    """``[python, -m, mstar_extract, *args]``."""
    return [sys.executable, *MODULE, *map(str, args)]


def run_mstar(*args: str | os.PathLike[str], stdin: str | None = None, env: Mapping[str, str] | None = None,
              timeout: float = 600, stderr_file: str | os.PathLike[str] | None = None,
              **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``mstar ARGS`` to the end; stdout and stderr captured as text (stderr written to ``stderr_file``
    instead when given, e.g. to check what a log file receives, and read back into ``.stderr``).
    ``env`` is the child's whole environment (default: this process's)."""
    err_fh = open(stderr_file, "w") if stderr_file is not None else None
    try:
        proc = start_mstar(*args, env=env, stdin=subprocess.PIPE if stdin is not None else None,
                           stdout=subprocess.PIPE, stderr=err_fh if err_fh is not None else subprocess.PIPE, **kw)
        try:
            out, err = proc.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    finally:
        if err_fh is not None:
            err_fh.close()
    if stderr_file is not None:
        err = Path(stderr_file).read_text()
    return subprocess.CompletedProcess(proc.args, proc.wait(), out, err)


def start_mstar(*args: str | os.PathLike[str], env: Mapping[str, str] | None = None,
                mount_namespace: int | None = None, **popen_kw: Any) -> Any:
    """Start ``mstar ARGS`` in the background (text mode; stdout/stderr as given in ``popen_kw``, default PIPE):
    forked from the pre-imported launcher when it can be (:mod:`mstar_extract.testing.forked`; the same program
    without the seconds of importing torch and timm), else a fresh ``python -m mstar_extract``. Either way a real
    process with the surface of :class:`subprocess.Popen` the tests use.

    ``mount_namespace``: the pid of a process whose mount namespace the run joins (e.g. a shell started by
    ``unshare --mount`` that mounted a small tmpfs; needs root): the forked child calls ``setns(2)`` before it
    runs, a fresh interpreter is started through ``nsenter --mount``."""
    from mstar_extract.testing.forked import LaunchedProcess, can_fork

    popen_kw.setdefault("stdout", subprocess.PIPE)
    popen_kw.setdefault("stderr", subprocess.PIPE)
    child_env = mstar_env(env)
    launcher = can_fork(child_env, popen_kw)
    cwd = popen_kw.pop("cwd", None)
    if launcher is not None:
        return LaunchedProcess(launcher, [os.fspath(a) for a in args], child_env,
                               cwd=os.fspath(cwd) if cwd is not None else None, mount_namespace=mount_namespace,
                               **popen_kw)
    cmd = mstar_command(*args)
    if mount_namespace is not None:  # (setns resets the working folder: nsenter is told which one to keep)
        cmd = ["nsenter", f"--mount=/proc/{mount_namespace}/ns/mnt", f"--wd={os.fspath(cwd or os.getcwd())}", *cmd]
    return subprocess.Popen(cmd, text=True, env=child_env, cwd=cwd, **popen_kw)
