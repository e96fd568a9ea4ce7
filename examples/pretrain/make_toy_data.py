#!/usr/bin/env python
"""Generate a toy stage-1 dataset (feature bags, reports, gene table, tiny local BERT) for stage1_tiny.yaml.

    python examples/pretrain/make_toy_data.py runs/toy_data
    mstar pretrain --stage 1 --config examples/pretrain/stage1_tiny.yaml --out runs/tiny

The three modalities share a hidden cancer type and grade; nothing is downloaded.
"""

from __future__ import annotations

import argparse

from mstar_extract.pretrain.stage1.toydata import make_toy_dataset


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="runs/toy_data", help="output folder (default runs/toy_data)")
    ap.add_argument("--slides", type=int, default=120, help="number of slides (default 120)")
    ap.add_argument("--types", type=int, default=4, help="number of hidden cancer types (default 4, max 6)")
    ap.add_argument("--dim", type=int, default=64, help="patch feature dimension (default 64; aggregator.in_dim must match)")
    ap.add_argument("--genes", type=int, default=48, help="number of genes (default 48)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    paths = make_toy_dataset(a.out, n_slides=a.slides, n_types=a.types, feature_dim=a.dim, n_genes=a.genes, seed=a.seed)
    print(f"manifest:   {paths.manifest}\ngene table: {paths.gene_table}\n"
          f"gene list:  {paths.gene_list}\ntext model: {paths.text_model}")


if __name__ == "__main__":
    main()
