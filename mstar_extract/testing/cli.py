"""Run THIS checkout's ``mstar`` command line as a real subprocess (for tests).

Tests never call a bare ``mstar``: it may be missing (venv not activated) or, worse, another installed version.
They run ``sys.executable -m mstar_extract`` with the folder that holds this very ``mstar_extract`` package first
on ``PYTHONPATH``, so the child imports the same code as the test process::

    from mstar_extract.testing.cli import run_mstar, start_mstar
    r = run_mstar("tile", "slides/", "out/", "--jsonl")           # CompletedProcess (text, captured)
    proc = start_mstar("extract", "slides/", "out/", stdout=subprocess.DEVNULL)   # Popen
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


def mstar_command(*args: str | os.PathLike[str]) -> list[str]:
    """``[python, -m, mstar_extract, *args]``."""
    return [sys.executable, *MODULE, *map(str, args)]


def run_mstar(*args: str | os.PathLike[str], stdin: str | None = None, env: Mapping[str, str] | None = None,
              timeout: float = 600, stderr_file: str | os.PathLike[str] | None = None,
              **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``mstar ARGS`` to the end; stdout and stderr captured as text (stderr written to ``stderr_file``
    instead when given, e.g. to check what a log file receives, and read back into ``.stderr``).
    ``env`` is the child's whole environment (default: this process's)."""
    cmd, child_env = mstar_command(*args), mstar_env(env)
    if stderr_file is None:
        return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=child_env, timeout=timeout, **kw)
    with open(stderr_file, "w") as err:
        res = subprocess.run(cmd, input=stdin, stdout=subprocess.PIPE, stderr=err, text=True, env=child_env,
                             timeout=timeout, **kw)
    res.stderr = Path(stderr_file).read_text()
    return res


def start_mstar(*args: str | os.PathLike[str], env: Mapping[str, str] | None = None,
                **popen_kw: Any) -> subprocess.Popen[str]:
    """Start ``mstar ARGS`` in the background (text mode; stdout/stderr as given in ``popen_kw``, default PIPE)."""
    popen_kw.setdefault("stdout", subprocess.PIPE)
    popen_kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(mstar_command(*args), text=True, env=mstar_env(env), **popen_kw)
