"""The run manifest: its columns (declared once, here), its part files, and the rule that merges them.

Each process appends its rows to its own part file ``OUT/.manifest/<host>-<pid>-<ns>.csv`` (one row per
finished slide, flushed and fsynced), so concurrent jobs never clobber each other. ``OUT/manifest.csv`` is the
merged view, rewritten atomically by each process at the end of its run and by ``mstar status OUT``
(:func:`load_manifest`). Paths come from :class:`~mstar_extract.store.layout.OutLayout`.

Columns: :class:`SlideRecord` (what a slide's outcome records: ``slide_id, path, status, n_patches, mpp,
seconds, error, patches_per_s, n_bad_patches``) then who recorded it (``host, pid, finished``).

Merge rule (:func:`latest_rows`), per ``slide_id``, rows taken in the order they were recorded (``finished``):

* the latest row wins, except that a ``skipped`` row never replaces an earlier ``done``/``no_tissue`` row:
  a rerun that skips a finished slide keeps the slide's record (its mpp, seconds, host);
* a ``skipped`` row with an empty ``error`` means "the slide's outputs were already complete". When no earlier
  ``done``/``no_tissue`` row exists (the process that finished the slide was killed before recording it, or its
  part file was lost), the merged row counts the slide as complete: ``done`` (``no_tissue`` for 0 patches),
  with what the skip found in the outputs and ``seconds`` unknown. A ``skipped`` row with a reason
  (``taken by another process``) is kept as it is.

The merged rows come from every part file and from ``manifest.csv`` itself (a folder copied without its hidden
``.manifest/``, or written by an older version, keeps its records).
"""

from __future__ import annotations

import csv
import io
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from mstar_extract.store.atomic import write_text_atomic
from mstar_extract.store.layout import MANIFEST_NAME, MANIFEST_PARTS_DIR, OutLayout

STATUSES = ("done", "skipped", "no_tissue", "failed")
"""Final per-slide outcomes. ``skipped``: the output was already complete (or another process owns it)."""

FINISHED_STATUSES = ("done", "no_tissue")
"""Outcomes that finished the slide (its outputs were written)."""

PARTS_DIR = MANIFEST_PARTS_DIR
"""Folder of the per-process part files (under OUT)."""
__all__ = ["STATUSES", "FINISHED_STATUSES", "PARTS_DIR", "MANIFEST_NAME", "SlideRecord", "ManifestRow",
           "ManifestWriter", "read_parts", "latest_rows", "merge_manifest", "load_manifest", "has_manifest"]


def _host() -> str:
    return socket.gethostname().split(".")[0] or "host"


@dataclass
class SlideRecord:
    """What one slide's outcome records: the manifest's first columns, in CSV order. The pipeline's
    :class:`~mstar_extract.pipeline.runner.SlideOutcome` and :class:`ManifestRow` both extend it."""

    slide_id: str
    path: str
    status: str
    """``done``, ``skipped``, ``no_tissue`` or ``failed``."""
    n_patches: int | None = None
    mpp: float | None = None
    """Level-0 µm/px of the slide."""
    seconds: float | None = None
    error: str = ""
    """One line; empty unless failed (or an informative skip reason)."""
    patches_per_s: float | None = None
    n_bad_patches: int = 0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")
        self.path = str(self.path)
        self.error = " ".join(str(self.error or "").split())  # always one line

    def record(self) -> dict[str, Any]:
        """The :class:`SlideRecord` columns of this object, by name."""
        return {f.name: getattr(self, f.name) for f in fields(SlideRecord)}


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda v: None if v == "" else parse(v)


_PARSERS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "int": lambda v: int(float(v)) if v != "" else 0,
    "float": lambda v: float(v) if v != "" else 0.0,
    "int | None": _optional(lambda v: int(float(v))),
    "float | None": _optional(float),
}
"""How a CSV cell becomes a value, by the column's declared type (``from __future__`` annotations are strings)."""


