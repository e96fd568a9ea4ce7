"""Small real file systems for tests: a tmpfs mounted in a private mount namespace (``unshare --mount``), so a
test can fill a disk, make OUT read-only or give ``/dev/shm`` 64 MB without touching the machine's own mounts."""

from __future__ import annotations

import os
import shutil
import subprocess


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
