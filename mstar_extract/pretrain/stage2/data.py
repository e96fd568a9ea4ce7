"""Stage-2 data: the manifest, the deterministic per-epoch patch schedule, and the batch dataset.

Schedule (:func:`epoch_units`): every epoch, each slide's patches (all, or a fresh random subset of
``patches_per_slide``) are shuffled and cut into *units* of ``unit = batch_size // slides_per_batch`` patches
(the last unit of a slide is filled up by wrapping around its shuffled list); all units of all slides are
shuffled together and dealt to ranks round-robin; batch ``b`` of a rank is its units ``b·m … b·m+m−1`` with
``m = slides_per_batch``. Every rank gets the same number of batches, and the schedule depends only on
(seed, epoch), so a resumed run skips exactly the batches it already trained on.

:class:`Stage2Batches` is a map-style dataset of those batches: item ``b`` reads the ``m`` units' patches from
their WSIs with the project's reader (in DataLoader worker processes; each worker keeps an LRU of open
slides) and their targets from the targets files, and returns ``pixels`` uint8 (B, S, S, 3) — the same
model-ready patches as extraction — and ``targets`` float32 (B, T).
"""

from __future__ import annotations

import csv
import math
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mstar_extract.errors import MstarError, UsageError, first_line
from mstar_extract.pretrain.stage2.teacher import SlideEntry, read_targets, targets_path

# ----------------------------------------------------------------------------------------------- manifest


def read_stage2_manifest(path: str | os.PathLike[str]) -> list[SlideEntry]:
    """Read the stage-2 manifest (columns ``slide_id``, ``slide``, ``features``; CSV or TSV).

    Relative paths are relative to the manifest's folder. Missing files, duplicate ids and empty cells are a
    :class:`UsageError` naming the line, before any work.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: manifest not found")
    lines = p.read_text(encoding="utf-8-sig").splitlines()
    if not lines:
        raise UsageError(f"{p}: manifest is empty")
    delim = "\t" if p.suffix.lower() in (".tsv", ".tab") or lines[0].count("\t") > lines[0].count(",") else ","
    reader = csv.DictReader(lines, delimiter=delim)
    cols = [c.strip() for c in (reader.fieldnames or [])]
    for need in ("slide_id", "slide", "features"):
        if need not in cols:
            raise UsageError(f"{p}: stage-2 manifest needs a '{need}' column (has: {', '.join(cols)})")
    entries: list[SlideEntry] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(reader, 2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        sid = row["slide_id"]
        if not sid:
            raise UsageError(f"{p}: line {lineno}: empty slide_id")
        if sid in seen:
            raise UsageError(f"{p}: line {lineno}: slide_id '{sid}' appears twice")
        seen.add(sid)
        files = {}
        for col in ("slide", "features"):
            if not row[col]:
                raise UsageError(f"{p}: line {lineno}: empty '{col}' for slide '{sid}'")
            f = Path(row[col]).expanduser()
            f = f if f.is_absolute() else p.parent / f
            if not f.is_file():
                what = "whole-slide image" if col == "slide" else "feature bag"
                raise UsageError(f"{f}: {what} of slide '{sid}' not found")
            files[col] = f
        entries.append(SlideEntry(sid, files["slide"], files["features"]))
    if not entries:
        raise UsageError(f"{p}: manifest has no rows")
    return entries


# ----------------------------------------------------------------------------------------------- schedule


@dataclass(frozen=True)
class Unit:
    """``rows`` (plan rows of one slide) read together."""

    slide: int
    rows: np.ndarray


def epoch_units(n_patches: Sequence[int], unit: int, seed: int, epoch: int,
                patches_per_slide: int | None = None) -> list[Unit]:
    """All units of one epoch, in global (shuffled) order; deterministic in (seed, epoch)."""
    if unit < 1:
        raise UsageError("train.batch_size must be >= data.slides_per_batch")
    rng = np.random.default_rng([int(seed), int(epoch), 0x5EED2])
    units: list[Unit] = []
    for s, n in enumerate(n_patches):
        if n <= 0:
            continue
        order = rng.permutation(n)
        if patches_per_slide is not None and patches_per_slide < n:
            order = order[:patches_per_slide]
        k = math.ceil(len(order) / unit)
        padded = np.resize(order, k * unit)  # wraps around: the last unit is filled with the first patches
        units.extend(Unit(s, np.sort(padded[i * unit:(i + 1) * unit])) for i in range(k))
    perm = rng.permutation(len(units))
    return [units[i] for i in perm]


def rank_batches(units: list[Unit], slides_per_batch: int, rank: int, world_size: int) -> list[list[Unit]]:
    """This rank's batches: units dealt round-robin, grouped by ``slides_per_batch``; equal count on all ranks."""
    per_rank = len(units) // world_size
    n_batches = per_rank // slides_per_batch
    mine = units[rank::world_size][: n_batches * slides_per_batch]
    return [mine[i * slides_per_batch:(i + 1) * slides_per_batch] for i in range(n_batches)]


