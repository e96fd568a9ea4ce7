"""Whole-run errors (exit 3) versus per-slide failures, with real files, real file systems and real processes.

* which errors are not about one slide (``pipeline.whole_run``): real ENOSPC (``/dev/full``, a full tmpfs), real
  torch errors (a dynamo failure, CUDA without a driver, a CUDA out-of-memory on a GPU), real per-slide errors;
* a full OUT while a bag is written (a 64 KiB tmpfs in a private mount namespace that the runs join,
  ``testing.mounts.tmpfs_namespace``): one line, exit 3, the JSONL
  summary, no lock, no temp file, no row for the slides not finished, and the next run (the tmpfs grown)
  finishes them; before: h5py tracebacks and a segmentation fault (exit 139);
* a read-only OUT (the tmpfs remounted read-only): one line, exit 3, nothing changed;
* ``--compile`` on a node whose C++ compiler does not work: the warm-up batch fails, exit 3, no slide touched;
  before: every slide ``failed`` with the same compiler error, exit 1;
* SIGTERM while the model loads: exit 143 and the JSONL summary; before: no summary;
* ``--compile`` compiles once, for the configured batch size, when a small slide comes first (before: the first
  slide's last batch size was compiled, then the next slide's full batches recompiled).

Root and ``unshare`` are needed for the mount namespaces; those tests are skipped with the reason otherwise.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from mstar_extract.testing.cli import mstar_env, quiet_env, run_mstar, start_mstar
from mstar_extract.testing.fixtures import make_svs
from mstar_extract.testing.scene import random_scene

SMALL_MODEL = "timm:mobilenetv3_small_050"
"""~7 ms a patch on one core; 288-d features: a bag of the 119-patch slide is ~140 KiB, more than the 64 KiB tmpfs
holds."""
FINAL = ("done", "skipped", "no_tissue", "failed")


def _jsonl(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def _leftovers(out: Path) -> list[Path]:
    """Temp files and lock files under OUT."""
    return sorted(p for p in out.rglob("*") if p.is_file() and (p.name.endswith(".tmp") or p.suffix == ".lock"))


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 20x SVS slides with one large tissue island each: ~119 patches of 256 px (bags of ~140 KiB)."""
    d = tmp_path_factory.mktemp("two")
    for i, sid in enumerate(("a", "b")):
        scene = random_scene(4000.0, 3200.0, seed=7 + i, n_blobs=1, holes=False, pen=False, dust=False, faint=False)
        make_svs(d / f"{sid}.svs", scene, mpp=0.5, magnification=20, levels=(1, 4, 16), associated=False)
    return d


