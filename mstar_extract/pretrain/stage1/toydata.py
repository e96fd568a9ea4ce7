"""A generated stage-1 dataset where WSI features, reports and gene expression share a hidden cancer type and grade.

Used by ``examples/pretrain/make_toy_data.py`` and the tests: everything (feature bags in the format of
:mod:`mstar_extract.store.bags`, reports, a gene table, a gene list, a tiny BERT model + WordPiece vocabulary
saved with ``save_pretrained``) is written locally, so nothing is downloaded. Signals are weak and noisy per
patch / word / gene, so the models have to learn to pool them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TYPE_WORDS = [
    ["adenocarcinoma", "glandular", "mucin"],
    ["squamous", "keratinizing", "intercellular"],
    ["clear", "cell", "renal"],
    ["ductal", "invasive", "mammary"],
    ["melanoma", "pigmented", "junctional"],
    ["urothelial", "papillary", "bladder"],
]
GRADE_WORDS = [["well", "low"], ["moderately", "intermediate"], ["poorly", "high"]]
FILLER = (
    "the sections show tumor tissue with margins specimen received in formalin labeled biopsy resection lymph node "
    "negative positive present absent focal extensive stroma necrosis infiltrating measuring cm grossly "
    "microscopic examination reveals architecture nuclear pleomorphism mitotic figures identified"
).split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class ToyPaths:
    root: Path
    manifest: Path
    gene_table: Path
    gene_list: Path
    text_model: Path


def vocabulary() -> list[str]:
    words = sorted({w for ws in TYPE_WORDS for w in ws} | {w for ws in GRADE_WORDS for w in ws} | set(FILLER)
                   | {"grade", "differentiated"})
    return SPECIAL + [".", ",", ";", ":"] + words


def make_tiny_bert(out: str | Path, hidden: int = 32, layers: int = 2, heads: int = 2, max_positions: int = 128,
                   seed: int = 0) -> Path:
    """A tiny BERT (random weights) and its WordPiece vocabulary, saved so ``AutoModel``/``AutoTokenizer`` load it."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from mstar_extract.pretrain.stage1.text import _quiet_transformers

    _quiet_transformers()

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab_file = out / "vocab.txt"
    vocab_file.write_text("\n".join(vocabulary()) + "\n", encoding="utf-8")
    import inspect

    # transformers 5 takes ``vocab`` (a dict), 4.x takes ``vocab_file``
    if "vocab" in inspect.signature(BertTokenizer.__init__).parameters:
        vocab = {w: i for i, w in enumerate(vocabulary())}
        tok = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=max_positions)
    else:
        tok = BertTokenizer(vocab_file=str(vocab_file), do_lower_case=True, model_max_length=max_positions)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(vocabulary()), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=hidden * 2, max_position_embeddings=max_positions)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _write_bag(path: Path, feats: np.ndarray) -> None:
    import h5py

    from mstar_extract.store.atomic import atomic_path

    n = feats.shape[0]
    side = int(np.ceil(np.sqrt(n)))
    coords = np.stack([np.arange(n) % side, np.arange(n) // side], axis=1).astype(np.int64) * 512
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=feats.astype(np.float32), chunks=(min(n, 256), feats.shape[1]))
            f.create_dataset("coords", data=coords)
            f.attrs["slide_id"] = path.stem
            f.attrs["feature_dim"] = feats.shape[1]


@dataclass
class _Hidden:
    """The hidden structure every modality of a toy slide shows: prototypes per cancer type and grade."""

    type_proto: np.ndarray
    grade_proto: np.ndarray
    base: np.ndarray
    type_sets: list[np.ndarray]
    grade_sets: list[np.ndarray]


def _toy_slide(out: Path, i: int, n_types: int, hidden: _Hidden, rng: np.random.Generator, patches: tuple[int, int],
               signal: float, val_fraction: float, missing_fraction: float) -> tuple[dict[str, str], tuple[str, np.ndarray]]:
    """One slide: its bag on disk, its report (inline, as a file, or missing), its expression; (manifest row,
    (sample id, counts))."""
    t, g = i % n_types, int(rng.integers(3))
    sid = f"TOY-{i:04d}"
    n = int(rng.integers(*patches))
    tumour = rng.random(n) < 0.5
    feats = rng.normal(size=(n, hidden.type_proto.shape[1]))
    feats = feats + tumour[:, None] * (0.8 * signal) * (hidden.type_proto[t] + hidden.grade_proto[g])
    _write_bag(out / "features" / f"{sid}.h5", feats)
    words = list(rng.choice(FILLER, size=int(rng.integers(8, 16))))
    words += list(rng.choice(TYPE_WORDS[t], size=2)) + [str(rng.choice(GRADE_WORDS[g])), "differentiated"]
    rng.shuffle(words)
    report = " ".join(words)
    lam = hidden.base.copy()
    lam[hidden.type_sets[t]] *= 6.0
    lam[hidden.grade_sets[g]] *= 3.0
    counts = rng.poisson(lam * rng.uniform(0.5, 2.0)) * (rng.random(len(hidden.base)) > 0.1)
    sample = f"S{i:04d}"
    row = {"slide_id": sid, "features": f"features/{sid}.h5", "report": "", "report_path": "", "sample_id": sample,
           "cancer_type": f"TYPE{t}", "split": "val" if rng.random() < val_fraction else "train"}
    r = rng.random()
    if r < missing_fraction:
        pass  # no report
    elif r < 0.5:
        (out / "reports" / f"{sid}.txt").write_text(report + "\n", encoding="utf-8")
        row["report_path"] = f"reports/{sid}.txt"
    else:
        row["report"] = report
    if rng.random() < missing_fraction:
        row["sample_id"] = ""
    return row, (sample, counts)


def _write_tables(out: Path, rows: list[dict[str, str]], genes: list[str],
                  expr: list[tuple[str, np.ndarray]]) -> tuple[Path, Path, Path]:
    """(manifest.csv, genes.tsv, gene_list.txt) under ``out``."""
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    table = out / "genes.tsv"
    with table.open("w", encoding="utf-8") as fh:
        fh.write("sample_id\t" + "\t".join(genes) + "\n")
        for sample, counts in expr:
            fh.write(sample + "\t" + "\t".join(str(int(c)) for c in counts) + "\n")
    gene_list = out / "gene_list.txt"
    gene_list.write_text("\n".join(genes) + "\n", encoding="utf-8")
    return manifest, table, gene_list


def make_toy_dataset(
    out: str | Path,
    n_slides: int = 120,
    n_types: int = 4,
    feature_dim: int = 64,
    n_genes: int = 48,
    patches: tuple[int, int] = (40, 240),
    val_fraction: float = 0.2,
    missing_fraction: float = 0.05,
    signal: float = 1.0,
    seed: int = 0,
    with_text_model: bool = True,
) -> ToyPaths:
    """Write bags, reports, a gene table (TSV), a gene list, a manifest and (optionally) a tiny BERT under ``out``.

    ``signal`` scales how strongly the hidden type and grade show in the patch features (1 = default).
    """
    if not 1 <= n_types <= len(TYPE_WORDS):
        raise ValueError(f"n_types must be 1..{len(TYPE_WORDS)}")
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "features").mkdir(parents=True, exist_ok=True)
    (out / "reports").mkdir(parents=True, exist_ok=True)
    type_proto = rng.normal(size=(n_types, feature_dim))
    grade_proto = rng.normal(size=(3, feature_dim))
    genes = [f"GENE{i:03d}" for i in range(n_genes)]
    base = rng.gamma(2.0, 20.0, size=n_genes)
    per = max(n_genes // (n_types + 3), 2)
    type_sets = [rng.choice(n_genes, per, replace=False) for _ in range(n_types)]
    grade_sets = [rng.choice(n_genes, per, replace=False) for _ in range(3)]
    hidden = _Hidden(type_proto, grade_proto, base, type_sets, grade_sets)
    made = [_toy_slide(out, i, n_types, hidden, rng, patches, signal, val_fraction, missing_fraction)
            for i in range(n_slides)]
    manifest, table, gene_list = _write_tables(out, [m[0] for m in made], genes, [m[1] for m in made])
    text_model = out / "tiny_bert"
    if with_text_model:
        make_tiny_bert(text_model)
    return ToyPaths(out, manifest, table, gene_list, text_model)


def toy_overrides(paths: ToyPaths, out_dir: str | Path, feature_dim: int = 64) -> list[str]:
    """``--set`` strings that point a tiny stage-1 config at a toy dataset (used by tests and docs)."""
    return [
        f"data.manifest={paths.manifest}",
        f"data.gene_table={paths.gene_table}",
        f"data.gene_list={paths.gene_list}",
        "data.n_bins=8",
        "data.max_patches=32",
        f"aggregator.in_dim={feature_dim}",
        "aggregator.dim=32",
        "aggregator.heads=4",
        "aggregator.landmarks=8",
        "aggregator.dropout=0.1",
        f"text.model={paths.text_model}",
        "text.max_tokens=32",
        "text.trainable_layers=-1",
        "text.pooling=mean",
        "text.lr_scale=1.0",
        "text.local_files_only=true",
        "genes.dim=32",
        "genes.depth=1",
        "genes.heads=2",
        "optim.lr=3e-3",
        "optim.weight_decay=0.01",
        "optim.warmup_steps=5",
        "train.batch_size=16",
        "train.num_workers=0",
        "train.cpu_threads=1",
        "train.log_every=1",
        "train.ckpt_every=1000",
        f"run.out_dir={out_dir}",
    ]
