"""Environment-variable defaults of the command line (issue 8 item 4). A command-line option always wins.

===================== ================================ ==================================================
Variable              Option it sets the default of    Default when neither is given
===================== ================================ ==================================================
``MSTAR_WEIGHTS``     ``--weights`` (PATH, ``hf``)      ``hf`` (the gated Hugging Face repo, via the cache)
``MSTAR_CACHE``       where weights are downloaded     ``weights/`` of the checkout when mstar runs from a
                                                       git checkout that has ``weights/registry.json``,
                                                       else the Hugging Face hub cache
``MSTAR_DEVICE``      ``--device``                      ``auto`` (CUDA if available, else CPU)
``MSTAR_WORKERS``     ``--workers`` (reader processes)  CPUs available to this job (affinity / SLURM),
                                                       divided between the extraction processes of the
                                                       node (``--devices`` processes x torchrun's
                                                       ``LOCAL_WORLD_SIZE`` ranks), minus one for the
                                                       GPU feeder, at most 16, at least 1
``MSTAR_LOCK_TIMEOUT`` ``--lock-timeout`` (seconds)     600 (see :mod:`mstar_extract.locks`)
===================== ================================ ==================================================

An empty variable counts as unset. A malformed value is a usage error naming the variable (exit 2).
Each ``default_*`` function takes the option's value (``None`` when the user did not give it) and returns what
to use, so the command bodies call e.g. ``workers = default_workers(workers)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mstar_extract.errors import UsageError

ENV_WEIGHTS = "MSTAR_WEIGHTS"
ENV_CACHE = "MSTAR_CACHE"
ENV_DEVICE = "MSTAR_DEVICE"
ENV_WORKERS = "MSTAR_WORKERS"
ENV_LOCK_TIMEOUT = "MSTAR_LOCK_TIMEOUT"

MAX_DEFAULT_WORKERS = 16
DEFAULT_LOCK_TIMEOUT_S = 600.0
"""Default ``--lock-timeout`` (also used by :mod:`mstar_extract.locks`): heartbeats refresh a lock every 30 s."""

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or str(value).strip() == "":
        return None
    return str(value).strip()


# ---------------------------------------------------------------------------------------------------- weights
def default_weights(option: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    """``--weights`` value: the option, else ``$MSTAR_WEIGHTS``, else ``"hf"``. Paths get ``~`` expanded."""
    value = option if option not in (None, "") else _get(env, ENV_WEIGHTS)
    if value is None:
        return "hf"
    if value in ("hf", "random"):
        return value
    return os.path.expanduser(value)


# ------------------------------------------------------------------------------------------------------ cache
@dataclass(frozen=True)
class WeightsCache:
    """Where weights are cached, and why: ``source`` is ``"env"``, ``"checkout"`` or ``"hf"``."""

    path: Path
    source: str


def checkout_root(package_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The repository checkout that this package runs from, or ``None`` (an installed wheel).

    It is the package folder's parent when that folder is a git checkout (has ``.git``, a folder or a worktree
    file) and holds ``weights/registry.json``.
    """
    pkg = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    root = pkg.parent
    if (root / ".git").exists() and (root / "weights" / "registry.json").is_file():
        return root
    return None


