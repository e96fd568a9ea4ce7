"""Sharding (--shard I/N, --shard auto), torchrun ranks and --devices: disjoint, complete, stable, deterministic."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mstar_extract.errors import UsageError
from mstar_extract.sharding import (
    RankInfo,
    device_share,
    distributed_share,
    parse_devices,
    parse_shard,
    rank_device,
    select_shard,
    share_of,
    slide_key,
    steal_order,
    torchrun_rank,
    work_share,
)

REPO = Path(__file__).resolve().parents[1]
SLIDES = [f"/data/cohort/TCGA-{i:04d}-01Z.svs" for i in range(300)]


@dataclass
class Entry:
    slide_id: str
    path: str


def test_shards_disjoint_and_complete() -> None:
    shares = [select_shard(SLIDES, i, 3) for i in range(3)]
    sets = [set(s) for s in shares]
    assert sets[0].isdisjoint(sets[1]) and sets[0].isdisjoint(sets[2]) and sets[1].isdisjoint(sets[2])
    assert sorted(sets[0] | sets[1] | sets[2]) == sorted(SLIDES)
    # original order is kept inside each share
    for s in shares:
        assert s == [x for x in SLIDES if x in set(s)]
    # balanced in expectation: with 300 slides each share is near 100 (binomial, sd ~8)
    assert all(60 < len(s) < 140 for s in shares)


def test_shard_one_of_one_is_everything() -> None:
    assert select_shard(SLIDES, 0, 1) == SLIDES


def test_stable_when_slides_are_added() -> None:
    before = {s: share_of(slide_key(s), 4) for s in SLIDES}
    grown = SLIDES + [f"/data/cohort/NEW-{i:03d}.svs" for i in range(100)]
    grown.sort()  # the new slides sort before the old ones: round-robin would move nearly everything
    after = {}
    for i in range(4):
        for s in select_shard(grown, i, 4):
            after[s] = i
    assert all(after[s] == before[s] for s in SLIDES)  # with the hash rule, every old slide stays put


def test_deterministic_across_processes() -> None:
    """Python's hash() is randomised per process; the rule must not be."""
    code = "from mstar_extract.sharding import share_of; print([share_of(f's{i}', 7) for i in range(50)])"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    assert outs.pop().strip() == str([share_of(f"s{i}", 7) for i in range(50)])


def test_slide_key_sources() -> None:
    assert slide_key(Entry("abc", "/x/other.svs")) == "abc"
    assert slide_key({"slide_id": "d1", "path": "/x"}) == "d1"
    assert slide_key(Path("/a/b/slide 1.svs")) == "slide 1.svs"
    entries = [Entry(f"id{i}", f"/p/{i}.svs") for i in range(50)]
    by_entry = {e.slide_id for e in select_shard(entries, 1, 2)}
    assert by_entry == {f"id{i}" for i in range(50) if share_of(f"id{i}", 2) == 1}


