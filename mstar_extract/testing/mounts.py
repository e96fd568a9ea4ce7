"""Small real file systems for tests: a tmpfs mounted in a private mount namespace (``unshare --mount``), so a
test can fill a disk, make OUT read-only or give ``/dev/shm`` 64 MB without touching the machine's own mounts.

:func:`tmpfs_namespace` holds such a namespace open while a test works in it: ``mstar`` runs join it
(``run_mstar(..., mount_namespace=ns.pid)``, forked from the pre-imported launcher), other commands run in it
through ``nsenter`` (:meth:`MountNamespace.run`), and the test reads what the namespace sees through
``/proc/PID/root`` (:meth:`MountNamespace.view`)::

    with tmpfs_namespace(tmp_path / "mnt", "64k") as ns:
        r = run_mstar("extract", slides, tmp_path / "mnt" / "out", ..., mount_namespace=ns.pid)
        ns.run("mount", "-o", "remount,ro", str(tmp_path / "mnt"))
        files = list(ns.view(tmp_path / "mnt" / "out").rglob("*"))
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


def tmpfs_namespace_problem(target: str = "/mnt") -> str | None:
    """None when a tmpfs can be mounted on ``target`` in a private mount namespace here, else why not (the reason
    a test prints when it skips: it needs root and util-linux ``unshare``)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return f"needs root to mount a small tmpfs on {target} in a private mount namespace"
    if shutil.which("unshare") is None:
        return "needs util-linux unshare"
    probe = subprocess.run(["unshare", "--mount", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {target}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private mount namespace here: {probe.stderr.strip()[:200]}"
    return None


class MountNamespace:
    """A private mount namespace, held open by process :attr:`pid` (see :func:`tmpfs_namespace`)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def run(self, *cmd: str | os.PathLike[str], env: Mapping[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in the namespace (``nsenter --mount``), output captured as text."""
        return subprocess.run(["nsenter", f"--mount=/proc/{self.pid}/ns/mnt", *(os.fspath(c) for c in cmd)],
                              capture_output=True, text=True, env=None if env is None else dict(env), check=check,
                              timeout=600)

    def view(self, path: str | os.PathLike[str]) -> Path:
        """``path`` as this namespace sees it, readable from outside (``/proc/PID/root/...``)."""
        return Path(f"/proc/{self.pid}/root{os.path.abspath(path)}")


@contextmanager
def tmpfs_namespace(target: str | os.PathLike[str], size: str) -> Iterator[MountNamespace]:
    """A private mount namespace (``unshare --mount``) with a ``size`` tmpfs on ``target``, for the duration of the
    ``with`` block; the machine's own mounts are untouched, and the namespace vanishes with its last process (its
    holder ends at the block's end, or when the test process dies: EOF on the holder's stdin). Needs root
    (:func:`tmpfs_namespace_problem` says why not)."""
    script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && echo mounted && exec cat > /dev/null'
    holder = subprocess.Popen(["unshare", "--mount", "sh", "-c", script, "sh", size, os.fspath(target)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert holder.stdin is not None and holder.stdout is not None
    try:
        if holder.stdout.readline().strip() != "mounted":  # (the shell has ended: the mount failed)
            raise RuntimeError(f"cannot mount a tmpfs on {target} in a private mount namespace: "
                               f"{holder.communicate(timeout=60)[1].strip()[:300]}")
        yield MountNamespace(holder.pid)
    finally:
        if not holder.stdin.closed:
            holder.stdin.close()
        try:
            holder.wait(timeout=60)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()
        for stream in (holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


@contextmanager
def ram_folder(name: str, gigabytes: float, shm: str = "/dev/shm") -> Iterator[Path]:
    """A fresh folder in memory (under ``shm``, a tmpfs) for a test that writes and reads back GB-sized files (the
    stage-2 ViT-L run writes ~5 GB, whose fsyncs alone cost ~7 s on this machine's disk); removed at the end. Falls
    back to the default temporary folder when ``shm`` lacks room for ``gigabytes`` or the machine lacks twice that
    in available memory (a tmpfs holds its files in RAM)."""
    import tempfile

    from mstar_extract.reading.pool import shm_free_bytes

    need = int(gigabytes * 2**30)
    in_ram = (shm_free_bytes(shm) or 0) >= need and _available_memory() >= 2 * need
    folder = Path(tempfile.mkdtemp(prefix=f"mstar-test-{name}-", dir=shm if in_ram else None))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
