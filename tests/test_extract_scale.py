"""Scale-out of ``mstar extract`` end to end (issue 5), through real ``mstar`` processes:

concurrent jobs on one OUT (each slide done exactly once), a SIGKILLed lock holder taken over, ``--shard``
shares (with ``mstar tile``) and ``--shard auto`` from SLURM variables, coordinates from CLAM and TRIDENT files
(exact coordinates and footprint), ``--devices`` splitting the work, ``--format pt``, and one real ``torchrun``
job (two ranks) for everything torchrun must show: the split, the reader workers per rank, and a bad slide on
one rank that does not stop the other.

Runs use timm's 0.3 M-parameter test ViT (``timm:test_vit``, 160-px input) on the CPU, or a 224-px ViT where a run
must last or features must tell footprints apart (:data:`VIT_224`), with random weights or a state dict written by
the test (when features must be reproduced), on six small real SVS slides.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
import pytest

from mstar_extract.sharding import RANK_SALT, SHARD_SALT, share_of
from mstar_extract.store.bags import read_bag, validate_bag
from mstar_extract.testing.cli import MODULE, quiet_env, run_mstar, start_mstar
from mstar_extract.testing.fixtures import make_island_slides

pytestmark = pytest.mark.slow

MODEL = "timm:test_vit"
VIT_224 = "timm:vit_tiny_patch16_224"
"""A 224-px ViT, ~25x the CPU of :data:`MODEL` a patch: where a run must last long enough to be killed or stopped
while it holds a slide's lock, and for the footprint test (its 192 features tell a 512-px footprint from a 128-px
one at the same corner by a wide margin; the 160-px test ViT, random, only by a few per cent on some patches)."""
BATCH = ("--batch-size", "8")
"""Every run's batch: a small slide's 3-9 patches in one batch, and a warm-up batch (blank patches through the model
before any slide, once per process) that costs less than the default 32 would: on these slides the warm-up was
most of a run's compute."""
FINAL = ("done", "skipped", "no_tissue", "failed")
IDS = [f"s{i}" for i in range(6)]


# ------------------------------------------------------------------------------------------------ helpers
def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return start_mstar(*args, env=env or quiet_env())


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return run_mstar(*args, env=env or quiet_env(), timeout=timeout)


def extract_args(slides: Path | str, out: Path, *extra: str, weights: str = "random") -> list[str]:
    return ["extract", str(slides), str(out), "--model", MODEL, "--weights", weights, "--device", "cpu",
            "--workers", "1", *BATCH, *extra]


def jsonl(stdout: str) -> list[dict]:
    """Every stdout line is one JSON object (json.loads raises otherwise)."""
    return [json.loads(line) for line in stdout.splitlines()]


def finals(events: list[dict]) -> list[dict]:
    return [e for e in events if e["event"] in FINAL]


def part_rows(out: Path) -> dict[str, list[dict]]:
    """Rows of each per-process manifest part file ``OUT/.manifest/*.csv``."""
    parts: dict[str, list[dict]] = {}
    for p in sorted((out / ".manifest").glob("*.csv")):
        with open(p, newline="") as fh:
            parts[p.name] = list(csv.DictReader(fh))
    return parts


def merged(out: Path) -> dict[str, dict]:
    with open(out / "manifest.csv", newline="") as fh:
        return {r["slide_id"]: r for r in csv.DictReader(fh)}


