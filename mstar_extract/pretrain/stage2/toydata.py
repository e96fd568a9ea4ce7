"""A generated stage-2 dataset: small real SVS slides, their tissue patches and frozen-encoder feature bags.

Used by ``examples/pretrain/make_stage2_data.py`` and the stage-2 tests. Every part is the real thing at a tiny
size: slides are pyramidal Aperio SVS files (:mod:`mstar_extract.testing.fixtures`), coordinates come from the
project's tissue segmentation and tiling (20x, 256-px patches), pixels from the project's patch reader, and the
features from a frozen encoder of the model registry (default ``timm:test_vit`` with seeded random weights:
64-d, matching the tiny stage-1 example's ``aggregator.in_dim``). Writes ``manifest.csv`` with the stage-2
columns ``slide_id, slide, features``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from mstar_extract.models.encoder import Encoder


@dataclass
class Stage2ToyData:
    manifest: Path
    slides: list[Path]
    bags: list[Path]
    n_patches: list[int]


def _encoder(model: str, seed: int) -> Encoder:
    import torch

    from mstar_extract.models.encoder import Encoder
    from mstar_extract.models.registry import get_spec
    from mstar_extract.models.weights import ResolvedWeights

    spec = get_spec(model)
    torch.manual_seed(seed)
    net = spec.build()
    return Encoder(spec, net, ResolvedWeights("random", None, f"random-seed{seed}"), torch.device("cpu"), "fp32")


def make_stage2_toy_data(out: str | Path, n_slides: int = 3, seed: int = 0, model: str = "timm:test_vit",
                         width_um: float = 2000.0, height_um: float = 1500.0, mpp: float = 0.5) -> Stage2ToyData:
    """Write ``n_slides`` slides (``slides/``), feature bags (``features/``) and ``manifest.csv`` under ``out``."""
    from mstar_extract.reading.reader import PatchReader
    from mstar_extract.slides import open_slide
    from mstar_extract.store.bags import write_bag
    from mstar_extract.testing.fixtures import make_svs
    from mstar_extract.testing.scene import random_scene
    from mstar_extract.tiling import TilingParams, plan_tiles
    from mstar_extract.tissue import segment_slide

    root = Path(out)
    (root / "slides").mkdir(parents=True, exist_ok=True)
    (root / "features").mkdir(parents=True, exist_ok=True)
    enc = _encoder(model, seed)
    slides, bags, counts = [], [], []
    for i in range(n_slides):
        sid = f"toy{i:02d}"
        path = root / "slides" / f"{sid}.svs"
        if not path.is_file():
            scene = random_scene(width_um, height_um, seed=seed * 1000 + i + 100, n_blobs=2, holes=False, pen=False, dust=False)
            make_svs(path, scene, mpp=mpp, magnification=round(10 / mpp), levels=(1, 4))
        with open_slide(path) as slide:
            plan = plan_tiles(slide, segment_slide(slide), TilingParams(magnification=20.0, patch_size=256))
            feats = np.zeros((len(plan), enc.feature_dim), np.float32)
            with PatchReader(plan, slide, out_size=enc.input_size, batch_size=32) as reader:
                for batch in reader:
                    feats[batch.indices] = enc.embed(batch.pixels).float().cpu().numpy()
            attrs = {
                "slide_id": sid, "slide_path": str(path), "model": enc.name, "weights_sha256": enc.weights_sha256,
                "feature_dim": enc.feature_dim, "patch_size": plan.patch_size,
                "patch_size_level0": plan.patch_size_level0, "target_mpp": plan.target_mpp,
                "target_magnification": plan.target_magnification, "level0_mpp": plan.level0_mpp,
                "level0_magnification": plan.level0_magnification, "level0_width": plan.level0_width,
                "level0_height": plan.level0_height, "input_size": enc.input_size, "precision": "fp32",
                "settings": plan.settings,
            }
        bag = write_bag(root / "features" / f"{sid}.h5", feats, plan.coords, attrs)
        slides.append(path)
        bags.append(bag)
        counts.append(len(plan))
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["slide_id", "slide", "features"])
        for p, b in zip(slides, bags, strict=True):
            w.writerow([p.stem, f"slides/{p.name}", f"features/{b.name}"])
    return Stage2ToyData(manifest, slides, bags, counts)
