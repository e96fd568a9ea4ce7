#!/usr/bin/env python
"""Generate a toy stage-2 dataset for stage2_tiny.yaml: small real SVS slides, tissue patches, 64-d feature bags.

    python examples/pretrain/make_stage2_data.py runs/stage2_data
    mstar pretrain --stage 2 --config examples/pretrain/stage2_tiny.yaml --out runs/stage2_tiny

Slides are pyramidal Aperio SVS files; coordinates come from the project's tissue segmentation and tiling
(20x, 256 px); features from a frozen encoder of the registry (default ``timm:test_vit`` with seeded random
weights, 64-d = ``aggregator.in_dim`` of stage1_tiny.yaml). Writes ``manifest.csv`` (slide_id, slide, features).
Nothing is downloaded.
"""

from __future__ import annotations

import argparse

from mstar_extract.pretrain.stage2.toydata import make_stage2_toy_data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="runs/stage2_data", help="output folder (default runs/stage2_data)")
    ap.add_argument("--slides", type=int, default=4, help="number of slides (default 4)")
    ap.add_argument("--model", default="timm:test_vit", help="frozen feature encoder (default timm:test_vit, 64-d)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    data = make_stage2_toy_data(a.out, n_slides=a.slides, seed=a.seed, model=a.model)
    print(f"manifest: {data.manifest}\nslides:   {len(data.slides)} ({sum(data.n_patches)} patches)")


if __name__ == "__main__":
    main()
