"""Issue 16 ("ready for the first GPU node"): what would break, stall or mislead on a real cluster node.

* a small ``/dev/shm`` (Docker's 64 MB default): the reader ring is sized to it (fewer slots, or pipes), never a
  worker killed by SIGBUS — run for real in a private mount namespace with a 64 MB tmpfs on ``/dev/shm`` (the
  ``mstar`` run joins it, ``testing.mounts.tmpfs_namespace``; needs root and ``unshare``; skipped with the reason
  otherwise);
* the automatic precision: bf16 only on GPUs with bf16 hardware, fp16 (and one line) on older ones;
* reader workers per torchrun rank: the node's CPUs divided by ``LOCAL_WORLD_SIZE`` (proved on the CPU by the one
  real ``torchrun`` job of ``tests/test_extract_scale.py``, which also checks the split and a failing rank);
* the CUDA device of each process is set once (``torch.cuda.set_device``) and every timing synchronises it.

Tests marked ``gpu`` run only where CUDA is available (``pytest -m gpu``; ``benchmarks/gpu.sh`` runs them).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mstar_extract.reading.pool import ring_slots
from mstar_extract.testing.cli import quiet_env, run_mstar
from mstar_extract.testing.fixtures import make_island_slides, make_svs
from mstar_extract.testing.scene import random_scene

SMALL_MODEL = "timm:mobilenetv3_small_050"
"""A 224-px timm model cheap enough on the CPU for a few hundred patches (~7 ms a patch on one core; batches are
224 px, 38.5 MB per 256)."""


@pytest.fixture(scope="module")
def big_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 20x SVS with one large tissue island: about 310 patches of 128 px, i.e. two batches of 256."""
    d = tmp_path_factory.mktemp("shm_slide")
    scene = random_scene(3200.0, 2600.0, seed=7, n_blobs=1, holes=False, pen=False, dust=False, faint=False)
    return make_svs(d / "big.svs", scene, mpp=0.5, magnification=20, levels=(1, 4, 16), associated=False)


# --------------------------------------------------------------------------------------- item 2: /dev/shm
def test_ring_slots_fit_the_free_space() -> None:
    mb = 1 << 20
    slot = 256 * 224 * 224 * 3  # one batch of 256 model-ready patches: 36.75 MiB
    assert ring_slots(18, 9, slot, None) == 18  # nothing to ask: as wanted
    assert ring_slots(18, 9, slot, 64 * 1024 * mb) == 18  # a roomy /dev/shm
    assert ring_slots(18, 9, slot, 512 * mb) == 10  # 512 MB less 25 % headroom: 10 slots
    assert ring_slots(18, 9, slot, 64 * mb) == 0  # Docker's default: not even workers + 1 -> pipes
    assert ring_slots(18, 9, slot, 300 * mb) == 0
    assert ring_slots(4, 9, mb, 40 * mb) == 4  # a caller's own small ring is kept when it fits
    assert ring_slots(4, 3, 10 * mb, 20 * mb) == 0  # headroom is at least 16 MB


def _small_shm_ok() -> str | None:
    """None when a private mount namespace with a tmpfs on /dev/shm can be made here, else why not."""
    from mstar_extract.testing.mounts import tmpfs_namespace_problem

    return tmpfs_namespace_problem("/dev/shm")


