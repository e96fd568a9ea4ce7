"""The test launcher (mstar_extract/testing/launcher.py): the suite's CLI runs are real processes forked from one
pre-imported interpreter, with their own pipes, exit codes and signals, and a fresh interpreter wherever a fork
could see another program."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from mstar_extract.testing.cli import run_mstar, start_mstar
from mstar_extract.testing.forked import LaunchedProcess
from mstar_extract.testing.launcher import forkable_env


def test_runs_are_forked_even_as_pytest_changes_its_environment() -> None:
    """pytest sets PYTEST_CURRENT_TEST anew for every test: runs must still be forks (this was missed once,
    and every run after the first fell back to a fresh interpreter)."""
    if os.environ.get("MSTAR_TEST_FORK") == "0":
        pytest.skip("MSTAR_TEST_FORK=0: every run is a fresh interpreter")
    assert "PYTEST_CURRENT_TEST" in os.environ
    proc = start_mstar("--version")
    out, err = proc.communicate(timeout=120)
    assert isinstance(proc, LaunchedProcess) and proc.returncode == 0 and out.startswith("mstar, version"), err


def test_runs_are_still_forked_after_torch_sets_its_compile_cache_in_this_process(monkeypatch) -> None:
    """torch sets ``TORCHINDUCTOR_CACHE_DIR`` in ``os.environ`` the first time a process compiles (an in-process
    ``mstar extract``); it is read at compile time, not at import, so it must not turn every later run of the test
    process into a fresh interpreter (it did, depending on which tests a pytest-xdist worker ran first)."""
    if os.environ.get("MSTAR_TEST_FORK") == "0":
        pytest.skip("MSTAR_TEST_FORK=0: every run is a fresh interpreter")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setattr("mstar_extract.testing.forked._launcher", None)  # one started without the variable
    start_mstar("--version").communicate(timeout=120)
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    cache_dir()
    assert "TORCHINDUCTOR_CACHE_DIR" in os.environ
    proc = start_mstar("--version")
    out, err = proc.communicate(timeout=120)
    assert isinstance(proc, LaunchedProcess) and proc.returncode == 0 and out.startswith("mstar, version"), err


def test_exit_codes_stdin_stderr_and_signals_come_through(tmp_path) -> None:
    r = run_mstar("status", tmp_path / "nothing-here")
    assert r.returncode == 2 and "mstar: error:" in r.stderr and r.stdout == ""
    r = run_mstar("info", "-", "--json", stdin=f"{tmp_path / 'missing.svs'}\n")
    assert r.returncode == 1 and "missing.svs" in r.stderr
    proc = start_mstar("info", "-", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)  # waits for its stdin
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def test_an_import_time_variable_gives_a_fresh_interpreter() -> None:
    base = {"PATH": "/usr/bin", "HOME": "/root"}
    assert forkable_env({**base, "MSTAR_WORKERS": "3", "OMP_NUM_THREADS": "1", "PYTEST_CURRENT_TEST": "x"}, base)
    assert not forkable_env({**base, "HF_ENDPOINT": "http://127.0.0.1:1"}, base)  # huggingface_hub reads it on import
    assert not forkable_env({"PATH": "/usr/bin"}, base)
    proc = start_mstar("--version", env={**os.environ, "HF_ENDPOINT": "http://127.0.0.1:1"})
    assert isinstance(proc, subprocess.Popen)
    proc.communicate(timeout=120)


def test_a_run_joins_the_mount_namespace_it_is_given(tmp_path) -> None:
    """``mount_namespace=PID``: the run sees the mounts of that process's private namespace (a file that exists
    only on its tmpfs), forked (setns in the child) or fresh (nsenter); without it, the host's view; a namespace
    that cannot be joined is one line and exit 126, not a run in the wrong place."""
    from mstar_extract.testing.mounts import tmpfs_namespace, tmpfs_namespace_problem

    why = tmpfs_namespace_problem(str(tmp_path))
    if why is not None:
        pytest.skip(why)
    slide = tmp_path / "only-here.svs"
    with tmpfs_namespace(tmp_path, "1m") as ns:
        ns.run("sh", "-c", f"echo not a slide > {slide}")
        assert ns.view(slide).read_text() == "not a slide\n" and not slide.exists()
        forked = start_mstar("info", slide, mount_namespace=ns.pid)
        fresh = start_mstar("info", slide, mount_namespace=ns.pid, env={**os.environ, "HF_ENDPOINT": "http://x:1"})
        host = run_mstar("info", slide)
        for proc in (forked, fresh):
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 1 and "does not start with a TIFF header" in err, err
        assert isinstance(fresh, subprocess.Popen) and fresh.args[0] == "nsenter"
        if os.environ.get("MSTAR_TEST_FORK") != "0":
            assert isinstance(forked, LaunchedProcess)
    assert host.returncode == 1 and "file not found" in host.stderr, host.stderr
    gone = run_mstar("--version", mount_namespace=ns.pid)  # the holder has ended
    assert gone.returncode != 0 and gone.stdout == "", gone
    if isinstance(gone.args, list) and gone.args[0] == "mstar":  # forked (fresh: nsenter's own message)
        assert gone.returncode == 126 and gone.stderr.startswith(
            "mstar test launcher: cannot join the mount namespace of process "), gone.stderr
