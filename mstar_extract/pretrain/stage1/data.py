"""Stage-1 data: the manifest, the gene table (log1p + binning), and the per-slide dataset.

Manifest CSV columns: ``slide_id`` and ``features`` (feature bag .h5 with ``features`` (N, D) and ``coords``
(N, 2), as :mod:`mstar_extract.store.bags` writes them) are required; ``report`` (the text) or ``report_path`` (a
text file), ``sample_id`` (row key of the gene table), ``cancer_type`` and ``split`` are optional. Relative paths
are relative to the manifest's folder. Any modality may be missing for a row (empty cell / no gene-table row); the
dataset then returns a zero placeholder and a False mask, and the losses leave it out. Every check runs before
training starts and fails with one line naming the file and the problem.
"""

from __future__ import annotations

import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mstar_extract.errors import MstarError, UsageError, first_line


@dataclass
class SlideRecord:
    """One manifest row, validated."""

    slide_id: str
    features: Path | None
    n_patches: int
    report: str | None
    sample_id: str | None
    cancer_type: str | None
    split: str | None
    label: int = -1
    gene_row: int | None = None


def _sniff_delimiter(path: Path, first_line: str) -> str:
    if path.suffix.lower() in (".tsv", ".tab") or first_line.count("\t") > first_line.count(","):
        return "\t"
    return ","