def batches_per_epoch(n_patches: Sequence[int], batch_size: int, slides_per_batch: int, world_size: int,
                      patches_per_slide: int | None = None) -> int:
    """Number of batches per rank per epoch (the schedule's length, independent of the seed)."""
    unit = batch_size // slides_per_batch
    total = 0
    for n in n_patches:
        m = min(n, patches_per_slide) if patches_per_slide is not None else n
        total += math.ceil(m / unit) if m > 0 else 0
    return (total // world_size) // slides_per_batch


# ----------------------------------------------------------------------------------------------- dataset


@dataclass
class SlideSource:
    """What a worker needs to read one slide's patches and targets."""

    slide_id: str
    slide: Path
    targets: Path
    patch_size_level0: int
    patch_size: int | None
    """Patch size at the target resolution (None: unknown, read at level 0)."""


class Stage2Batches(Dataset):
    """Map-style dataset: item ``b`` = batch ``b`` of this rank's schedule (set by :meth:`set_epoch`)."""

    def __init__(self, sources: list[SlideSource], batch_size: int, slides_per_batch: int, seed: int,
                 rank: int, world_size: int, input_size: int = 224, backend: str = "auto",
                 patches_per_slide: int | None = None, open_slides: int = 16) -> None:
        if batch_size % slides_per_batch:
            raise UsageError(
                f"train.batch_size ({batch_size}) must be a multiple of data.slides_per_batch ({slides_per_batch})")
        self.sources = sources
        self.batch_size, self.slides_per_batch = batch_size, slides_per_batch
        self.unit = batch_size // slides_per_batch
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.input_size, self.backend = input_size, backend
        self.patches_per_slide = patches_per_slide
        self.open_slides = open_slides
        self.n_patches = [self._n(s) for s in sources]
        self.batches: list[list[Unit]] = []
        self._cache: OrderedDict[int, tuple[Any, np.ndarray, np.ndarray]] = OrderedDict()
        self.set_epoch(0)

    @staticmethod
    def _n(src: SlideSource) -> int:
        import h5py

        with h5py.File(src.targets, "r") as f:
            return int(f["targets"].shape[0])

    def set_epoch(self, epoch: int) -> None:
        units = epoch_units(self.n_patches, self.unit, self.seed, epoch, self.patches_per_slide)
        self.batches = rank_batches(units, self.slides_per_batch, self.rank, self.world_size)

    def __len__(self) -> int:
        return len(self.batches)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()  # open slides are per process
        return state

    def _open(self, s: int) -> tuple[Any, np.ndarray, np.ndarray]:
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        from mstar_extract.pretrain.stage2.read import open_patch_reader

        src = self.sources[s]
        targets, coords, _ = read_targets(src.targets)
        reader = open_patch_reader(src.slide, coords, src.patch_size_level0, self.input_size, self.backend,
                                   src.patch_size)
        self._cache[s] = (reader, targets, coords)
        while len(self._cache) > self.open_slides:
            _, (old, _, _) = self._cache.popitem(last=False)
            close = getattr(old, "close", None)
            if close:
                close()
        return self._cache[s]

    def __getitem__(self, b: int) -> dict[str, torch.Tensor]:
        """``pixels`` uint8 (B, S, S, 3) and ``targets`` float32 (B, T); B < batch_size only when patches of
        the batch could not be decoded (they are left out, with a warning from the reader)."""
        s = self.input_size
        pixels = np.empty((self.batch_size, s, s, 3), np.uint8)
        targets = np.empty((self.batch_size, 0), np.float32)
        n = 0
        for u in self.batches[b]:
            try:
                reader, t, _ = self._open(u.slide)
                got = reader.read_rows(u.rows, out=pixels[n:n + len(u.rows)])
            except MstarError as exc:
                where = str(self.sources[u.slide].slide)
                raise MstarError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from None
            except Exception as exc:  # noqa: BLE001 - any reader failure names the slide, in one line
                raise MstarError(f"{self.sources[u.slide].slide}: cannot read patches "
                                 f"({first_line(exc, with_type=True)})") from None
            if targets.shape[1] == 0:
                targets = np.empty((self.batch_size, t.shape[1]), np.float32)
            targets[n:n + len(got)] = t[got]
            n += len(got)
        if n == 0:
            raise MstarError(f"batch {b}: no patch could be decoded")
        return {"pixels": torch.from_numpy(pixels[:n]), "targets": torch.from_numpy(targets[:n])}


def sources_for(entries: Sequence[SlideEntry], targets_dir: str | os.PathLike[str],
                patch_size_level0: int | None) -> list[SlideSource]:
    """One :class:`SlideSource` per manifest entry (the targets must exist); footprint from the bag if not given."""
    import h5py

    out = []
    for e in entries:
        tp = targets_path(targets_dir, e.slide_id)
        with h5py.File(tp, "r") as f:
            ps = int(patch_size_level0 or f.attrs.get("patch_size_level0", 0))
            size = int(f.attrs.get("patch_size", 0)) or None
        if ps <= 0:
            raise UsageError(f"{e.features}: the bag has no patch_size_level0 attribute; set data.patch_size_level0")
        out.append(SlideSource(e.slide_id, e.slide, tp, ps, size))
    return out


def clean_worker_errors(batches: Iterable[Any]) -> Iterator[Any]:
    """Iterate a DataLoader, turning a worker's failure (a multi-line traceback) into one-line :class:`MstarError`."""
    it = iter(batches)
    while True:
        try:
            item = next(it)
        except StopIteration:
            return
        except Exception as exc:  # DataLoader re-raises worker errors with the traceback as text
            text = str(exc)
            if "DataLoader worker" not in text:
                raise
            lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
            last = lines[-1] if lines else type(exc).__name__
            raise MstarError(last.split(": ", 1)[1] if last.startswith("mstar_extract.errors.") else last) from None
        yield item