@pytest.fixture(scope="module")
def tiled(two_slides: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mstar tile`` of both slides (coordinates for ``--coords-dir``, so OUT receives only bags and records)."""
    out = tmp_path_factory.mktemp("tiled")
    r = run_mstar("tile", two_slides, out, "--patch-size", "256", "--workers", "1", "--no-qc", "--no-report",
                  env=quiet_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------------- classification
def test_disk_errors_are_whole_run_errors_and_slide_errors_are_not() -> None:
    import errno

    import h5py

    from mstar_extract.errors import ReadError, RunError, SlideOpenError
    from mstar_extract.pipeline.whole_run import is_whole_run, whole_run_error
    from mstar_extract.store.atomic import disk_problem

    with pytest.raises(OSError) as full:  # /dev/full: every write fails with ENOSPC, for real
        with open("/dev/full", "wb") as fh:
            fh.write(b"x" * 10)
    assert disk_problem(full.value) == "cannot write: no space left on the device"
    with pytest.raises(OSError) as hdf5:  # HDF5's own error, naming errno 28 in its text
        with h5py.File("/dev/full", "w") as f:
            f.create_dataset("x", data=np.ones(100_000, np.float32))
    assert disk_problem(hdf5.value) == "cannot write /dev/full: no space left on the device"
    err = whole_run_error(full.value)
    assert isinstance(err, RunError) and "no space left" in str(err) and "left for the next run" in str(err)
    wrapped = RuntimeError("writing the bag failed")
    wrapped.__cause__ = full.value
    assert is_whole_run(wrapped)  # found through the chain of causes
    # permission errors count only when they escape the run's own bookkeeping (a lock, the manifest)
    perm = PermissionError(errno.EACCES, "Permission denied", "/out/.locks/a.lock")
    assert not is_whole_run(perm) and whole_run_error(perm, escaped=True) is not None
    for per_slide in (SlideOpenError("/s/a.svs", "empty file (0 bytes)"), ReadError("/s/a.svs", "corrupt tile"),
                      MemoryError(), ValueError("bad coordinates"), FileNotFoundError(errno.ENOENT, "gone", "/s/a")):
        assert not is_whole_run(per_slide), per_slide
    assert not is_whole_run(OSError(errno.EIO, "Input/output error", "/s/a.svs"))  # a bad slide file


def test_device_and_compile_errors_are_whole_run_errors() -> None:
    import torch

    from mstar_extract.models.encoder import device_problem
    from mstar_extract.pipeline.whole_run import is_whole_run

    with pytest.raises(Exception) as invalid:  # a real dynamo error: no such compile backend
        torch.compile(torch.nn.Linear(2, 2), backend="no-such-backend")
    assert device_problem(invalid.value).startswith("torch.compile failed (InvalidBackend: ")
    with pytest.raises(RuntimeError) as shapes:  # a real error of the computation, not of the machine
        torch.zeros(2, 3) @ torch.zeros(2, 3)
    assert device_problem(shapes.value) is None and not is_whole_run(shapes.value)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError) as no_driver:  # what torch raises on a node whose driver is missing
            torch.zeros(1, device="cuda")
        assert device_problem(no_driver.value).startswith("device error (")
        assert is_whole_run(no_driver.value)


@pytest.mark.gpu
def test_a_real_cuda_out_of_memory_is_a_whole_run_error() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mstar_extract.models.encoder import device_problem

    with pytest.raises(torch.OutOfMemoryError) as oom:
        torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # a petabyte
    assert device_problem(oom.value).startswith("out of memory on the device (")


# ------------------------------------------------------------------------------------- full / read-only OUT
def _namespace_ok() -> str | None:
    """None when a tmpfs can be mounted in a private mount namespace here, else why not."""
    from mstar_extract.testing.mounts import tmpfs_namespace_problem

    return tmpfs_namespace_problem("/mnt")


def _namespace(mnt: Path, size: str):
    """A private mount namespace with a ``size`` tmpfs on ``mnt`` (skips with the reason where none can be made)."""
    from mstar_extract.testing.mounts import tmpfs_namespace

    why = _namespace_ok()
    if why is not None:
        pytest.skip(why)
    return tmpfs_namespace(mnt, size)


def _extract(slides: Path, out: Path, coords: Path, ns_pid: int) -> tuple[int, list[dict], str]:
    """``mstar extract`` into ``out``, run in the mount namespace of ``ns_pid``: (exit code, JSONL events, stderr)."""
    r = run_mstar("extract", slides, out, "--model", SMALL_MODEL, "--weights", "random", "--device", "cpu",
                  "--workers", "1", "--batch-size", "8", "--coords-dir", coords, "--no-report", "--jsonl", env=quiet_env(),
                  mount_namespace=ns_pid, timeout=900)  # batch 8: the warm-up batch costs little
    return r.returncode, _jsonl(r.stdout), r.stderr


def _files(view: Path, out: Path) -> list[str]:
    """Every file under OUT as the namespace sees it (``view``), named by its path in the namespace."""
    return sorted(str(out / p.relative_to(view)) for p in view.rglob("*") if p.is_file())


def _no_noise(stderr: str) -> None:
    for bad in ("Traceback", "Exception ignored", "unexpected", "Segmentation"):
        assert bad not in stderr, stderr[-3000:]


_PROBE = ("import h5py, numpy as np, os\nfrom mstar_extract.store.atomic import disk_problem\n"
          "try:\n    f = h5py.File(os.environ['T'], 'w'); f.create_dataset('x', data=np.ones((99999, 9)))\n"
          "    f.close()\nexcept Exception as exc:\n    print(type(exc).__name__, disk_problem(exc), flush=True)\n"
          "os._exit(0)\n")  # (os._exit: that half-flushed file would crash the interpreter at exit)


@pytest.mark.slow
def test_full_out_stops_the_run_with_one_line_and_the_next_run_finishes(two_slides: Path, tiled: Path,
                                                                       tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = mnt / "out"
    with _namespace(mnt, "64k") as ns:
        code, events, stderr = _extract(two_slides, out, tiled, ns.pid)
        files = _files(ns.view(out), out)
        # HDF5 writing in place on that disk (a small fresh interpreter: no torch) fails like this:
        probe = ns.run(sys.executable, "-c", _PROBE, env={**mstar_env(), "T": str(mnt / "probe.h5")}).stdout
        ns.run("rm", "-f", mnt / "probe.h5")
        ns.run("mount", "-o", "remount,size=16m", mnt)
        again = _extract(two_slides, out, tiled, ns.pid)
        again_files = _files(ns.view(out), out)

    _no_noise(stderr)
    assert code == 3, stderr[-3000:]
    errors = [ln for ln in stderr.splitlines() if ln.startswith("mstar: error:")]
    assert len(errors) == 1 and "no space left on the device" in errors[0] and "/features/" in errors[0], stderr
    assert events[-1]["event"] == "summary" and events[-1]["exit_code"] == 3
    assert "no space left" in events[-1]["error"] and events[-1]["counts"]["failed"] == 0
    assert not [e for e in events if e["event"] in FINAL]  # no slide was marked failed: they wait for the next job
    assert files and not [f for f in files if f.endswith((".tmp", ".lock")) or "/features/" in f
                          or "/.manifest/" in f], files
    assert probe.split(" ", 1)[1].startswith("cannot write"), probe  # (what the bag writer no longer meets)

    code, events, stderr = again
    assert code == 0, stderr[-3000:]
    assert sorted((e["slide_id"], e["status"]) for e in events if e["event"] in FINAL) == [("a", "done"), ("b", "done")]
    assert {Path(f).name for f in again_files if "/features/" in f} == {"a.h5", "b.h5"}
    assert not [f for f in again_files if f.endswith((".tmp", ".lock"))], again_files


@pytest.mark.slow
def test_read_only_out_is_one_line_and_exit_3(two_slides: Path, tiled: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = mnt / "out"
    with _namespace(mnt, "16m") as ns:
        first = _extract(two_slides / "a.svs", out, tiled, ns.pid)
        before = _files(ns.view(out), out)
        md5 = hashlib.md5(ns.view(out / "features" / "a.h5").read_bytes()).hexdigest()
        ns.run("mount", "-o", "remount,ro", mnt)
        code, events, stderr = _extract(two_slides, out, tiled, ns.pid)
        after = _files(ns.view(out), out)
        md5_after = hashlib.md5(ns.view(out / "features" / "a.h5").read_bytes()).hexdigest()
    assert first[0] == 0, first[2][-3000:]
    assert any(f.endswith("/features/a.h5") for f in before), before

    _no_noise(stderr)
    assert code == 3, stderr[-3000:]
    errors = [ln for ln in stderr.splitlines() if ln.startswith("mstar: error:")]
    assert len(errors) == 1 and "read-only file system" in errors[0], stderr
    assert events[-1]["event"] == "summary" and events[-1]["exit_code"] == 3 and "read-only" in events[-1]["error"]
    assert after == before  # nothing written
    assert md5_after == md5  # the finished bag is untouched


# ------------------------------------------------------------------------------------- compile and signals
@pytest.mark.slow
def test_a_broken_compiler_stops_the_run_at_the_warm_up(two_slides: Path, tmp_path: Path) -> None:
    """A node without a working C++ compiler: Inductor fails at the first compiled call, for real."""
    out = tmp_path / "out"
    no_compiler = tmp_path / "bin"  # the only folder on PATH: no g++, c++ or clang++ to be found
    no_compiler.mkdir()
    env = quiet_env(PATH=str(no_compiler), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    r = run_mstar("extract", two_slides, out, "--model", "timm:test_vit", "--weights", "random", "--device", "cpu",
                  "--workers", "1", "--patch-size", "256", "--compile", "--jsonl", env=env, timeout=900)
    _no_noise(r.stderr)
    assert r.returncode == 3, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("mstar: error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "warm-up batch of 32 patches on cpu failed: torch.compile failed" in errors[0]
    assert "C++ compiler" in errors[0] and "run without --compile" in errors[0]
    events = _jsonl(r.stdout)
    assert [e["event"] for e in events] == ["summary"]  # no slide was started, none failed
    assert events[0]["exit_code"] == 3 and events[0]["total"] == 2
    assert not (out / "manifest.csv").exists() and not (out / ".manifest").exists()
    assert _leftovers(out) == []


@pytest.mark.slow
def test_sigterm_while_the_model_loads_prints_the_summary(two_slides: Path, tmp_path: Path) -> None:
    """SIGTERM while the ViT-L is being built (the random-weights warning comes just before): exit 143 with the
    JSONL summary, no lock, nothing started."""
    out = tmp_path / "out"
    proc = start_mstar("extract", two_slides, out, "--model", "mstar", "--weights", "random", "--device", "cpu",
                       "--workers", "1", "--jsonl", env=quiet_env())
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # wait until the weights are resolved: the network is being built now
        seen.append(line)
        if "RANDOM weights" in line:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, rest = proc.communicate(timeout=300)
    stderr = "".join(seen) + rest
    assert proc.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "mstar: error: terminated" in stderr
    events = _jsonl(stdout)
    assert [e["event"] for e in events] == ["summary"], events
    assert events[0]["interrupted"] is True and events[0]["exit_code"] == 143 and events[0]["total"] == 2
    assert not out.exists() or _leftovers(out) == []


# ------------------------------------------------------------------------------------- compiled batch size
def test_compiled_once_for_the_batch_size_when_a_small_slide_comes_first(tmp_path: Path) -> None:
    """A real torch.compile (dynamo traces the model; the backend counts the graphs it is given and runs them
    as they are). The 4-patch slide comes first; its batch is padded to 8, the 23-patch slide's batches (8, 8,
    7) reuse the one graph; the features equal those of the uncompiled model (padding rows are not in the bag)."""
    import torch

    from mstar_extract.inputs import resolve_slides
    from mstar_extract.models import Encoder
    from mstar_extract.pipeline.extract_job import ExtractSettings, run_extract
    from mstar_extract.pipeline.tile_job import TileSettings
    from mstar_extract.store.bags import read_bag
    from mstar_extract.tiling import TilingParams

    slides = tmp_path / "slides"
    slides.mkdir()
    for name, (w, h) in (("a_small", (400.0, 400.0)), ("b_large", (1000.0, 800.0))):  # the small one first
        scene = random_scene(w, h, seed=3, n_blobs=1, holes=False, pen=False, dust=False, faint=False)
        make_svs(slides / f"{name}.svs", scene, mpp=0.5, magnification=20, levels=(1, 4), associated=False)
    graphs: list[tuple[int, ...]] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        first = next(t for t in example_inputs if isinstance(t, torch.Tensor))  # (a recompile may pass sizes too)
        graphs.append(tuple(first.shape))
        return gm.forward

    settings = ExtractSettings(tile=TileSettings(tiling=TilingParams(magnification=20.0, patch_size=128)),
                               model="timm:test_vit", weights="random", device="cpu", batch_size=8, workers=0)
    entries = resolve_slides([str(slides)])
    assert [e.slide_id for e in entries] == ["a_small", "b_large"]
    compiled = Encoder.create("timm:test_vit", "random", device="cpu", compile=True, compile_backend=counting_backend)
    assert run_extract(entries, tmp_path / "compiled", settings, encoder=compiled) == 0
    eager = Encoder.create("timm:test_vit", "random", device="cpu")
    assert run_extract(entries, tmp_path / "eager", settings, encoder=eager) == 0
    assert graphs == [(8, 3, 160, 160)], graphs  # one graph, for the configured batch size
    n = {}
    for sid in ("a_small", "b_large"):
        got, want = read_bag(tmp_path / "compiled" / "features" / f"{sid}.h5"), read_bag(
            tmp_path / "eager" / "features" / f"{sid}.h5")
        assert np.array_equal(got.coords, want.coords)
        np.testing.assert_allclose(got.features, want.features, rtol=1e-4, atol=1e-5)
        n[sid] = len(got)
    assert 0 < n["a_small"] < 8 < n["b_large"] and n["b_large"] % 8, n  # a partial batch first, then several


# ------------------------------------------------------------------------------------- on a GPU
def _needs_cuda_and_a_reader() -> None:
    import importlib

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    for module in ("openslide", "tiffslide"):
        try:
            importlib.import_module(module)
            return
        except Exception:  # noqa: BLE001 - missing, or its native library is
            continue
    pytest.skip("needs openslide-python or tiffslide to read SVS slides (carry their wheels in .whl/)")


@pytest.mark.gpu
def test_cuda_out_of_memory_at_the_batch_size_stops_the_run_at_the_warm_up(two_slides: Path, tmp_path: Path) -> None:
    """A batch of 400,000 patches cannot fit on any GPU: the warm-up batch fails, exit 3, no slide touched
    (before: every slide ``failed`` with the same out-of-memory line, exit 1)."""
    _needs_cuda_and_a_reader()
    out = tmp_path / "out"
    r = run_mstar("extract", two_slides, out, "--model", "timm:vit_tiny_patch16_224", "--weights", "random",
                  "--device", "cuda", "--batch-size", "400000", "--workers", "1", "--jsonl", env=quiet_env())
    _no_noise(r.stderr)
    assert r.returncode == 3, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("mstar: error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "warm-up batch of 400000 patches on cuda:" in errors[0] and "out of memory on the device" in errors[0]
    assert "use a smaller --batch-size" in errors[0]
    events = _jsonl(r.stdout)
    assert [e["event"] for e in events] == ["summary"] and events[0]["exit_code"] == 3
    assert not (out / ".manifest").exists() and _leftovers(out) == []


@pytest.mark.gpu
def test_features_copied_back_without_a_sync_equal_the_cpu_ones(two_slides: Path, tmp_path: Path) -> None:
    """The non-blocking copy-back (pinned memory, one CUDA event per slide, 16 batches per copy) gives the same
    features as the CPU: batch 4, so ~30 batches per slide, several copies, two slides back to back."""
    _needs_cuda_and_a_reader()
    from mstar_extract.inputs import resolve_slides
    from mstar_extract.pipeline.extract_job import ExtractSettings, run_extract
    from mstar_extract.pipeline.tile_job import TileSettings
    from mstar_extract.store.bags import read_bag
    from mstar_extract.tiling import TilingParams

    entries = resolve_slides([str(two_slides)])
    for device in ("cpu", "cuda"):
        settings = ExtractSettings(tile=TileSettings(tiling=TilingParams(magnification=20.0, patch_size=256)),
                                   model="timm:vit_tiny_patch16_224", weights="random", device=device,
                                   precision="fp32", batch_size=4, workers=1)
        assert run_extract(entries, tmp_path / device, settings) == 0
    for sid in ("a", "b"):
        cpu, gpu = (read_bag(tmp_path / d / "features" / f"{sid}.h5") for d in ("cpu", "cuda"))
        assert len(cpu) > 64 and np.array_equal(cpu.coords, gpu.coords)
        scale = float(np.abs(cpu.features).max())
        assert float(np.abs(gpu.features - cpu.features).max()) < 0.02 * scale, sid  # TF32 convolutions at most
        assert (np.abs(gpu.features).sum(axis=1) > 0).all()  # no row left unwritten


def test_devices_exit_code_combines_the_device_processes() -> None:
    from mstar_extract.errors import worst_exit_code as combined_exit_code

    assert combined_exit_code([0, 0]) == 0
    assert combined_exit_code([0, 1]) == 1  # a slide failed somewhere (outside torchrun: exit 1)
    assert combined_exit_code([1, 3]) == 3 and combined_exit_code([0, 3]) == 3  # a whole-run error wins
    assert combined_exit_code([0, -15]) == 1 and combined_exit_code([None, 0]) == 1  # killed / never ended