def bag_shape(path: Path) -> tuple[int, int]:
    """(N, D) of a feature bag; MstarError naming the file if it is unreadable or lacks ``features``."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise MstarError(f"{path}: feature bag has no 'features' dataset")
            shape = f["features"].shape
    except OSError as exc:
        raise MstarError(f"{path}: cannot read feature bag ({first_line(exc)})") from None
    if len(shape) != 2:
        raise MstarError(f"{path}: 'features' must be 2-D (N, D), found shape {tuple(shape)}")
    return int(shape[0]), int(shape[1])


def read_manifest(path: str | Path, feature_dim: int) -> list[SlideRecord]:
    """Read and check the manifest: files exist, bags are non-empty with ``feature_dim`` columns, ids unique."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: manifest not found")
    text = path.read_text(encoding="utf-8-sig")
    lines = text.splitlines()
    if not lines:
        raise UsageError(f"{path}: manifest is empty")
    reader = csv.DictReader(lines, delimiter=_sniff_delimiter(path, lines[0]))
    cols = [c.strip() for c in (reader.fieldnames or [])]
    for need in ("slide_id", "features"):
        if need not in cols:
            raise UsageError(f"{path}: manifest needs a '{need}' column (has: {', '.join(cols)})")
    base = path.parent
    records: list[SlideRecord] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(reader, 2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        sid = row.get("slide_id", "")
        if not sid:
            raise UsageError(f"{path}: line {lineno}: empty slide_id")
        if sid in seen:
            raise UsageError(f"{path}: line {lineno}: slide_id '{sid}' appears twice")
        seen.add(sid)
        feat: Path | None = None
        n = 0
        if row.get("features"):
            feat = Path(row["features"])
            feat = feat if feat.is_absolute() else base / feat
            if not feat.is_file():
                raise UsageError(f"{feat}: feature bag of slide '{sid}' not found")
            n, d = bag_shape(feat)
            if n == 0:
                raise UsageError(f"{feat}: feature bag of slide '{sid}' is empty (0 patches)")
            if d != feature_dim:
                raise UsageError(f"{feat}: features have dimension {d}, aggregator.in_dim is {feature_dim}")
        report = row.get("report") or None
        if not report and row.get("report_path"):
            rp = Path(row["report_path"])
            rp = rp if rp.is_absolute() else base / rp
            if not rp.is_file():
                raise UsageError(f"{rp}: report of slide '{sid}' not found")
            report = rp.read_text(encoding="utf-8", errors="replace").strip() or None
        records.append(
            SlideRecord(sid, feat, n, report, row.get("sample_id") or None, row.get("cancer_type") or None,
                        row.get("split") or None)
        )
    if not records:
        raise UsageError(f"{path}: manifest has no rows")
    types = sorted({r.cancer_type for r in records if r.cancer_type})
    index = {t: i for i, t in enumerate(types)}
    for r in records:
        r.label = index[r.cancer_type] if r.cancer_type else -1
    return records


def split_records(records: list[SlideRecord], train_split: str, val_split: str,
                  val_fraction: float) -> tuple[list[SlideRecord], list[SlideRecord]]:
    """(train, val): by the ``split`` column when any row has one, else a stable hash of slide_id."""
    if any(r.split for r in records):
        return [r for r in records if r.split == train_split], [r for r in records if r.split == val_split]
    train: list[SlideRecord] = []
    val: list[SlideRecord] = []
    for r in records:
        h = int(hashlib.sha1(r.slide_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (val if h < val_fraction else train).append(r)
    return train, val


# --------------------------------------------------------------------------------------------- genes


@dataclass
class GeneTable:
    """Binned expression: ``bins`` (S, G) int64 for samples ``samples`` and genes ``genes``."""

    genes: list[str]
    samples: dict[str, int]
    bins: np.ndarray


def bin_expression(values: np.ndarray, n_bins: int, method: str) -> np.ndarray:
    """log1p then bins: 0 for zero expression, 1..n_bins-1 for positive values.

    ``quantile``: per sample, edges at quantiles of its positive values (robust to sequencing depth).
    ``uniform``: equal-width bins between 0 and the table's largest log1p value.
    """
    if n_bins < 2:
        raise UsageError(f"data.n_bins must be >= 2, got {n_bins}")
    x = np.log1p(values.astype(np.float64))
    out = np.zeros(x.shape, dtype=np.int64)
    k = n_bins - 1
    if method == "uniform":
        top = float(x.max()) if x.size else 0.0
        if top > 0:
            out = np.where(x > 0, np.clip(np.ceil(x / top * k), 1, k), 0).astype(np.int64)
        return out
    for i in range(x.shape[0]):
        pos = x[i] > 0
        if not pos.any():
            continue
        edges = np.quantile(x[i, pos], np.linspace(0, 1, k + 1)[1:-1])
        out[i, pos] = np.digitize(x[i, pos], edges, right=True) + 1
    return out


def load_gene_table(path: str | Path, gene_list: str | Path | None, n_bins: int, method: str) -> GeneTable:
    """Read a samples × genes CSV/TSV (first column = sample id), keep the listed genes, log1p + bin."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: gene table not found")
    with path.open(encoding="utf-8-sig", newline="") as fh:
        first = fh.readline()
        fh.seek(0)
        reader = csv.reader(fh, delimiter=_sniff_delimiter(path, first))
        header = next(reader, None)
        if not header or len(header) < 2:
            raise UsageError(f"{path}: gene table needs a sample-id column and at least one gene column")
        columns = [h.strip() for h in header[1:]]
        if gene_list is not None:
            gl = Path(gene_list)
            if not gl.is_file():
                raise UsageError(f"{gl}: gene list not found")
            genes = [g.strip() for g in gl.read_text(encoding="utf-8").splitlines() if g.strip() and not g.startswith("#")]
            if not genes:
                raise UsageError(f"{gl}: gene list is empty")
            col_index = {c: i for i, c in enumerate(columns)}
            missing = [g for g in genes if g not in col_index]
            if missing:
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                raise UsageError(f"{gl}: unknown genes not in {path.name}: {', '.join(missing[:5])}{more}")
            take = [col_index[g] + 1 for g in genes]
        else:
            genes = columns
            take = list(range(1, len(header)))
        samples: dict[str, int] = {}
        rows: list[list[float]] = []
        for lineno, row in enumerate(reader, 2):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                raise UsageError(f"{path}: line {lineno}: {len(row)} fields, header has {len(header)}")
            sid = row[0].strip()
            if sid in samples:
                raise UsageError(f"{path}: line {lineno}: sample '{sid}' appears twice")
            try:
                vals = [float(row[j]) if row[j].strip() else 0.0 for j in take]
            except ValueError:
                raise UsageError(f"{path}: line {lineno}: non-numeric expression value") from None
            if any(v < 0 or math.isnan(v) for v in vals):
                raise UsageError(f"{path}: line {lineno}: negative or NaN expression value (expects counts/TPM)")
            samples[sid] = len(rows)
            rows.append(vals)
    if not rows:
        raise UsageError(f"{path}: gene table has no samples")
    return GeneTable(genes, samples, bin_expression(np.asarray(rows), n_bins, method))


def attach_genes(records: list[SlideRecord], table: GeneTable | None) -> int:
    """Set ``gene_row`` of each record from its sample_id; returns how many records have no expression."""
    missing = 0
    for r in records:
        r.gene_row = table.samples.get(r.sample_id) if (table is not None and r.sample_id) else None
        missing += r.gene_row is None
    return missing


# --------------------------------------------------------------------------------------------- dataset


def sample_patch_indices(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` sorted patch indices of a bag of ``n``: a random subset if n ≥ k, else all n plus re-sampled fill."""
    if n >= k:
        return np.sort(rng.choice(n, size=k, replace=False))
    return np.sort(np.concatenate([np.arange(n), rng.choice(n, size=k - n, replace=True)]))


def read_bag_rows(path: Path, idx: np.ndarray) -> np.ndarray:
    """Rows ``idx`` (sorted, may repeat) of a bag's ``features`` as float32."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            ds = f["features"]
            uniq, inverse = np.unique(idx, return_inverse=True)
            # one contiguous read when most rows are wanted; else an h5py point selection (sorted, unique)
            block = ds[:][uniq] if len(uniq) * 2 >= ds.shape[0] else ds[uniq]
    except OSError as exc:
        raise MstarError(f"{path}: cannot read feature bag ({first_line(exc)})") from None
    return np.asarray(block, dtype=np.float32)[inverse]


class Stage1Dataset(Dataset):
    """Item i → dict(features (K, D) float32, report str, genes (G,) int64, masks, label).

    Patch sampling is seeded by (seed, epoch, i) for training and (seed, i) for validation, so a resumed run
    sees exactly the patches an uninterrupted one would, whatever the worker layout.
    """

    def __init__(self, records: list[SlideRecord], genes: GeneTable | None, max_patches: int, feature_dim: int, seed: int,
                 train: bool) -> None:
        self.records, self.genes = records, genes
        self.max_patches, self.feature_dim = max_patches, feature_dim
        self.seed, self.train, self.epoch = seed, train, 0
        self.n_genes = len(genes.genes) if genes is not None else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        key = (self.seed, self.epoch, i) if self.train else (self.seed, i)
        rng = np.random.default_rng(key)
        if r.features is not None:
            idx = sample_patch_indices(r.n_patches, self.max_patches, rng)
            feats = torch.from_numpy(read_bag_rows(r.features, idx))
        else:
            feats = torch.zeros(self.max_patches, self.feature_dim)
        if self.genes is not None and r.gene_row is not None:
            genes = torch.from_numpy(self.genes.bins[r.gene_row])
        else:
            genes = torch.zeros(self.n_genes, dtype=torch.long)
        return {
            "index": i,
            "features": feats,
            "has_slide": r.features is not None,
            "report": r.report or "",
            "has_report": r.report is not None,
            "genes": genes,
            "has_gene": self.genes is not None and r.gene_row is not None,
            "label": r.label,
        }


class Collate:
    """Stacks items and tokenises reports (cut/padded to ``max_tokens``) with a Hugging Face tokenizer."""

    def __init__(self, tokenizer: Any, max_tokens: int) -> None:
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(
            [it["report"] for it in items], padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        return {
            "index": torch.tensor([it["index"] for it in items]),
            "features": torch.stack([it["features"] for it in items]),
            "genes": torch.stack([it["genes"] for it in items]),
            "input_ids": tok["input_ids"],
            "attention_mask": tok["attention_mask"],
            "has_slide": torch.tensor([it["has_slide"] for it in items]),
            "has_report": torch.tensor([it["has_report"] for it in items]),
            "has_gene": torch.tensor([it["has_gene"] for it in items]),
            "label": torch.tensor([it["label"] for it in items]),
        }