def in_small_shm(size: str, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``cmd`` with a fresh ``size`` tmpfs on /dev/shm, in a private mount namespace (the host's is untouched);
    for a script of the test's own (an ``mstar`` run joins a :func:`~mstar_extract.testing.mounts.tmpfs_namespace`
    instead, forked from the pre-imported test launcher)."""
    why = _small_shm_ok()
    if why is not None:
        pytest.skip(why)
    script = f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"'
    return subprocess.run(["unshare", "--mount", "sh", "-c", script, "sh", *cmd], capture_output=True, text=True,
                          env=quiet_env(), timeout=timeout)


@pytest.mark.slow
def test_extract_with_8_workers_on_a_64mb_dev_shm_completes(big_slide: Path, tmp_path: Path) -> None:
    """Before: 18 slots x 38.5 MB were 'created' in 64 MB; the second batch written -> worker killed by SIGBUS."""
    from mstar_extract.testing.mounts import tmpfs_namespace

    why = _small_shm_ok()
    if why is not None:
        pytest.skip(why)
    out = tmp_path / "out"
    with tmpfs_namespace("/dev/shm", "64m") as ns:  # the run (and its reader workers) see a 64 MB /dev/shm
        r = run_mstar("extract", big_slide, out, "--model", SMALL_MODEL, "--weights", "random", "--device", "cpu",
                      "--workers", "8", "--batch-size", "256", "--patch-size", "128", "--jsonl", env=quiet_env(),
                      mount_namespace=ns.pid)
    assert "SIGBUS" not in r.stderr and "died" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 0, r.stderr[-3000:]
    events = [json.loads(line) for line in r.stdout.splitlines()]
    done = [e for e in events if e["event"] == "done"]
    assert len(done) == 1 and done[0]["n_patches"] > 256, events[-3:]  # more than one batch went through
    assert (out / "features" / "big.h5").is_file()
    lines = [ln for ln in r.stderr.splitlines() if "/dev/shm" in ln]
    assert len(lines) == 1, r.stderr[-3000:]
    assert re.search(r"/dev/shm has \d+\.\d MiB free: too small .* travel through pipes", lines[0]), lines[0]


_POOL_SCRIPT = r"""
import json, pickle, sys
from multiprocessing import shared_memory
from mstar_extract.reading import ReaderPool, SlideJob
from mstar_extract.reading.pool import _reserve

def read_all(pool, job):
    pool.submit(job)
    n = 0
    for stream in pool.results():
        for batch in stream:
            n += batch.pixels.shape[0]
    return n

job = SlideJob("big", sys.argv[1], pickle.loads(bytes.fromhex(sys.argv[2])))
res = {}
with ReaderPool(workers=8, batch_size=256) as a:
    res["a"] = [a.n_slots, a.transport, read_all(a, job)]
    with ReaderPool(workers=8, batch_size=256) as b:  # sized to what the first one left
        res["b"] = [b.n_slots, b.transport, read_all(b, job)]
seg = shared_memory.SharedMemory(create=True, size=600 << 20)  # more than the tmpfs: created without complaint
try:
    _reserve(seg, 600 << 20)
    res["reserve"] = "ok"
except OSError as exc:
    res["reserve"] = exc.errno
finally:
    seg.close(); seg.unlink()
print(json.dumps(res))
"""


@pytest.mark.slow
def test_reader_ring_is_cut_to_a_512mb_dev_shm(big_slide: Path, tmp_path: Path) -> None:
    """512 MB: the ring gets the 10 slots that fit (of 18); a second pool sees what the first reserved."""
    import errno
    import pickle

    from mstar_extract.inputs import resolve_slides
    from mstar_extract.pipeline.tile_job import TileSettings, open_with_resolution, segment_and_plan
    from mstar_extract.tiling import TilingParams

    settings = TileSettings(tiling=TilingParams(magnification=20.0, patch_size=128))
    entry = resolve_slides([str(big_slide)])[0]
    with open_with_resolution(entry, settings) as slide:
        _, plan = segment_and_plan(slide, entry.slide_id, settings)
    r = in_small_shm("512m", sys.executable, "-c", _POOL_SCRIPT, str(big_slide), pickle.dumps(plan).hex())
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["a"] == [10, "shm", len(plan)], res
    assert res["b"] == [18, "queue", len(plan)], res  # ~130 MB left: not 9 slots -> pipes, and still complete
    assert res["reserve"] == errno.ENOSPC  # the reservation fails up front instead of a SIGBUS on write
    assert "SIGBUS" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "/dev/shm" in ln]
    assert len(lines) == 2, r.stderr  # one line per pool
    assert "reader ring cut to 10 of 18 slots" in lines[0] and "travel through pipes" in lines[1]


# ------------------------------------------------------------------------------ item 3: auto precision
def test_precision_rule_bf16_only_with_bf16_hardware(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from mstar_extract.models.encoder import resolve_precision
    from mstar_extract.models.precision import auto_precision, native_bf16, precision_for

    assert precision_for("cuda", True) == "bf16"  # A100, H100, H200, L4, RTX 30xx+
    assert precision_for("cuda", False) == "fp16"  # V100, T4: bf16 only emulated, several times slower
    assert precision_for("cpu", True) == precision_for("cpu", False) == "fp32"
    cpu = torch.device("cpu")
    assert native_bf16(cpu) is False and auto_precision(cpu) == "fp32"
    with caplog.at_level(logging.WARNING, logger="mstar"):
        assert resolve_precision(None, cpu) == "fp32" and resolve_precision("auto", cpu) == "fp32"
        assert resolve_precision("fp16", cpu) == "fp16"  # an explicit choice is kept as given
    assert not [r for r in caplog.records if "bf16" in r.getMessage()]  # nothing to say on the CPU


def _importable(module: str) -> bool:
    import importlib

    try:
        importlib.import_module(module)
    except Exception:  # noqa: BLE001 - missing, or its native library is
        return False
    return True


def _cuda_index() -> int:
    import torch

    return torch.cuda.device_count() - 1  # the last GPU: not the default cuda:0 when there are several


@pytest.mark.gpu
def test_cuda_auto_precision_follows_the_gpu_hardware(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mstar_extract.models import Encoder
    from mstar_extract.models.precision import auto_precision

    dev = torch.device("cuda", _cuda_index())
    expected = "bf16" if torch.cuda.get_device_capability(dev) >= (8, 0) else "fp16"
    assert auto_precision(dev) == expected
    with caplog.at_level(logging.WARNING, logger="mstar"):
        enc = Encoder.create("timm:vit_tiny_patch16_224", weights="random", device=str(dev), precision=None)
    assert enc.precision == expected
    fallback = [r for r in caplog.records if "no bf16 hardware" in r.getMessage()]
    assert len(fallback) == (1 if expected == "fp16" else 0)
    feats = enc.embed(np.random.default_rng(0).integers(0, 256, (4, 224, 224, 3), dtype=np.uint8))
    assert feats.dtype == torch.float32 and bool(torch.isfinite(feats).all())


# ----------------------------------------------------------------------------- item 5: the process's GPU
def test_cpu_encoder_and_binding_leave_cuda_alone() -> None:
    """On the CPU nothing initialises CUDA: no context (and no memory) on any GPU of a shared node."""
    import torch

    from mstar_extract.models import Encoder, benchmark_model
    from mstar_extract.models.encoder import synchronize, use_device
    from mstar_extract.pipeline.launch import bind_device

    was = torch.cuda.is_initialized()
    assert use_device("cpu") == torch.device("cpu")
    bind_device("cpu")
    bind_device("auto")
    enc = Encoder.create("timm:vit_tiny_patch16_224", weights="random", device="cpu")
    res = benchmark_model(enc, batch_size=2, seconds=None, iters=1, warmup=0)
    synchronize(enc.device)
    assert res["device"] == "cpu" and res["device_name"] == "cpu"
    assert torch.cuda.is_initialized() == was


_DEVICE_SCRIPT = r"""
import json, sys, torch
from mstar_extract.models import Encoder, benchmark_model
i = int(sys.argv[1])
several = torch.cuda.device_count() > 1  # Inductor's allocations matter (and cost the compile) only then
enc = Encoder.create("timm:vit_tiny_patch16_224", weights="random", device=f"cuda:{i}", compile=several)
res = benchmark_model(enc, batch_size=32, seconds=None, iters=2, warmup=1)
print(json.dumps({"current": torch.cuda.current_device(), "device": res["device"], "name": res["device_name"],
                  "others": {j: torch.cuda.memory_allocated(j) for j in range(torch.cuda.device_count()) if j != i}}))
"""


@pytest.mark.gpu
def test_encoder_makes_its_gpu_the_current_device() -> None:
    """A fresh process given cuda:N (the last GPU): current device N, the benchmark times and names GPU N, and the
    compiled model allocates nothing on the other GPUs (before: Inductor and bare synchronize() used cuda:0)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    i = _cuda_index()
    r = subprocess.run([sys.executable, "-c", _DEVICE_SCRIPT, str(i)], capture_output=True, text=True, env=quiet_env(),
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["current"] == i and res["device"] == f"cuda:{i}"
    assert res["name"] == torch.cuda.get_device_name(i)
    assert all(v == 0 for v in res["others"].values()), res


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small 20x SVS slides, one in each torchrun rank's share (3-5 patches each)."""
    from mstar_extract.sharding import RANK_SALT, share_of

    d = tmp_path_factory.mktemp("two")
    names = [next(f"r{k}_{i}" for i in range(100) if share_of(f"r{k}_{i}", 2, RANK_SALT) == k) for k in range(2)]
    make_island_slides(d, names, seed=20)
    return d


@pytest.mark.gpu
def test_torchrun_rank_extracts_on_its_gpu(two_slides: Path, tmp_path: Path) -> None:
    """torchrun on CUDA: ``--device auto`` becomes cuda:LOCAL_RANK, set as the rank's device; the slides are done."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not any(_importable(m) for m in ("openslide", "tiffslide")):
        pytest.skip("needs openslide-python or tiffslide to read SVS slides (carry their wheels in .whl/)")
    n = min(2, torch.cuda.device_count())
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
           "mstar_extract", "extract", str(two_slides), str(out), "--model", "timm:vit_tiny_patch16_224",
           "--weights", "random", "--workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=quiet_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for k in range(n):
        assert re.search(rf"torchrun rank {k}/{n}: \d slide\(s\) on cuda:{k},", r.stderr), r.stderr[-3000:]
    assert len(list((out / "features").glob("*.h5"))) == 2
