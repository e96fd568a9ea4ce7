"""The run manifest: one row per slide (design §4), safe with any number of concurrent processes.

Each process appends its rows to its own part file ``OUT/.manifest/<host>-<pid>-<start>.csv`` (one row per
finished slide, flushed and fsynced), so concurrent jobs never clobber each other. ``OUT/manifest.csv`` is the
merged view, rewritten atomically by each process at the end of its run and by ``mstar status OUT``.

Merge rule: per ``slide_id`` the latest row (by ``finished``) wins, except that a ``skipped`` row (the slide was
already complete) never hides an earlier ``done``/``no_tissue`` row.
"""

from __future__ import annotations

import csv
import io
import os
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterable

from mstar_extract.store.atomic import write_text_atomic

STATUSES = ("done", "skipped", "no_tissue", "failed")
"""Final per-slide outcomes. ``skipped``: the output was already complete (or another process owns it)."""

PARTS_DIR = ".manifest"
MANIFEST_NAME = "manifest.csv"


@dataclass
class ManifestRow:
    """One slide's outcome. Column order is the CSV's."""

    slide_id: str
    path: str
    status: str
    n_patches: int | None = None
    mpp: float | None = None
    seconds: float | None = None
    error: str = ""
    patches_per_s: float | None = None
    n_bad_patches: int = 0
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    pid: int = field(default_factory=os.getpid)
    finished: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")
        self.error = " ".join(str(self.error or "").split())  # always one line

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
    def from_csv_dict(cls, d: dict[str, str]) -> "ManifestRow":
        def num(key: str, typ: type) -> object:
            v = d.get(key, "")
            return typ(float(v)) if v not in ("", None) else None

        return cls(
            slide_id=d["slide_id"],
            path=d.get("path", ""),
            status=d["status"],
            n_patches=num("n_patches", int),  # type: ignore[arg-type]
            mpp=num("mpp", float),  # type: ignore[arg-type]
            seconds=num("seconds", float),  # type: ignore[arg-type]
            error=d.get("error", ""),
            patches_per_s=num("patches_per_s", float),  # type: ignore[arg-type]
            n_bad_patches=int(float(d.get("n_bad_patches") or 0)),
            host=d.get("host", ""),
            pid=int(float(d.get("pid") or 0)),
            finished=float(d.get("finished") or 0.0),
        )


class ManifestWriter:
    """This process's part file; :meth:`add` appends a row durably; :meth:`merge` rewrites manifest.csv."""

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.out_dir = Path(out_dir)
        parts = self.out_dir / PARTS_DIR
        parts.mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0] or "host"
        self.part_path = parts / f"{host}-{os.getpid()}-{time.time_ns()}.csv"
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


def read_parts(out_dir: str | os.PathLike[str]) -> list[ManifestRow]:
    """Every row of every part file (and of a legacy ``manifest.csv`` without parts), unsorted."""
    out_dir = Path(out_dir)
    rows: list[ManifestRow] = []
    part_files = sorted((out_dir / PARTS_DIR).glob("*.csv")) if (out_dir / PARTS_DIR).is_dir() else []
    sources = part_files or ([out_dir / MANIFEST_NAME] if (out_dir / MANIFEST_NAME).exists() else [])
    for p in sources:
        try:
            text = p.read_text(encoding="utf-8")
        except OSError:
            continue
        for d in csv.DictReader(io.StringIO(text)):
            try:
                rows.append(ManifestRow.from_csv_dict(d))
            except (KeyError, ValueError):
                continue  # a torn last line of a killed process
    return rows


def latest_rows(rows: Iterable[ManifestRow]) -> list[ManifestRow]:
    """Apply the merge rule; result sorted by slide_id."""
    best: dict[str, ManifestRow] = {}
    for r in sorted(rows, key=lambda r: r.finished):
        prev = best.get(r.slide_id)
        if prev is not None and r.status == "skipped" and prev.status in ("done", "no_tissue"):
            continue
        best[r.slide_id] = r
    return [best[k] for k in sorted(best)]


def merge_manifest(out_dir: str | os.PathLike[str]) -> list[ManifestRow]:
    """Merge all part files into ``OUT/manifest.csv`` (atomic) and return the merged rows."""
    rows = latest_rows(read_parts(out_dir))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ManifestRow.columns(), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r.to_csv_dict())
    write_text_atomic(Path(out_dir) / MANIFEST_NAME, buf.getvalue())
    return rows
