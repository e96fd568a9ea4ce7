"""Atomic writes and the clean-up of temp files left by killed runs (store/atomic.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mstar_extract.store.atomic import atomic_path, clean_stale_temps, temp_path_for, write_text_atomic


def test_atomic_path_renames_on_success_and_removes_on_error(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "x.txt"
    with atomic_path(final) as tmp:
        tmp.write_text("complete")
        assert not final.exists() and tmp.parent == final.parent and tmp.name.startswith(".x.txt.")
    assert final.read_text() == "complete"
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert final.read_text() == "complete"  # the old complete file is untouched
    assert sorted(p.name for p in final.parent.iterdir()) == ["x.txt"]  # no temp left


def test_clean_stale_temps_removes_only_our_dead_temps(tmp_path: Path) -> None:
    dead_proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead_proc.stdout)
    live = temp_path_for(tmp_path / "a.h5")
    live.write_text("being written by this live process")
    dead = live.with_name(live.name.replace(f".{os.getpid()}.", f".{dead_pid}."))
    dead.write_text("left by a killed run")
    other_host_recent = tmp_path / ".b.h5.othernode.123.0123abcd.tmp"
    other_host_recent.write_text("another node may still write this")
    other_host_old = tmp_path / ".c.h5.othernode.123.89abcdef.tmp"
    other_host_old.write_text("old")
    old = time.time() - 3600
    os.utime(other_host_old, (old, old))
    foreign = tmp_path / ".notes.tmp"
    foreign.write_text("not ours")
    write_text_atomic(tmp_path / "done.txt", "ok")

    removed = {p.name for p in clean_stale_temps(tmp_path, older_than_s=600)}
    assert removed == {dead.name, other_host_old.name}
    assert live.exists() and other_host_recent.exists() and foreign.exists() and (tmp_path / "done.txt").exists()
