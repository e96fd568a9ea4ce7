"""Environment defaults (MSTAR_WEIGHTS/CACHE/DEVICE/WORKERS/LOCK_TIMEOUT; options win) and shell completion."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from mstar_extract import __version__
from mstar_extract.envdefaults import (
    available_cpus,
    checkout_root,
    default_device,
    default_lock_timeout,
    default_weights,
    default_workers,
    hf_hub_cache,
    local_ranks,
    node_processes,
    weights_cache,
)
from mstar_extract.errors import UsageError
from mstar_extract.locks import lock_path
from mstar_extract.manifest import ManifestRow, ManifestWriter
from mstar_extract.testing.cli import run_mstar


def _run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return run_mstar(*args, timeout=120, env={**os.environ, **env})


def test_weights_env_and_option() -> None:
    assert default_weights(None, env={}) == "hf"
    assert default_weights(None, env={"MSTAR_WEIGHTS": ""}) == "hf"  # empty = unset
    assert default_weights(None, env={"MSTAR_WEIGHTS": "~/w/mstar.pth"}) == os.path.expanduser("~/w/mstar.pth")
    assert default_weights(None, env={"MSTAR_WEIGHTS": "hf"}) == "hf"
    assert default_weights("/opt/x.safetensors", env={"MSTAR_WEIGHTS": "hf"}) == "/opt/x.safetensors"


def _make_checkout(root: Path, git: bool = True, registry: bool = True) -> Path:
    pkg = root / "mstar_extract"
    pkg.mkdir(parents=True)
    if git:
        (root / ".git").mkdir()
    if registry:
        (root / "weights").mkdir()
        (root / "weights" / "registry.json").write_text("{}")
    return pkg


def test_cache_env_checkout_then_hf(tmp_path: Path) -> None:
    pkg = _make_checkout(tmp_path / "repo")
    assert checkout_root(pkg) == tmp_path / "repo"
    c = weights_cache(env={}, package_dir=pkg)
    assert (c.path, c.source) == (tmp_path / "repo" / "weights", "checkout")
    c = weights_cache(env={"MSTAR_CACHE": str(tmp_path / "mine")}, package_dir=pkg)  # the variable wins
    assert (c.path, c.source) == (tmp_path / "mine", "env")
    # an installed copy (no .git), or a checkout without the registry: the Hugging Face cache
    for kw in ({"git": False}, {"registry": False}):
        other = _make_checkout(tmp_path / f"other-{len(kw)}-{list(kw)[0]}", **kw)
        c = weights_cache(env={"HF_HOME": str(tmp_path / "hfhome")}, package_dir=other)
        assert (c.path, c.source) == (tmp_path / "hfhome" / "hub", "hf")


def test_hf_cache_rule() -> None:
    assert hf_hub_cache({"HF_HUB_CACHE": "/a/b"}) == Path("/a/b")
    assert hf_hub_cache({"HF_HOME": "/h"}) == Path("/h/hub")
    assert hf_hub_cache({"XDG_CACHE_HOME": "/x"}) == Path("/x/huggingface/hub")


def test_device_env_option_and_errors() -> None:
    assert default_device(None, env={}) == "auto"
    assert default_device(None, env={"MSTAR_DEVICE": "cuda:1"}) == "cuda:1"
    assert default_device("cpu", env={"MSTAR_DEVICE": "cuda:1"}) == "cpu"
    with pytest.raises(UsageError, match="MSTAR_DEVICE='gpu0'"):
        default_device(None, env={"MSTAR_DEVICE": "gpu0"})
    with pytest.raises(UsageError, match="--device"):
        default_device("cuda:x", env={})


def test_workers_env_option_and_rule() -> None:
    assert default_workers(3, env={"MSTAR_WORKERS": "9"}) == 3
    assert default_workers(0, env={"MSTAR_WORKERS": "9"}) == 0
    assert default_workers(None, env={"MSTAR_WORKERS": "9"}) == 9
    with pytest.raises(UsageError, match="MSTAR_WORKERS='many'"):
        default_workers(None, env={"MSTAR_WORKERS": "many"})
    with pytest.raises(UsageError):
        default_workers(None, env={"MSTAR_WORKERS": "-2"})
    n = available_cpus({})
    assert default_workers(None, env={}) == max(1, min(16, n - 1))
    assert available_cpus({"SLURM_CPUS_PER_TASK": "1"}) == 1  # SLURM's allocation caps the count
    assert default_workers(None, env={"SLURM_CPUS_PER_TASK": "1"}) == 1
    assert default_workers(None, env={}, n_procs=64) == 1  # shared between --devices workers, never 0


def test_workers_are_divided_between_torchrun_ranks_of_the_node() -> None:
    """torchrun ranks inherit the node's CPUs: a 64-core node with 8 local ranks gives each 64 // 8 - 1 = 7."""
    rank = {"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}
    assert local_ranks(rank) == 8 and local_ranks({}) == 1
    assert local_ranks({"LOCAL_WORLD_SIZE": "8"}) == 1  # not under torchrun (no WORLD_SIZE): not counted
    assert default_workers(None, env={}, cpus=64) == 16
    assert default_workers(None, env=rank, cpus=64) == 7
    assert default_workers(None, env=rank, cpus=64, n_procs=2) == 3  # --devices inside a rank: both count
    assert node_processes(2, rank) == 16
    assert default_workers(None, env=rank, cpus=4) == 1  # never 0
    assert default_workers(5, env=rank, cpus=64) == 5  # the option still wins
    assert default_workers(None, env={**rank, "MSTAR_WORKERS": "12"}, cpus=64) == 12
    with pytest.raises(UsageError, match="LOCAL_WORLD_SIZE"):
        default_workers(None, env={**rank, "LOCAL_WORLD_SIZE": "eight"}, cpus=64)


def test_lock_timeout_env_and_option() -> None:
    assert default_lock_timeout(None, env={}) == 600.0
    assert default_lock_timeout(None, env={"MSTAR_LOCK_TIMEOUT": "90"}) == 90.0
    assert default_lock_timeout(30, env={"MSTAR_LOCK_TIMEOUT": "90"}) == 30.0
    with pytest.raises(UsageError, match="MSTAR_LOCK_TIMEOUT"):
        default_lock_timeout(None, env={"MSTAR_LOCK_TIMEOUT": "soon"})


def test_cli_env_default_and_option_override(tmp_path: Path) -> None:
    """Through the real command: MSTAR_LOCK_TIMEOUT sets the default, --lock-timeout wins."""
    ManifestWriter(tmp_path).add(ManifestRow("s", "/x/s.svs", "done", n_patches=1))
    p = lock_path(tmp_path, "busy")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"slide_id": "busy", "host": "elsewhere", "pid": 5, "token": "t"}))
    os.utime(p, (time.time() - 700,) * 2)

    def state(*args: str, **env: str) -> str:
        res = _run(["status", str(tmp_path), "--jsonl", *args], **env)
        return next(json.loads(x) for x in res.stdout.splitlines() if '"busy"' in x)["status"]

    assert state() == "stale"  # default 600 s
    assert state(MSTAR_LOCK_TIMEOUT="1000") == "running"
    assert state("--lock-timeout", "600", MSTAR_LOCK_TIMEOUT="1000") == "stale"
    res = _run(["status", str(tmp_path)], MSTAR_LOCK_TIMEOUT="soon")
    assert res.returncode == 2 and "MSTAR_LOCK_TIMEOUT='soon'" in res.stderr and "Traceback" not in res.stderr


def test_version() -> None:
    res = _run(["--version"])
    assert res.returncode == 0 and __version__ in res.stdout


def test_shell_completion_bash_and_zsh() -> None:
    bash = _run([], _MSTAR_COMPLETE="bash_source")
    assert "_mstar_completion" in bash.stdout and "complete " in bash.stdout
    zsh = _run([], _MSTAR_COMPLETE="zsh_source")
    assert zsh.stdout.startswith("#compdef mstar")
    words = _run([], _MSTAR_COMPLETE="bash_complete", COMP_WORDS="mstar st", COMP_CWORD="1")
    assert words.stdout.split() == ["plain,status"]  # the lazy subcommands complete
    opts = _run([], _MSTAR_COMPLETE="bash_complete", COMP_WORDS="mstar status out --js", COMP_CWORD="3")
    assert set(opts.stdout.split()) == {"plain,--json", "plain,--jsonl"}