@pytest.mark.parametrize("spec,expected", [(None, None), ("", None), ("0/3", (0, 3)), ("2/3", (2, 3)), (" 0/1 ", (0, 1))])
def test_parse_shard_plain(spec: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_shard(spec, env={}) == expected


@pytest.mark.parametrize("bad", ["3/3", "-1/3", "1/0", "a/b", "1", "1/2/3", "autox"])
def test_parse_shard_rejects(bad: str) -> None:
    with pytest.raises(UsageError, match="--shard"):
        parse_shard(bad, env={})


def test_parse_shard_auto_follows_slurm() -> None:
    # --array=0-9
    env = {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "10", "SLURM_ARRAY_TASK_MIN": "0",
           "SLURM_ARRAY_TASK_MAX": "9"}
    assert parse_shard("auto", env) == (4, 10)
    # --array=1-10: the task ids start at 1, shards at 0
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "10", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_MAX": "10"}
    assert parse_shard("auto", env) == (0, 10)
    env["SLURM_ARRAY_TASK_ID"] = "10"
    assert parse_shard("AUTO", env) == (9, 10)
    # no COUNT: derived from MIN/MAX
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_MAX": "8"}
    assert parse_shard("auto", env) == (2, 4)
    # a step: --array=0-18:2
    env = {"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "18",
           "SLURM_ARRAY_TASK_STEP": "2"}
    assert parse_shard("auto", env) == (3, 10)
    # every task of an array gets a different shard, covering 0..N-1
    got = {parse_shard("auto", {"SLURM_ARRAY_TASK_ID": str(t), "SLURM_ARRAY_TASK_COUNT": "5",
                                "SLURM_ARRAY_TASK_MIN": "1"}) for t in range(1, 6)}
    assert got == {(i, 5) for i in range(5)}


def test_parse_shard_auto_outside_array_is_clear() -> None:
    with pytest.raises(UsageError, match="SLURM_ARRAY_TASK_ID is not set"):
        parse_shard("auto", env={"SLURM_JOB_ID": "123"})
    with pytest.raises(UsageError, match="not an integer"):
        parse_shard("auto", env={"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"})
    # an irregular list (--array=1,5,9): id 9 does not map into 3 tasks
    with pytest.raises(UsageError, match="plain range"):
        parse_shard("auto", env={"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "3",
                                 "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "9"})


def test_torchrun_env_and_device() -> None:
    assert torchrun_rank({}) is None
    info = torchrun_rank({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert info == RankInfo(rank=3, world_size=4, local_rank=1)
    assert info.cuda_device == "cuda:1"
    assert rank_device("auto", info, cuda_available=True) == "cuda:1"
    assert rank_device("auto", info, cuda_available=False) == "cpu"
    assert rank_device("cpu", info, cuda_available=True) == "cpu"
    with pytest.raises(UsageError):
        torchrun_rank({"RANK": "4", "WORLD_SIZE": "4"})


def test_distributed_share_splits_without_overlap() -> None:
    shares = [distributed_share(SLIDES, {"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)}) for r in range(2)]
    assert set(shares[0]).isdisjoint(shares[1]) and sorted(shares[0] + shares[1]) == sorted(SLIDES)
    assert distributed_share(SLIDES, {}) == SLIDES


def test_shard_then_rank_composition() -> None:
    """Shard first, then rank; the two levels are independent (no rank is left empty by correlation)."""
    pieces = []
    for shard in range(2):
        for rank in range(2):
            env = {"RANK": str(rank), "WORLD_SIZE": "2"}
            part = work_share(SLIDES, (shard, 2), env)
            assert len(part) > 30  # without a separate salt, one rank of each shard would get nothing
            assert set(part) <= set(select_shard(SLIDES, shard, 2))
            pieces.append(part)
    flat = [s for p in pieces for s in p]
    assert len(flat) == len(set(flat)) == len(SLIDES)


def test_devices_parse_and_split() -> None:
    assert parse_devices("0,1,2,3") == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert parse_devices("cuda:2, 3") == ["cuda:2", "cuda:3"]
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert parse_devices(None) is None
    for bad in ("0,0", "gpu1", "0;1"):
        with pytest.raises(UsageError, match="--devices"):
            parse_devices(bad)
    split = device_share(SLIDES, ["cuda:0", "cuda:1"])
    assert [d for d, _ in split] == ["cuda:0", "cuda:1"]
    # identical to two torchrun ranks
    for r, (_, part) in enumerate(split):
        assert part == distributed_share(SLIDES, {"RANK": str(r), "WORLD_SIZE": "2"})


def test_steal_order_own_share_first_then_others_from_the_end() -> None:
    order = steal_order(SLIDES, 1, 3)
    assert sorted(order) == sorted(SLIDES)
    own = select_shard(SLIDES, 1, 3, salt="rank")
    assert order[: len(own)] == own
    nxt = select_shard(SLIDES, 2, 3, salt="rank")
    assert order[len(own): len(own) + len(nxt)] == list(reversed(nxt))


@pytest.mark.parametrize("script", ["extract_array.sbatch", "extract_node_multigpu.sbatch", "resubmit.sh"])
def test_slurm_examples_are_valid_bash(script: str) -> None:
    path = REPO / "examples" / "slurm" / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "mstar" in text and ("#SBATCH" in text or "sbatch" in text)
    if script == "extract_array.sbatch":
        assert "--shard auto" in text


@pytest.mark.slow
def test_real_torchrun_two_ranks_split_four_slides(tmp_path: Path) -> None:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; each rank takes its share: no overlap, nothing lost."""
    torchrun = Path(sys.executable).with_name("torchrun")
    script = tmp_path / "share.py"
    script.write_text(
        "import json, os, sys\n"
        "from mstar_extract.sharding import distributed_share, torchrun_rank\n"
        "slides = ['s1.svs', 's2.svs', 's3.svs', 's4.svs']\n"
        "info = torchrun_rank()\n"
        "out = {'rank': info.rank, 'world': info.world_size, 'device': info.cuda_device,\n"
        "       'share': distributed_share(slides)}\n"
        "open(os.path.join(sys.argv[1], f'rank{info.rank}.json'), 'w').write(json.dumps(out))\n"
    )
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(script), str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["world"] for g in got] == [2, 2] and [g["device"] for g in got] == ["cuda:0", "cuda:1"]
    shares = [set(g["share"]) for g in got]
    assert shares[0].isdisjoint(shares[1]) and shares[0] | shares[1] == {"s1.svs", "s2.svs", "s3.svs", "s4.svs"}
