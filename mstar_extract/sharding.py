"""Splitting a slide list between jobs, ranks and GPUs (docs/scale-out.md, issue 5).

Three levels can split the same list, always in this order (see docs/scale-out.md):

1. ``--shard I/N`` (or ``--shard auto`` inside a SLURM job array): the job's share of the whole list;
2. ``torchrun`` ranks (``RANK``/``WORLD_SIZE``) **or** ``--devices 0,1,...`` worker processes: the share of
   this process within the job's shard.

**The rule** (both levels): a slide belongs to share ``i`` of ``n`` when
``int.from_bytes(sha256(salt + "\\0" + slide_id)[:8], "big") % n == i``, where the salt is ``""`` for shards
and ``"rank"`` for ranks/devices (a different salt makes the two levels independent: without it, shard 0/2
followed by rank split 2 would hand every slide of the shard to rank 0).

Why a hash of the slide id and not round-robin over the sorted list:

* *stable*: a slide's share depends on its own id and ``n`` only — adding or removing other slides never
  moves it, so re-running an array on a grown folder keeps every old slide where it was, and two processes
  that listed the folder a moment apart (while slides were being copied in) still agree on every slide that
  both saw. With round-robin one new slide early in the sort order shifts every later slide.
* *deterministic everywhere*: ``hashlib`` is the same on every machine and Python version (Python's own
  ``hash()`` of a string is randomised per process and must never be used for this).
* *trade-off*: shares are balanced in expectation, not exactly: share sizes follow a binomial distribution,
  about ``n_slides/N ± sqrt(n_slides/N)`` (1,000 slides in 10 shards: 100 ± 10). Slides differ far more in
  size than that, so exact count balance would not balance run time anyway. For dynamic balance use the
  per-slide locks: :func:`steal_order` lets a worker that finished its own share help with the others'.

Inputs are any sequence of slide entries; the slide id is taken from ``entry.slide_id``, ``entry["slide_id"]``,
or (for plain paths/strings) the file name. Every function keeps the entries' original order.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, TypeVar

from mstar_extract.errors import UsageError

T = TypeVar("T")

SHARD_SALT = ""
RANK_SALT = "rank"


# ----------------------------------------------------------------------------------------------------- ids & hash
def slide_key(entry: object) -> str:
    """The id used to place ``entry``: ``.slide_id``, ``["slide_id"]``, else the file name of a path/string."""
    sid = getattr(entry, "slide_id", None)
    if sid is None and isinstance(entry, Mapping):
        sid = entry.get("slide_id")
    if sid is None:
        if isinstance(entry, (str, os.PathLike)):
            sid = PurePath(os.fspath(entry)).name
        else:
            raise TypeError(f"cannot find a slide id in {entry!r}; pass key=")
    return str(sid)


def share_of(slide_id: str, count: int, salt: str = SHARD_SALT) -> int:
    """Index in ``[0, count)`` of the share that ``slide_id`` belongs to (the documented stable hash rule)."""
    if count < 1:
        raise ValueError("count must be >= 1")
    digest = hashlib.sha256(f"{salt}\0{slide_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % count


def select_shard(
    entries: Sequence[T], index: int, count: int, *, key: Callable[[Any], str] | None = None, salt: str = SHARD_SALT
) -> list[T]:
    """The entries of share ``index`` of ``count`` (original order kept). Shares are disjoint, their union is all."""
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"shard {index}/{count}: need 0 <= I < N")
    key = key or slide_key
    if count == 1:
        return list(entries)
    return [e for e in entries if share_of(key(e), count, salt) == index]


# ------------------------------------------------------------------------------------------------------- --shard
def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw in (None, ""):
        return None
    try:
        return int(str(raw).strip())
    except ValueError:
        raise UsageError(f"--shard auto: {name}={raw!r} is not an integer") from None


def parse_shard(spec: str | None, env: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """Parse ``--shard``: ``None``/``""`` → no sharding; ``"I/N"`` with ``0 <= I < N``; ``"auto"`` → SLURM array.

    ``auto`` uses ``SLURM_ARRAY_TASK_ID`` and ``SLURM_ARRAY_TASK_COUNT`` (or, when that is missing,
    ``(SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN) / STEP + 1``), with
    ``I = (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN) / SLURM_ARRAY_TASK_STEP``, so ``--array=1-10`` and
    ``--array=0-18:2`` both give shards ``0/10 … 9/10``. Arrays given as irregular lists (``--array=1,5,9``)
    cannot be mapped and are refused. Raises :class:`UsageError` with one clear line on any problem.
    """
    if spec is None:
        return None
    text = str(spec).strip()
    if text == "":
        return None
    if text.lower() == "auto":
        task_id = _env_int(env, "SLURM_ARRAY_TASK_ID")
        if task_id is None:
            raise UsageError(
                "--shard auto: SLURM_ARRAY_TASK_ID is not set (not inside a SLURM job array); "
                "submit with 'sbatch --array=0-N' or give --shard I/N"
            )
        lo = _env_int(env, "SLURM_ARRAY_TASK_MIN") or 0
        hi = _env_int(env, "SLURM_ARRAY_TASK_MAX")
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") or 1
        count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        if count is None:
            if hi is None:
                raise UsageError("--shard auto: neither SLURM_ARRAY_TASK_COUNT nor SLURM_ARRAY_TASK_MAX is set")
            count = (hi - lo) // max(step, 1) + 1
        offset = task_id - lo
        if step < 1 or offset < 0 or offset % step:
            raise UsageError(
                f"--shard auto: task id {task_id} does not fit the array (min {lo}, step {step}); "
                "use a plain range such as --array=0-9"
            )
        index = offset // step
        if count < 1 or index >= count:
            raise UsageError(
                f"--shard auto: task id {task_id} gives shard {index} but the array has {count} tasks; "
                "use a plain range such as --array=0-9 (not a list of ids)"
            )
        return index, count
    parts = text.split("/")
    if len(parts) != 2:
        raise UsageError(f"--shard {text!r}: expected I/N (e.g. 0/4) or 'auto'")
    try:
        index, count = int(parts[0]), int(parts[1])
    except ValueError:
        raise UsageError(f"--shard {text!r}: I and N must be integers (e.g. 0/4)") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text!r}: need 0 <= I < N (shards are numbered from 0)")
    return index, count


# ------------------------------------------------------------------------------------------------------ torchrun
@dataclass(frozen=True)
class RankInfo:
    """This process's place in a ``torchrun`` job."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def cuda_device(self) -> str:
        """The GPU this rank should use: ``cuda:LOCAL_RANK``."""
        return f"cuda:{self.local_rank}"


