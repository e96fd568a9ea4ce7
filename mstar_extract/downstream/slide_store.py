"""Slide embeddings on disk: ``slide_features/<slide_id>.h5`` per slide, and the run's table.

Per slide (written atomically, :mod:`mstar_extract.store.atomic`): dataset ``embedding`` (D,) float32 and root
attrs ``slide_id``, ``bag`` (path), ``bag_created`` (the bag's own ``created`` attr), ``n_patches``,
``feature_model`` / ``feature_weights_sha256`` / ``feature_dim`` (from the bag), ``aggregator`` (path),
``aggregator_sha256``, ``embedding_dim``, ``mstar_extract_version``, ``created`` and ``complete = 1`` (last).
An embedding is current (:func:`embedding_state`) when it is complete, made by the same aggregator (sha256), and
from the same bag content (``bag_created``, ``n_patches``, weights): a re-extracted bag is embedded again.

The table (:func:`collect_table`, rebuilt from every complete per-slide file at the end of each run, atomic):
``slide_features.h5`` with ``slide_ids`` (S,) strings, ``embeddings`` (S, D) float32, ``n_patches`` (S,) int64
and attrs ``aggregator_sha256`` (``mixed`` if the files disagree), ``embedding_dim``, ``created``; and
``slide_features.csv`` with one row per slide: ``slide_id, n_patches, embedding_dim, aggregator_sha256,
feature_model, feature_weights_sha256, bag, file``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from mstar_extract import __version__
from mstar_extract.errors import MstarError, first_line
from mstar_extract.store.atomic import atomic_path, write_text_atomic
from mstar_extract.store.layout import OutLayout

TABLE_COLUMNS = ("slide_id", "n_patches", "embedding_dim", "aggregator_sha256", "feature_model",
                 "feature_weights_sha256", "bag", "file")


def plain_attr(value: Any) -> Any:
    """An HDF5 attribute value as plain Python (bytes decoded, numpy scalars unwrapped)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_embedding(path: Path, embedding: np.ndarray, attrs: Mapping[str, Any]) -> Path:
    """Write one slide embedding atomically (``complete = 1`` last)."""
    import h5py

    emb = np.asarray(embedding, dtype=np.float32).reshape(-1)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("embedding", data=emb)
            for k, v in attrs.items():
                f.attrs[k] = "" if v is None else v
            f.attrs["embedding_dim"] = int(emb.shape[0])
            f.attrs["mstar_extract_version"] = __version__
            f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            f.attrs["complete"] = 1
    return path


def read_embedding(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(embedding (D,) float32, attrs) of a complete per-slide file; MstarError otherwise."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
            if int(attrs.get("complete", 0)) != 1 or "embedding" not in f:
                raise MstarError(f"{path}: incomplete slide embedding")
            return f["embedding"][()].astype(np.float32), attrs
    except OSError as exc:
        raise MstarError(f"{path}: unreadable slide embedding ({first_line(exc)})") from None


@dataclass(frozen=True)
class EmbeddingState:
    """What an existing per-slide file means for this run: ``current`` (reuse it), ``stale`` (recompute),
    ``foreign`` (another aggregator's: refuse without --overwrite) or ``missing``."""

    kind: str
    detail: str = ""


def embedding_state(path: Path, aggregator_sha256: str, bag_identity: Mapping[str, Any]) -> EmbeddingState:
    """Compare an existing ``slide_features/<id>.h5`` with this aggregator and bag (see the module docstring)."""
    if not path.exists():
        return EmbeddingState("missing")
    try:
        _, attrs = read_embedding(path)
    except MstarError as exc:
        return EmbeddingState("stale", str(exc))
    if attrs.get("aggregator_sha256") != aggregator_sha256:
        return EmbeddingState("foreign", f"{path} exists from another aggregator "
                                         f"({str(attrs.get('aggregator_sha256'))[:12]}); use --overwrite or another OUT")
    for k, v in bag_identity.items():
        if attrs.get(k) != v:
            return EmbeddingState("stale", f"{k} changed")
    return EmbeddingState("current")


def _rows(layout: OutLayout) -> list[tuple[dict[str, Any], np.ndarray]]:
    folder = layout.slide_features_dir
    out = []
    for p in sorted(folder.glob("*.h5")) if folder.is_dir() else []:
        if p.name.startswith("."):
            continue
        try:
            emb, attrs = read_embedding(p)
        except MstarError:
            continue  # an incomplete file is no result
        out.append(({**attrs, "file": str(p)}, emb))
    return out


def collect_table(layout: OutLayout) -> int:
    """Rewrite ``slide_features.h5`` and ``slide_features.csv`` from every complete per-slide file; returns the
    number of slides (0: nothing written). MstarError when the embeddings have different sizes."""
    import h5py

    rows = _rows(layout)
    if not rows:
        return 0
    dims = {int(e.shape[0]) for _, e in rows}
    if len(dims) != 1:
        raise MstarError(f"{layout.slide_features_dir}: embeddings of different sizes {sorted(dims)} (several "
                         "aggregators); embed the slides again with one --aggregator and --overwrite")
    shas = {str(a.get("aggregator_sha256")) for a, _ in rows}
    with atomic_path(layout.slide_features_table) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("slide_ids", data=np.array([str(a["slide_id"]) for a, _ in rows], dtype=object),
                             dtype=h5py.string_dtype())
            f.create_dataset("embeddings", data=np.stack([e for _, e in rows]).astype(np.float32))
            f.create_dataset("n_patches", data=np.array([int(a.get("n_patches", 0)) for a, _ in rows], np.int64))
            f.attrs["aggregator_sha256"] = shas.pop() if len(shas) == 1 else "mixed"
            f.attrs["embedding_dim"] = dims.pop()
            f.attrs["mstar_extract_version"] = __version__
            f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for attrs, _ in rows:
        w.writerow({k: attrs.get(k, "") for k in TABLE_COLUMNS})
    write_text_atomic(layout.slide_features_csv, buf.getvalue())
    return len(rows)


def read_table(path: str | Path) -> tuple[list[str], np.ndarray]:
    """(slide ids, embeddings (S, D)) of a ``slide_features.h5``."""
    import h5py

    with h5py.File(path, "r") as f:
        return [plain_attr(s) for s in f["slide_ids"][()]], f["embeddings"][()]