@dataclass
class ManifestRow(SlideRecord):
    """One row of the manifest: a :class:`SlideRecord` and who recorded it when. Field order = CSV order."""

    host: str = field(default_factory=_host)
    pid: int = field(default_factory=os.getpid)
    finished: float = field(default_factory=time.time)
    """Unix time the outcome was recorded."""

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_csv_dict(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for k, v in asdict(self).items():
            if v is None:
                out[k] = ""
            elif isinstance(v, float):
                out[k] = f"{v:.6g}" if k != "finished" else f"{v:.3f}"
            else:
                out[k] = str(v)
        return out

    @classmethod
    def from_csv_dict(cls, d: dict[str, str]) -> ManifestRow:
        """Parse a CSV row (KeyError without ``slide_id``/``status``, ValueError for a malformed number)."""
        values: dict[str, Any] = {"slide_id": d["slide_id"], "status": d["status"]}
        for f in fields(cls):
            if f.name not in values:
                values[f.name] = _PARSERS[str(f.type)]((d.get(f.name) or "").strip())
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        """The row as JSON values: empty text, and a zero pid or time, become null (``mstar status``)."""
        out = asdict(self)
        for k, v in out.items():
            if v == "" or (k in ("pid", "finished") and not v):
                out[k] = None
        return out


class ManifestWriter:
    """This process's part file; :meth:`add` appends a row durably; :meth:`merge` rewrites manifest.csv."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.layout = OutLayout(out_dir)
        self.out_dir = self.layout.root
        self.layout.manifest_parts_dir.mkdir(parents=True, exist_ok=True)
        self.part_path = self.layout.manifest_part(_host(), os.getpid(), time.time_ns())
        self.rows: list[ManifestRow] = []

    def add(self, row: ManifestRow) -> None:
        self.rows.append(row)
        new = not self.part_path.exists()
        with open(self.part_path, "a", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=ManifestRow.columns())
            if new:
                w.writeheader()
            w.writerow(row.to_csv_dict())
            fh.flush()
            os.fsync(fh.fileno())

    def merge(self) -> list[ManifestRow]:
        return merge_manifest(self.out_dir)


def _read_rows(path: Path) -> list[ManifestRow]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    rows = []
    for d in csv.DictReader(io.StringIO(text)):
        try:
            rows.append(ManifestRow.from_csv_dict(d))
        except (KeyError, ValueError, TypeError):
            continue  # a torn last line of a killed process
    return rows


def _part_files(layout: OutLayout) -> list[Path]:
    d = layout.manifest_parts_dir
    return sorted(d.glob("*.csv")) if d.is_dir() else []


def has_manifest(out_dir: str | os.PathLike[str]) -> bool:
    """Whether any process has recorded a slide in OUT (a part file or ``manifest.csv`` exists)."""
    layout = OutLayout(out_dir)
    return layout.manifest.is_file() or bool(_part_files(layout))


def read_parts(out_dir: str | os.PathLike[str]) -> list[ManifestRow]:
    """Every row of every part file and of ``manifest.csv``, unsorted (duplicates included)."""
    layout = OutLayout(out_dir)
    rows: list[ManifestRow] = []
    for p in [*_part_files(layout), layout.manifest]:
        rows.extend(_read_rows(p))
    return rows


def _as_finished(skip: ManifestRow) -> ManifestRow:
    """A ``skipped``-because-complete row with no earlier record, counted as the slide's completion."""
    return replace(skip, status="no_tissue" if skip.n_patches == 0 else "done", seconds=None)


def latest_rows(rows: Iterable[ManifestRow]) -> list[ManifestRow]:
    """Apply the merge rule (module docstring); result sorted by slide_id."""
    best: dict[str, ManifestRow] = {}
    for r in sorted(rows, key=lambda r: r.finished):
        prev = best.get(r.slide_id)
        if r.status == "skipped" and prev is not None and prev.status in FINISHED_STATUSES:
            continue  # the slide keeps its record
        best[r.slide_id] = _as_finished(r) if r.status == "skipped" and not r.error else r
    return [best[k] for k in sorted(best)]


def _write_merged(layout: OutLayout, rows: list[ManifestRow]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ManifestRow.columns(), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r.to_csv_dict())
    write_text_atomic(layout.manifest, buf.getvalue())


def merge_manifest(out_dir: str | os.PathLike[str]) -> list[ManifestRow]:
    """Merge all part files into ``OUT/manifest.csv`` (atomic) and return the merged rows."""
    rows = latest_rows(read_parts(out_dir))
    _write_merged(OutLayout(out_dir), rows)
    return rows


def load_manifest(out_dir: str | os.PathLike[str], write: bool = True) -> list[ManifestRow] | None:
    """The merged rows of OUT, or None when no slide was ever recorded there.

    ``write``: also rewrite ``OUT/manifest.csv`` with them (skipped silently when OUT is read-only)."""
    if not has_manifest(out_dir):
        return None
    rows = latest_rows(read_parts(out_dir))
    if write:
        try:
            _write_merged(OutLayout(out_dir), rows)
        except OSError:
            pass  # a read-only folder: report without rewriting manifest.csv
    return rows