def torchrun_rank(env: Mapping[str, str] = os.environ) -> RankInfo | None:
    """``RankInfo`` from ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun), or ``None`` when not under it."""
    world = env.get("WORLD_SIZE")
    rank = env.get("RANK")
    if world in (None, "") or rank in (None, ""):
        return None
    try:
        w, r = int(world), int(rank)
        local = int(env.get("LOCAL_RANK") or r)
    except ValueError:
        raise UsageError(f"bad torchrun environment: RANK={rank!r} WORLD_SIZE={world!r}") from None
    if w < 1 or not 0 <= r < w or local < 0:
        raise UsageError(f"bad torchrun environment: RANK={r} WORLD_SIZE={w} LOCAL_RANK={local}")
    return RankInfo(rank=r, world_size=w, local_rank=local)


def rank_device(requested: str, info: RankInfo, cuda_available: bool) -> str:
    """Device of a torchrun rank: ``auto``/``cuda`` → ``cuda:LOCAL_RANK`` (``cpu`` without CUDA); explicit wins."""
    if requested in ("auto", "cuda"):
        return info.cuda_device if cuda_available else "cpu"
    return requested


def distributed_share(
    entries: Sequence[T], env: Mapping[str, str] = os.environ, *, key: Callable[[Any], str] | None = None
) -> list[T]:
    """This torchrun rank's share of ``entries`` (all of them when not under torchrun)."""
    info = torchrun_rank(env)
    if info is None or info.world_size == 1:
        return list(entries)
    return select_shard(entries, info.rank, info.world_size, key=key, salt=RANK_SALT)


# ------------------------------------------------------------------------------------------------------- devices
def parse_devices(spec: str | None) -> list[str] | None:
    """Parse ``--devices``: ``"0,1,2,3"`` or ``"cuda:0,cuda:1"`` → ``["cuda:0", ...]``; ``"cpu,cpu"`` is allowed
    (several CPU workers, for testing). ``None``/``""`` → ``None`` (one process, ``--device`` decides)."""
    if spec is None or str(spec).strip() == "":
        return None
    out: list[str] = []
    for raw in str(spec).split(","):
        tok = raw.strip().lower()
        if tok.isdigit():
            dev = f"cuda:{int(tok)}"
        elif tok.startswith("cuda:") and tok[5:].isdigit():
            dev = f"cuda:{int(tok[5:])}"
        elif tok == "cpu":
            dev = "cpu"
        else:
            raise UsageError(f"--devices {spec!r}: {raw.strip()!r} is not a GPU index (e.g. --devices 0,1,2,3)")
        if dev != "cpu" and dev in out:
            raise UsageError(f"--devices {spec!r}: {dev} is listed twice")
        out.append(dev)
    return out


def device_share(
    entries: Sequence[T], devices: Sequence[str], *, key: Callable[[Any], str] | None = None
) -> list[tuple[str, list[T]]]:
    """Split ``entries`` between ``devices`` (one worker process each): ``[(device, its entries), ...]``.

    Same rule and salt as torchrun ranks, so ``--devices 0,1`` and ``torchrun --nproc_per_node=2`` split a list
    identically.
    """
    if not devices:
        raise UsageError("--devices: no device given")
    n = len(devices)
    return [(dev, select_shard(entries, i, n, key=key, salt=RANK_SALT)) for i, dev in enumerate(devices)]


# --------------------------------------------------------------------------------------------------- composition
def work_share(
    entries: Sequence[T],
    shard: tuple[int, int] | None,
    env: Mapping[str, str] = os.environ,
    *,
    key: Callable[[Any], str] | None = None,
) -> list[T]:
    """This process's work: the ``--shard`` share first, then this torchrun rank's part of it."""
    picked = list(entries) if shard is None else select_shard(entries, shard[0], shard[1], key=key)
    return distributed_share(picked, env, key=key)


def steal_order(
    entries: Sequence[T], index: int, count: int, *, key: Callable[[Any], str] | None = None, salt: str = RANK_SALT
) -> list[T]:
    """All ``entries``, ordered for worker ``index`` of ``count`` that may help the others (work stealing).

    Its own share comes first (in order), then each other worker's share, starting with the next worker and
    taken from the *end* of that share (the owner works from the front, so the two rarely meet). Used with the
    per-slide locks (:mod:`mstar_extract.locks`), which make each slide run exactly once: a worker that finishes
    early takes slides that the slower workers have not started yet.
    """
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"worker {index}/{count}: need 0 <= I < N")
    key = key or slide_key
    shares: list[list[T]] = [[] for _ in range(count)]
    for e in entries:
        shares[share_of(key(e), count, salt)].append(e)
    order = list(shares[index])
    for k in range(1, count):
        order.extend(reversed(shares[(index + k) % count]))
    return order
