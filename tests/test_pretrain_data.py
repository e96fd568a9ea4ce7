"""Stage-1 data: manifest and gene-table checks (one-line errors), binning, patch sampling, dataset items."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mstar_extract.errors import UsageError
from mstar_extract.pretrain.stage1.data import (
    Stage1Dataset,
    attach_genes,
    bin_expression,
    load_gene_table,
    read_manifest,
    sample_patch_indices,
    split_records,
)
from mstar_extract.pretrain.stage1.genes import GeneEncoder, load_gene_embeddings


def bag(path: Path, n: int, d: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["features"] = np.arange(n * d, dtype=np.float32).reshape(n, d)
        f["coords"] = np.zeros((n, 2), dtype=np.int64)
    return path


def manifest(path: Path, rows: list[dict[str, str]]) -> Path:
    order = ["slide_id", "features", "report", "report_path", "sample_id", "cancer_type", "split"]
    cols = sorted({k for r in rows for k in r}, key=order.index)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return path


def test_manifest_reads_relative_paths_reports_and_labels(tmp_path: Path) -> None:
    bag(tmp_path / "f" / "a.h5", 5)
    bag(tmp_path / "f" / "b.h5", 3)
    (tmp_path / "r.txt").write_text("report of b\n")
    m = manifest(tmp_path / "m.csv", [
        {"slide_id": "a", "features": "f/a.h5", "report": "text a", "report_path": "", "sample_id": "s1", "cancer_type": "LUAD"},
        {"slide_id": "b", "features": "f/b.h5", "report": "", "report_path": "r.txt", "sample_id": "", "cancer_type": "BRCA"},
        {"slide_id": "c", "features": "", "report": "only text", "report_path": "", "sample_id": "s2", "cancer_type": ""},
    ])
    recs = read_manifest(m, 8)
    assert [r.n_patches for r in recs] == [5, 3, 0]
    assert recs[1].report == "report of b" and recs[2].features is None
    assert [r.label for r in recs] == [1, 0, -1]
    train, val = split_records(recs, "train", "val", 0.5)
    assert len(train) + len(val) == 3


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_bag", "feature bag of slide 'a' not found"),
        ("empty_bag", "is empty (0 patches)"),
        ("dim", "features have dimension 6, aggregator.in_dim is 8"),
        ("dup", "slide_id 'a' appears twice"),
        ("no_column", "needs a 'features' column"),
        ("report_path", "report of slide 'a' not found"),
        ("not_h5", "cannot read feature bag"),
    ],
)
def test_manifest_errors(tmp_path: Path, case: str, message: str) -> None:
    good = {"slide_id": "a", "features": str(bag(tmp_path / "a.h5", 4)), "report": "x"}
    rows = [dict(good)]
    if case == "missing_bag":
        rows[0]["features"] = str(tmp_path / "nope.h5")
    elif case == "empty_bag":
        rows[0]["features"] = str(bag(tmp_path / "e.h5", 0))
    elif case == "dim":
        rows[0]["features"] = str(bag(tmp_path / "d.h5", 4, d=6))
    elif case == "dup":
        rows.append(dict(good))
    elif case == "no_column":
        rows = [{"slide_id": "a", "report": "x"}]
    elif case == "report_path":
        rows[0].update(report="", report_path="missing.txt")
    elif case == "not_h5":
        (tmp_path / "bad.h5").write_bytes(b"not hdf5")
        rows[0]["features"] = str(tmp_path / "bad.h5")
    with pytest.raises(Exception, match=re.escape(message)) as info:
        read_manifest(manifest(tmp_path / "m.csv", rows), 8)
    assert "\n" not in str(info.value)
    assert str(tmp_path) in str(info.value) or case == "no_column" or case == "dup"


def test_gene_table_list_and_errors(tmp_path: Path) -> None:
    t = tmp_path / "g.tsv"
    t.write_text("sample\tA\tB\tC\ns1\t0\t5\t100\ns2\t3\t0\t1\n")
    gl = tmp_path / "genes.txt"
    gl.write_text("C\nA\n")
    table = load_gene_table(t, gl, n_bins=4, method="quantile")
    assert table.genes == ["C", "A"] and table.samples == {"s1": 0, "s2": 1}
    assert table.bins.shape == (2, 2) and table.bins[0, 1] == 0 and table.bins[0, 0] > 0
    gl.write_text("A\nTP53\nEGFR\n")
    with pytest.raises(UsageError, match="unknown genes not in g.tsv: TP53, EGFR"):
        load_gene_table(t, gl, 4, "quantile")
    c = tmp_path / "g.csv"
    c.write_text("sample,A\ns1,x\n")
    with pytest.raises(UsageError, match="line 2: non-numeric"):
        load_gene_table(c, None, 4, "quantile")
    c.write_text("sample,A\ns1,-1\n")
    with pytest.raises(UsageError, match="negative"):
        load_gene_table(c, None, 4, "uniform")
    c.write_text("sample,A,B\ns1,1\n")
    with pytest.raises(UsageError, match="line 2: 2 fields, header has 3"):
        load_gene_table(c, None, 4, "uniform")
    with pytest.raises(UsageError, match="gene table not found"):
        load_gene_table(tmp_path / "none.csv", None, 4, "uniform")


def test_binning() -> None:
    x = np.array([[0, 1, 10, 100, 1000], [0, 0, 0, 0, 0], [5, 5, 5, 5, 5]], dtype=float)
    q = bin_expression(x, 5, "quantile")
    assert q[0].tolist() == [0, 1, 2, 3, 4] and q[1].tolist() == [0] * 5 and q.max() <= 4
    u = bin_expression(x, 5, "uniform")
    assert u[0, 0] == 0 and u[0, 4] == 4 and (np.diff(u[0]) >= 0).all() and u.min() >= 0
    with pytest.raises(UsageError):
        bin_expression(x, 1, "uniform")


def test_patch_sampling_pads_by_resampling() -> None:
    rng = np.random.default_rng(0)
    few = sample_patch_indices(5, 12, rng)
    assert len(few) == 12 and set(few.tolist()) == set(range(5)) and (np.diff(few) >= 0).all()
    many = sample_patch_indices(100, 12, rng)
    assert len(set(many.tolist())) == 12 and many.max() < 100


def test_dataset_items_and_missing_modalities(tmp_path: Path) -> None:
    bag(tmp_path / "a.h5", 3)
    bag(tmp_path / "b.h5", 50)
    m = manifest(tmp_path / "m.csv", [
        {"slide_id": "a", "features": "a.h5", "report": "r", "sample_id": "s1"},
        {"slide_id": "b", "features": "b.h5", "report": "", "sample_id": "zz"},
    ])
    t = tmp_path / "g.csv"
    t.write_text("id,A,B\ns1,1,2\n")
    recs = read_manifest(m, 8)
    table = load_gene_table(t, None, 4, "uniform")
    assert attach_genes(recs, table) == 1
    ds = Stage1Dataset(recs, table, max_patches=8, feature_dim=8, seed=0, train=True)
    a, b = ds[0], ds[1]
    assert a["features"].shape == (8, 8) and a["has_slide"] and a["has_report"] and a["has_gene"]
    rows = (a["features"][:, 0] / 8).long()
    assert set(rows.tolist()) == {0, 1, 2}  # all 3 patches, padded by re-sampling
    assert not b["has_report"] and not b["has_gene"] and b["genes"].tolist() == [0, 0]
    assert torch.equal(ds[1]["features"], b["features"])  # same (seed, epoch, index) → same patches
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["features"], b["features"])


def test_gene_embedding_init(tmp_path: Path) -> None:
    f = tmp_path / "g2v.txt"
    f.write_text("3 4\nA 1 2 3 4\nZ 0 0 0 0\nC 5 6 7 8\n")
    init, found = load_gene_embeddings(f, ["A", "B", "C"], 4)
    assert found == 2 and torch.isnan(init[1]).all()
    enc = GeneEncoder(3, 4, dim=4, depth=1, heads=2, out_dim=6, gene_init=init)
    assert enc.gene_emb.weight[2].tolist() == [5, 6, 7, 8]
    assert enc(torch.tensor([[0, 1, 3]])).shape == (1, 6)
    with pytest.raises(UsageError, match="line 2: 4 values for gene A, genes.dim is 5"):
        load_gene_embeddings(f, ["A"], 5)


def test_gene_encoder_size_at_paper_defaults() -> None:
    enc = GeneEncoder(n_genes=0 or 1, n_bins=51)
    blocks = sum(p.numel() for p in enc.blocks.parameters())
    assert 0.9e6 < blocks < 1.1e6  # ≈1M parameters (the paper; docs/pretrain.md), plus the gene table


def test_cli_reports_data_errors_in_one_line(tmp_path: Path) -> None:
    from mstar_extract.testing.cli import run_mstar

    m = manifest(tmp_path / "m.csv", [{"slide_id": "a", "features": "missing.h5", "report": "x"}])
    r = run_mstar("pretrain", "--stage", "1", "--set", f"data.manifest={m}", "--set", "aggregator.in_dim=8",
                  "--set", "dist.device=cpu", "--out", str(tmp_path / "run"), timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"mstar: error: {tmp_path / 'missing.h5'}: feature bag of slide 'a' not found"]


def test_global_batches_are_the_same_for_any_world_size() -> None:
    from mstar_extract.pretrain.sampler import GlobalBatchSampler

    single = GlobalBatchSampler(23, 4, seed=5)
    ranks = [GlobalBatchSampler(23, 2, rank=r, world_size=2, seed=5) for r in range(2)]
    for s in (single, *ranks):
        s.set_epoch(3)
    got = [a + b for a, b in zip(*[list(s) for s in ranks], strict=True)]
    assert got == list(single) and len(got) == 5  # 23 // 4, last incomplete global batch dropped
    single.set_epoch(3, start_batch=2)
    assert list(single) == got[2:] and len(single) == 3
    single.set_epoch(4)
    assert list(single) != got