def hf_hub_cache(env: Mapping[str, str] = os.environ) -> Path:
    """The Hugging Face hub cache folder, by huggingface_hub's own rule (HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME)."""
    explicit = _get(env, "HF_HUB_CACHE") or _get(env, "HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expanduser(explicit))
    home = _get(env, "HF_HOME")
    if home:
        return Path(os.path.expanduser(home)) / "hub"
    xdg = _get(env, "XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.path.expanduser(xdg)) / "huggingface" / "hub"


def weights_cache(env: Mapping[str, str] = os.environ, package_dir: str | os.PathLike[str] | None = None) -> WeightsCache:
    """The weights cache: ``$MSTAR_CACHE``, else the checkout's ``weights/``, else the Hugging Face hub cache."""
    value = _get(env, ENV_CACHE)
    if value is not None:
        return WeightsCache(Path(os.path.expanduser(value)), "env")
    root = checkout_root(package_dir)
    if root is not None:
        return WeightsCache(root / "weights", "checkout")
    return WeightsCache(hf_hub_cache(env), "hf")


# ----------------------------------------------------------------------------------------------------- device
def default_device(option: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    """``--device`` value: the option, else ``$MSTAR_DEVICE``, else ``"auto"``; checked for shape only."""
    if option not in (None, ""):
        value, source = str(option).strip().lower(), "--device"
    else:
        raw = _get(env, ENV_DEVICE)
        if raw is None:
            return "auto"
        value, source = raw.lower(), ENV_DEVICE
    if not _DEVICE_RE.match(value):
        raise UsageError(f"{source}={value!r}: expected auto, cpu, cuda or cuda:N")
    return value


# ---------------------------------------------------------------------------------------------------- workers
def available_cpus(env: Mapping[str, str] = os.environ) -> int:
    """CPUs this process may use: its affinity mask (set by SLURM/cgroups), capped by ``SLURM_CPUS_PER_TASK``."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    slurm = _get(env, "SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit() and int(slurm) > 0:
        n = min(n, int(slurm))
    return max(1, n)


def local_ranks(env: Mapping[str, str] = os.environ) -> int:
    """Processes of this torchrun job on this node (``LOCAL_WORLD_SIZE``, set by torchrun); 1 when not under it."""
    raw = _get(env, "LOCAL_WORLD_SIZE")
    if raw is None or _get(env, "WORLD_SIZE") is None:
        return 1
    try:
        return max(1, int(raw))
    except ValueError:
        raise UsageError(f"bad torchrun environment: LOCAL_WORLD_SIZE={raw!r} is not an integer") from None


def node_processes(n_procs: int = 1, env: Mapping[str, str] = os.environ) -> int:
    """Extraction processes sharing this node's CPUs: ``n_procs`` (``--devices``) x torchrun's local ranks."""
    return max(1, int(n_procs)) * local_ranks(env)


def default_workers(option: int | None = None, env: Mapping[str, str] = os.environ, n_procs: int = 1,
                    cpus: int | None = None) -> int:
    """Reader worker processes per extraction process: the option, else ``$MSTAR_WORKERS``, else a CPU rule.

    The rule: ``min(16, cpus // procs - 1)``, at least 1, where ``cpus`` is :func:`available_cpus` and ``procs``
    is :func:`node_processes`: the extraction processes sharing this node's CPUs (``n_procs`` ``--devices``
    processes, times ``LOCAL_WORLD_SIZE`` under torchrun, whose ranks all inherit the same CPUs). ``0`` (option or
    variable) means reading in the main process.
    """
    if option is not None:
        if int(option) < 0:
            raise UsageError(f"--workers {option}: must be >= 0")
        return int(option)
    raw = _get(env, ENV_WORKERS)
    if raw is not None:
        try:
            value = int(raw)
        except ValueError:
            raise UsageError(f"{ENV_WORKERS}={raw!r} is not an integer") from None
        if value < 0:
            raise UsageError(f"{ENV_WORKERS}={raw!r}: must be >= 0")
        return value
    per_proc = (available_cpus(env) if cpus is None else int(cpus)) // node_processes(n_procs, env)
    return max(1, min(MAX_DEFAULT_WORKERS, per_proc - 1))


# ----------------------------------------------------------------------------------------------- lock timeout
def default_lock_timeout(option: float | None = None, env: Mapping[str, str] = os.environ) -> float:
    """``--lock-timeout`` seconds: the option, else ``$MSTAR_LOCK_TIMEOUT``, else 600. ``0`` = never by age."""
    if option is not None:
        value, source = float(option), "--lock-timeout"
    else:
        raw = _get(env, ENV_LOCK_TIMEOUT)
        if raw is None:
            return DEFAULT_LOCK_TIMEOUT_S
        try:
            value, source = float(raw), ENV_LOCK_TIMEOUT
        except ValueError:
            raise UsageError(f"{ENV_LOCK_TIMEOUT}={raw!r} is not a number of seconds") from None
    if value < 0 or value != value:
        raise UsageError(f"{source}={value}: must be >= 0 seconds")
    return value
