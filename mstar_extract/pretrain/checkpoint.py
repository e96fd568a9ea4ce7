"""Atomic training checkpoints and ``--resume`` resolution (shared by both stages).

A checkpoint ``<run>/checkpoints/step_00000420.pt`` holds: ``model`` (state dict of the unwrapped model),
``optimizer``, ``scheduler``, ``scaler``, ``step``, ``epoch``, ``batch_in_epoch`` (batches of that epoch
already done), ``rng`` (one entry per rank: python, numpy, torch CPU and CUDA generator states), ``config``
(the resolved config dict) and ``extra`` (anything the stage adds). It is written by rank 0 through
:func:`mstar_extract.store.atomic.atomic_path`, so a killed run never leaves a half-written checkpoint.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mstar_extract.errors import MstarError, UsageError
from mstar_extract.store.atomic import atomic_path

_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the run's checkpoints, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """``None`` → start fresh; ``auto`` → latest checkpoint of the run (or fresh if none); else that file."""
    if resume is None or resume == "":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    p = Path(resume)
    if not p.is_file():
        raise UsageError(f"{p}: checkpoint to resume from not found")
    return p


def rng_state() -> dict[str, Any]:
    """Random states of python, numpy, torch (CPU) and every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded with map_location=cuda moves these too
    if "cuda" in state and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (call on rank 0 only)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (keep <= 0: keep all)."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(run_dir)[:-keep]:
        p.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint; a damaged file is one clear error."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
        raise MstarError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise MstarError(f"{path}: not a mstar training checkpoint")
    return state
