"""Atomic training checkpoints, ``--resume`` resolution, and the one safe way to read a pretraining file.

A checkpoint ``<run>/checkpoints/step_00000420.pt`` holds: ``model`` (state dict of the unwrapped model),
``optimizer``, ``scheduler``, ``scaler``, ``step``, ``epoch``, ``batch_in_epoch`` (batches of that epoch
already done), ``rng`` (one entry per rank: python, numpy, torch CPU and CUDA generator states), ``config``
(the resolved config dict) and ``extra`` (anything the stage adds). It is written by rank 0 through
:func:`mstar_extract.store.atomic.atomic_path`, so a killed run never leaves a half-written checkpoint.

Every file this package reads back (checkpoints, the stage-1 teacher file) goes through :func:`load_torch_file`,
which calls ``torch.load(weights_only=True)``: tensors, dicts, lists, tuples, strings and numbers only, never
code. Everything we save is therefore in those forms — the random states included (:func:`rng_state` turns
numpy's state array into a list of ints). A file holding anything else (a crafted pickle whose ``__reduce__``
would run code) is refused with one line naming the file; nothing in it is executed.
"""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mstar_extract.errors import MstarError, UsageError, first_line
from mstar_extract.store.atomic import atomic_path

_NAME = re.compile(r"^step_(\d+)\.pt$")
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


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


# ------------------------------------------------------------------------------------------- random states


def rng_state() -> dict[str, Any]:
    """Random states of python, numpy, torch (CPU) and every CUDA device, in ``weights_only``-loadable forms."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": [int(v) for v in np_state["state"]["key"]],
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` recorded."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], np.asarray(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded with map_location=cuda moves these too
    if "cuda" in state and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------------------- files


def load_torch_file(path: str | Path, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; any failure is one :class:`MstarError` line naming ``path``.

    ``what`` names the file's role in the message ("checkpoint", "teacher file"). A file that needs more than
    tensors and plain data to unpickle is refused without running any of it.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        detail = f"it references {found.group(1)}" if found else "it holds objects other than tensors and plain data"
        raise MstarError(f"{path}: refused to load this {what}: {detail}, which no file written by mstar contains "
                         "(not an mstar file, or tampered with); nothing in it was run") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged files
        raise MstarError(f"{path}: cannot read {what} ({first_line(exc, with_type=True)})") from None


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
    """Read a checkpoint (tensors and plain data only, see :func:`load_torch_file`); a bad file is one error line."""
    state = load_torch_file(path, "checkpoint", map_location)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise MstarError(f"{path}: not a mstar training checkpoint")
    return state