def leftovers(out: Path) -> list[Path]:
    """Temp files anywhere under OUT, and lock files still present."""
    temps = [p for p in out.rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    return temps + sorted((out / ".locks").glob("*")) if (out / ".locks").is_dir() else temps


def pick(ids: list[str], n: int, per_share: int, salt: str) -> list[str]:
    """``per_share`` ids from each of the ``n`` hash shares (so every rank/device gets work)."""
    chosen: list[str] = []
    for i in range(n):
        mine = [s for s in ids if share_of(s, n, salt) == i]
        assert len(mine) >= per_share, f"fixture ids do not cover share {i}/{n}"
        chosen += mine[:per_share]
    return sorted(chosen)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def six(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small 20x SVS slides (1600 x 1280 px, one clear tissue island each: 3-5 patches) in one folder."""
    d = tmp_path_factory.mktemp("six")
    make_island_slides(d, IDS, seed=10)
    return d


def subset(six: Path, ids: list[str], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for sid in ids:
        os.symlink(six / f"{sid}.svs", dest / f"{sid}.svs")
    return dest


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dict of :data:`VIT_224` (random but fixed), so that the test can reproduce the features."""
    import torch

    from mstar_extract.models.registry import get_spec

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "vit_tiny.pth"
    torch.save(get_spec(VIT_224).build().state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------------ tests
def test_two_processes_on_one_out_each_slide_done_exactly_once(six: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    procs = [start(*extract_args(six, out, "--jsonl")) for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    parts = part_rows(out)
    assert len(parts) == 2, list(parts)  # one manifest part per process: nobody clobbers anybody
    seen: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for name, rows in parts.items():
        assert sorted(r["slide_id"] for r in rows) == IDS  # each process accounted for every slide once
        for r in rows:
            seen[r["slide_id"]].append((name, r["status"]))
    for sid in IDS:
        statuses = sorted(s for _, s in seen[sid])
        assert statuses == ["done", "skipped"], (sid, seen[sid])  # done once; the other process skipped it
        assert len({name for name, _ in seen[sid]}) == 2
    for stdout, _ in outputs:  # the JSONL of each process agrees with its part file
        events = jsonl(stdout)
        assert sorted(e["slide_id"] for e in finals(events)) == IDS
        assert events[-1]["event"] == "summary" and events[-1]["exit_code"] == 0
        assert events[-1]["counts"]["done"] + events[-1]["counts"]["skipped"] == 6
    assert {r["status"] for r in merged(out).values()} == {"done"} and len(merged(out)) == 6
    for sid in IDS:
        assert validate_bag(out / "features" / f"{sid}.h5", {"model": MODEL}) is None
    assert sorted(p.name for p in (out / "features").iterdir()) == [f"{s}.h5" for s in IDS]
    assert leftovers(out) == []


def test_lock_of_a_killed_process_is_taken_over(fixture_slides, tmp_path: Path) -> None:
    slide = fixture_slides["svs40"].path  # the largest fixture: its lock is held for a while
    out = tmp_path / "out"
    lock = out / ".locks" / "svs40.lock"
    victim = start(*extract_args(slide, out, "--model", VIT_224))
    holder = _wait_for_lock(victim, lock)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=60)
    assert holder["pid"] == victim.pid and holder["slide_id"] == "svs40" and holder["host"]
    assert lock.exists()  # SIGKILL: nothing could release it
    assert not (out / "features" / "svs40.h5").exists()

    r = run(*extract_args(slide, out, "--jsonl", "--model", VIT_224))
    assert r.returncode == 0, r.stderr[-3000:]
    takeover = [ln for ln in r.stderr.splitlines() if "taking over the lock of slide svs40" in ln]
    assert len(takeover) == 1 and f"pid {victim.pid}" in takeover[0] and "gone" in takeover[0], r.stderr
    final = finals(jsonl(r.stdout))
    assert [(e["slide_id"], e["status"]) for e in final] == [("svs40", "done")]
    assert validate_bag(out / "features" / "svs40.h5", {"n_patches": final[0]["n_patches"]}) is None
    assert merged(out)["svs40"]["status"] == "done"
    assert leftovers(out) == []


def _wait_for_lock(proc: subprocess.Popen, lock: Path) -> dict:
    """Poll until ``proc`` holds ``lock``; its JSON content."""
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, "the run ended before its lock was seen: " + proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        try:
            return json.loads(lock.read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.02)


def test_sigterm_releases_the_lock_and_the_summary_says_interrupted(fixture_slides, tmp_path: Path) -> None:
    slide = fixture_slides["svs40"].path
    out = tmp_path / "out"
    lock = out / ".locks" / "svs40.lock"
    proc = start(*extract_args(slide, out, "--jsonl", "--model", VIT_224))
    holder = _wait_for_lock(proc, lock)
    assert holder["pid"] == proc.pid
    proc.send_signal(signal.SIGTERM)  # what SLURM sends at the time limit or on scancel
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr and "mstar: error: terminated" in stderr
    events = jsonl(stdout)
    assert events[-1]["event"] == "summary" and events[-1]["interrupted"] is True
    assert events[-1]["exit_code"] == 128 + signal.SIGTERM
    assert not lock.exists()  # released: the next run need not wait for a takeover
    assert leftovers(out) == []
    assert not (out / "features" / "svs40.h5").exists()


def test_shards_with_tile_are_disjoint_and_complete_and_auto_follows_slurm(six: Path, tmp_path: Path) -> None:
    runs = {f"{i}/3": start("tile", str(six), str(tmp_path / f"shard{i}"), "--workers", "1", "--no-qc", "--jsonl",
                            "--shard", f"{i}/3") for i in range(3)}
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_MAX": "6",
             "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_JOB_ID": "77"}
    runs["auto"] = start("tile", str(six), str(tmp_path / "auto"), "--workers", "1", "--no-qc", "--jsonl",
                         "--shard", "auto", env=quiet_env(**slurm))
    shares: dict[str, set[str]] = {}
    for name, p in runs.items():
        stdout, stderr = p.communicate(timeout=900)
        assert p.returncode == 0, (name, stderr[-2000:])
        events = finals(jsonl(stdout))
        assert all(e["status"] in ("done", "no_tissue") for e in events), events
        shares[name] = {e["slide_id"] for e in events}
        assert len(events) == len(shares[name])
    plain = [shares[f"{i}/3"] for i in range(3)]
    for i in range(3):
        assert plain[i] == {s for s in IDS if share_of(s, 3, SHARD_SALT) == i}  # the documented hash rule
        for j in range(i + 1, 3):
            assert plain[i].isdisjoint(plain[j])
    assert set().union(*plain) == set(IDS)
    assert shares["auto"] == plain[1]  # task 5 of an array 4-6 is shard 1/3
    assert {p.stem for p in (tmp_path / "shard1" / "coords").glob("*.h5")} == plain[1]
    # an array whose task count must be derived from MIN/MAX/STEP: --array=0-4:2 has tasks 0, 2, 4
    stepped = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "4",
               "SLURM_ARRAY_TASK_STEP": "2"}
    r = run("tile", str(six), str(tmp_path / "stepped"), "--workers", "1", "--no-qc", "--jsonl", "--shard", "auto",
            env=quiet_env(**stepped))
    assert r.returncode == 0, r.stderr[-2000:]
    assert {e["slide_id"] for e in finals(jsonl(r.stdout))} == plain[2]
    outside = run("tile", str(six), str(tmp_path / "nope"), "--shard", "auto")
    assert outside.returncode == 2 and "SLURM_ARRAY_TASK_ID" in outside.stderr and "Traceback" not in outside.stderr


def _write_clam(path: Path, coords: np.ndarray, level: int, patch_size: int, level_dim: tuple[int, int],
                downsample: tuple[float, float], name: str) -> None:
    """A coordinates file as CLAM's create_patches_fp.py writes it (design §4), by hand."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("coords", data=coords.astype(np.int64), maxshape=(None, 2), chunks=(len(coords), 2))
        ds.attrs["patch_level"] = level
        ds.attrs["patch_size"] = patch_size
        ds.attrs["downsample"] = np.asarray(downsample, np.float64)
        ds.attrs["downsampled_level_dim"] = np.asarray(level_dim, np.int64)
        ds.attrs["level_dim"] = np.asarray(level_dim, np.int64)
        ds.attrs["name"] = name
        ds.attrs["save_path"] = str(path.parent)


def _write_trident(path: Path, coords: np.ndarray, patch_size: int, patch_size_level0: int, target_mag: float,
                   level0_mag: float, size: tuple[int, int], name: str) -> None:
    """A coordinates file as TRIDENT writes it (``<id>_patches.h5``), by hand."""
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("coords", data=coords.astype(np.int64))
        ds.attrs["patch_size"] = patch_size
        ds.attrs["patch_size_level0"] = patch_size_level0
        ds.attrs["target_magnification"] = target_mag
        ds.attrs["level0_magnification"] = level0_mag
        ds.attrs["level0_width"], ds.attrs["level0_height"] = size
        ds.attrs["overlap"] = 0
        ds.attrs["name"] = name
        ds.attrs["savetodir"] = str(path.parent)


def _on_tissue(fx, footprint: int, n: int, align: int = 1) -> np.ndarray:
    """``n`` level-0 corners (off any patch grid) whose ``footprint``-px square lies mostly on tissue (ground
    truth). Corners are multiples of ``align`` (the read level's downsample: a corner between two pixels of that
    level is interpolated by OpenSlide but not by other readers, which is not what this test is about)."""
    from mstar_extract.testing.fixtures import load_truth

    truth = load_truth(fx.truth_path)
    tissue = np.asarray(truth["tissue"], bool)
    k = float(truth["mpp"]) / float(truth["slide_mpp"])  # level-0 px per mask px
    side = int(np.ceil(footprint / k))
    picked: list[tuple[int, int]] = []
    for r in range(1, tissue.shape[0] - side, max(1, side // 2)):
        for c in range(1, tissue.shape[1] - side, max(1, side // 2)):
            far = all(abs(c * k - x) >= footprint // 2 or abs(r * k - y) >= footprint // 2 for x, y in picked)
            if far and tissue[r:r + side, c:c + side].mean() >= 0.6:
                picked.append(((int(c * k) + 37) // align * align, (int(r * k) + 11) // align * align))
    assert len(picked) >= n, "not enough tissue in the fixture"
    step = len(picked) // n
    return np.array(picked[::step][:n], dtype=np.int64)


def _reference(weights: Path, slide: Path, coords: np.ndarray, level: int, size: int) -> np.ndarray:
    """Features of patches read independently with OpenSlide at (level, size) and resized like the pipeline."""
    import openslide

    from mstar_extract.models import Encoder
    from mstar_extract.reading.resize import resize_patch

    enc = Encoder.create(VIT_224, str(weights), device="cpu", precision="fp32")
    with openslide.OpenSlide(str(slide)) as osr:
        patches = [resize_patch(np.asarray(osr.read_region((int(x), int(y)), level, (size, size)).convert("RGB")),
                                enc.input_size) for x, y in coords]
    return enc.embed(np.stack(patches)).cpu().numpy()


def test_clam_and_trident_coordinates_give_features_at_their_footprint(fixture_slides, weights_file: Path,
                                                                       tmp_path: Path) -> None:
    import openslide

    svs40, svs20 = fixture_slides["svs40"].path, fixture_slides["svs20"].path
    coords_dir = tmp_path / "other_tool"
    # CLAM on the 40x slide: 128 px at pyramid level 1 (downsample 4) = a 512 px level-0 footprint; odd positions
    clam_xy = _on_tissue(fixture_slides["svs40"], 512, 4, align=4)
    with openslide.OpenSlide(str(svs40)) as osr:
        w1, h1 = osr.level_dimensions[1]
        ds1 = (osr.dimensions[0] / w1, osr.dimensions[1] / h1)
    _write_clam(coords_dir / "patches" / "svs40.h5", clam_xy, 1, 128, (w1, h1), ds1, "svs40")
    # TRIDENT on the 20x slide: 10x patches of 128 px = 256 px at level 0
    tri_xy = _on_tissue(fixture_slides["svs20"], 256, 3)
    with openslide.OpenSlide(str(svs20)) as osr:
        size20 = osr.dimensions
    _write_trident(coords_dir / "svs20_patches.h5", tri_xy, 128, 256, 10.0, 20.0, size20, "svs20")

    out = tmp_path / "out"
    r = run("extract", str(svs40), str(svs20), str(out), "--model", VIT_224, "--weights", str(weights_file),
            "--device", "cpu", "--workers", "1", "--coords-dir", str(coords_dir), "--jsonl")
    assert r.returncode == 0, r.stderr[-3000:]
    assert {(e["slide_id"], e["status"]) for e in finals(jsonl(r.stdout))} == {("svs40", "done"), ("svs20", "done")}

    for sid, slide, xy, level, size, wrong, source, ps0 in (
        ("svs40", svs40, clam_xy, 1, 128, (0, 128), "clam", 512),
        ("svs20", svs20, tri_xy, 0, 256, (0, 512), "trident", 256),
    ):
        bag = read_bag(out / "features" / f"{sid}.h5")
        assert np.array_equal(bag.coords, xy)  # exactly those coordinates, in that order
        assert bag.attrs["coords_source"] == source
        assert bag.attrs["patch_size_level0"] == ps0 and bag.coords_attrs["patch_size_level0"] == ps0
        ref = _reference(weights_file, slide, xy, level, size)
        other = _reference(weights_file, slide, xy, *wrong)  # the same corners at another footprint
        err = np.abs(bag.features - ref).max(axis=1)
        err_other = np.abs(bag.features - other).max(axis=1)
        scale = np.abs(ref).max()
        assert (err < 0.02 * scale).all(), (sid, err, scale)
        assert (err_other > 0.03 * scale).all() and (err_other > 5 * err).all(), (sid, err, err_other, scale)
        assert not (out / "coords" / f"{sid}.h5").exists()  # given coordinates are used, not recomputed
    assert leftovers(out) == []


def test_devices_split_and_format_pt(six: Path, tmp_path: Path) -> None:
    """``--devices cpu,cpu``: two real device processes (fresh interpreters, as the product starts them), each with
    its share (one slide each, by the torchrun rule); ``--format pt`` writes a tensor equal to each bag."""
    import torch

    ids = pick(IDS, 2, 1, RANK_SALT)
    slides = subset(six, ids, tmp_path / "two")
    out = tmp_path / "out"
    r = run(*extract_args(slides, out, "--devices", "cpu,cpu", "--format", "pt", "--jsonl"))
    assert r.returncode == 0, r.stderr[-3000:]
    parts = part_rows(out)
    assert len(parts) == 2, list(parts)  # one part per device process
    shares = [{row["slide_id"] for row in rows} for rows in parts.values()]
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == set(ids)
    assert all(len(s) == 1 for s in shares)
    assert sorted(e["slide_id"] for e in finals(jsonl(r.stdout))) == ids
    assert {row["status"] for row in merged(out).values()} == {"done"}
    for sid in ids:
        t = torch.load(out / "pt_files" / f"{sid}.pt", weights_only=True)
        bag = read_bag(out / "features" / f"{sid}.h5")
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.ndim == 2
        assert tuple(t.shape) == bag.features.shape and t.shape[1] == 64 and t.shape[0] > 0
        assert np.array_equal(t.numpy(), bag.features)
    assert leftovers(out) == []


# ------------------------------------------------------------------------------------------------ torchrun
def _children_by_rank(parent: int, n: int) -> dict[int, int]:
    """``{RANK: pid}`` of the ``n`` worker processes that ``torchrun`` (pid ``parent``) started, read from
    ``/proc`` as soon as they exist (a worker is known once it has exec'ed with ``RANK`` in its environment)."""
    deadline = time.monotonic() + 300
    while True:
        found: dict[int, int] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != parent:
                    continue
                env = (stat.parent / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile, or not ours to read
            rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
            if rank is not None:
                found[rank] = int(stat.parent.name)
        if len(found) == n:
            return found
        assert time.monotonic() < deadline, f"torchrun did not start {n} ranks: {found}"
        time.sleep(0.01)


def _wait_gone(pid: int, proc: subprocess.Popen) -> None:
    """Until ``pid`` (a child of ``proc``) has ended and ``proc`` has reaped it (its ``/proc`` entry is gone)."""
    deadline = time.monotonic() + 600
    while Path(f"/proc/{pid}").exists():
        assert proc.poll() is None, "torchrun ended before its rank 0 did"
        assert time.monotonic() < deadline, f"rank 0 (pid {pid}) did not end"
        time.sleep(0.01)


def _torchrun_held(args: list[str], hold_rank: int) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc_per_node=2 -m mstar_extract ARGS`` (a real one: three fresh interpreters) with rank
    ``hold_rank`` stopped (SIGSTOP) from its start until the other rank has ended and torchrun has seen its exit
    code; then it goes on (SIGCONT). So the held rank is certainly still at work when the other one exits, as on a
    cluster where one rank's slides take longer, whatever the speed of this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *MODULE, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=quiet_env())
    held = None
    try:
        pids = _children_by_rank(proc.pid, 2)
        held = pids[hold_rank]
        os.kill(held, signal.SIGSTOP)
        _wait_gone(pids[1 - hold_rank], proc)
        os.kill(held, signal.SIGCONT)
        held = None
        stdout, stderr = proc.communicate(timeout=900)
    finally:
        if held is not None:  # the test failed while a rank was stopped: leave nothing behind
            os.kill(held, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


_RANK_LINE = (r"torchrun rank (\d)/2: (\d) slide\(s\) on cpu, (\d+) reader worker\(s\) \((\d+) CPUs shared by "
              r"(\d+) local rank\(s\)\)")


def test_torchrun_ranks_split_the_slides_share_the_cpus_and_survive_a_bad_slide(six: Path, tmp_path: Path) -> None:
    """One real ``torchrun --nproc_per_node=2`` job on the CPU over five slides: two good ones in each rank's share
    and an empty file in rank 0's. Rank 1 is held until rank 0 has ended (:func:`_torchrun_held`). It proves:

    * the split: each rank takes its share by the documented hash rule (``RANK_SALT``), one manifest part per rank,
      disjoint and together complete; both ranks' JSONL on one stdout (one object per line, one summary each);
    * reader workers per rank: without ``--workers`` each rank starts ``cpus // 2 - 1`` of them (at least 1), not
      a whole node's worth, and says how it counted (``LOCAL_WORLD_SIZE`` local ranks);
    * a bad slide on one rank does not stop the other. Before: rank 0 exited 1, torchrun sent SIGTERM to rank 1
      (exit 143, no bag). Now the failure is rank 0's manifest row and its exit code is 0; rank 1 finishes;
      ``mstar status`` reports the failure and exits 1; a single process (not torchrun) still exits 1 for it.
    """
    from mstar_extract.envdefaults import available_cpus

    good = pick(IDS, 2, 2, RANK_SALT)
    slides = subset(six, good, tmp_path / "slides")
    bad = next(f"bad{i}" for i in range(100) if share_of(f"bad{i}", 2, RANK_SALT) == 0)
    (slides / f"{bad}.svs").write_bytes(b"")
    ids = sorted([*good, bad])
    out = tmp_path / "out"
    r = _torchrun_held(["extract", str(slides), str(out), "--model", MODEL, "--weights", "random", "--device", "cpu",
                        *BATCH, "--no-report", "--jsonl"], hold_rank=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "exitcode" not in r.stderr and "Traceback" not in r.stderr  # torchrun saw no failed rank
    expected = [{s for s in ids if share_of(s, 2, RANK_SALT) == k} for k in range(2)]
    assert bad in expected[0] and len(expected[0]) == 3 and len(expected[1]) == 2
    # the split
    parts = part_rows(out)
    assert len(parts) == 2, list(parts)  # one part per rank
    shares = [{row["slide_id"] for row in rows} for rows in parts.values()]
    assert sorted(map(sorted, shares)) == sorted(map(sorted, expected))
    assert {row["slide_id"]: row["status"] for rows in parts.values() for row in rows} == {
        s: "failed" if s == bad else "done" for s in ids}
    events = jsonl(r.stdout)  # both ranks' JSONL, one object per line
    assert sorted(e["slide_id"] for e in finals(events)) == ids
    assert sum(1 for e in events if e["event"] == "started") == 5
    # reader workers per rank
    cpus = available_cpus({})
    per_rank = max(1, min(16, cpus // 2 - 1))
    ranks = re.findall(_RANK_LINE, r.stderr)
    assert sorted((int(k), int(n)) for k, n, *_ in ranks) == [(0, 3), (1, 2)], r.stderr[-3000:]
    assert all((int(w), int(c), int(n)) == (per_rank, cpus, 2) for _, _, w, c, n in ranks), ranks
    started = re.findall(r"on cpu, fp32, batch \d+, (\d+) reader worker\(s\)", r.stderr)  # what each rank used
    assert [int(w) for w in started] == [per_rank, per_rank], r.stderr[-3000:]
    # the bad slide on rank 0 did not stop rank 1
    assert f"{bad}.svs: empty file (0 bytes)" in r.stderr
    assert "exit 0 as a torchrun rank ('mstar status OUT' reports the failures, exit 1)" in r.stderr
    summaries = [e for e in events if e["event"] == "summary"]
    assert sorted(e["exit_code"] for e in summaries) == [0, 0]
    assert sorted((e["counts"]["done"], e["counts"]["failed"]) for e in summaries) == [(2, 0), (2, 1)]
    for sid in good:
        assert validate_bag(out / "features" / f"{sid}.h5", {"model": MODEL}) is None
    assert sorted(p.name for p in (out / "features").iterdir()) == [f"{s}.h5" for s in good]
    assert leftovers(out) == []
    status = run("status", str(out), "--jsonl")
    assert status.returncode == 1, status.stderr
    summary = jsonl(status.stdout)[-1]
    assert summary["counts"]["failed"] == 1 and summary["counts"]["done"] == 4 and summary["complete"] is False
    # one process (not torchrun): a failed slide still makes the exit code 1
    alone = run(*extract_args(slides / f"{bad}.svs", tmp_path / "alone", "--no-report"))
    assert alone.returncode == 1, alone.stderr[-2000:]
