#!/usr/bin/env python
"""The deviation figures quoted in docs/reader.md and docs/models.md: ``--fast-decode`` vs exact, bf16/fp16 vs fp32.

On a 40x Aperio-style SVS (the one ``reader_vs_naive.py`` builds, or ``--slide``), tiled with mstar's defaults
(20x, 256 px -> 512-px reads at level 0):

* pixels: the uint8 model inputs of ``--fast-decode`` vs the exact ones (= the official pipeline's, which the
  script checks against :mod:`mstar_extract.testing.official`): mean and max |diff| in grey levels;
* features: a ViT-L with mSTAR's architecture, random weights and every LayerScale gamma set to 0.5 (timm's 1e-5
  makes all outputs alike), on ``--n-features`` patches spread over the slide: relative L2 ``||f - f_ref|| /
  ||f_ref||`` and cosine against fp32 on the exact inputs, for ``--fast-decode`` (fp32) and for bf16 / fp16
  autocast (exact inputs). On the CPU (``--device cpu``) autocast runs bf16/fp16 matmuls through oneDNN; a GPU's
  tensor cores round differently but with the same 8 (bf16) / 11 (fp16) significand bits.

Usage: ``python benchmarks/fidelity_figures.py [--slide-dir DIR] [--n-features 16] [--device cpu] [--json]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def vit_large_gamma05():
    from mstar_extract.testing.official import reference_vit_large

    return reference_vit_large(0.5)


def read(plan, path: Path, decode: str):
    import numpy as np

    from mstar_extract.reading import PatchReader

    out = np.zeros((len(plan), 224, 224, 3), np.uint8)
    with PatchReader(plan, path, "openslide", batch_size=32, decode=decode) as reader:
        for batch in reader:
            out[batch.indices] = batch.pixels
    return out


def feature_stats(f, ref) -> dict[str, float]:
    import numpy as np

    from mstar_extract.testing.official import relative_l2

    rel = relative_l2(f, ref)
    cos = (f * ref).sum(1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(ref, axis=1))
    return {"rel_l2_median": float(np.median(rel)), "rel_l2_max": float(rel.max()), "cos_min": float(cos.min()),
            "cos_median": float(np.median(cos))}


def features(net, pixels, device: str, precision: str):
    import torch

    from mstar_extract.models.encoder import Encoder
    from mstar_extract.models.registry import get_spec
    from mstar_extract.models.weights import ResolvedWeights

    spec = get_spec("mstar")
    enc = Encoder(spec, net, ResolvedWeights("random", None, "random"), torch.device(device), precision)
    out = []
    for i in range(0, len(pixels), 8):
        out.append(enc.embed(pixels[i:i + 8]).cpu().numpy())
    import numpy as np

    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slide-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "mstar-bench")
    ap.add_argument("--slide", type=Path, default=None)
    ap.add_argument("--width", type=int, default=24000)
    ap.add_argument("--height", type=int, default=16000)
    ap.add_argument("--n-features", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precisions", default="bf16,fp16")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np

    sys.path.insert(0, str(Path(__file__).parent))
    from reader_vs_naive import build_slide

    from mstar_extract.pipeline.tile_job import TileSettings, segment_and_plan
    from mstar_extract.slides import open_slide
    from mstar_extract.testing.official import compare_uint8, reference_uint8

    path = args.slide or build_slide(args.slide_dir, args.width, args.height)
    with open_slide(path, backend="openslide") as slide:
        _, plan = segment_and_plan(slide, path.stem, TileSettings(backend="openslide"))
    exact, fast = read(plan, path, "full"), read(plan, path, "reduced")
    official = compare_uint8(exact, reference_uint8(path, plan.coords, plan.level, plan.read_size))
    d = np.abs(fast.astype(np.int16) - exact.astype(np.int16))
    per_patch = d.reshape(len(plan), -1).mean(axis=1)
    res: dict = {"slide": str(path), "n_patches": len(plan), "exact_vs_official_max_abs": official.max_abs,
                 "fast_pixels": {"mean_abs": float(d.mean()), "max_abs": int(d.max()),
                                 "worst_patch_mean_abs": float(per_patch.max()),
                                 "p99_abs": float(np.percentile(d, 99))}}
    rows = np.linspace(0, len(plan) - 1, min(args.n_features, len(plan))).astype(int)
    net = vit_large_gamma05()
    ref = features(net, exact[rows], args.device, "fp32")
    res["n_feature_patches"] = int(rows.shape[0])
    res["fast_fp32"] = feature_stats(features(net, fast[rows], args.device, "fp32"), ref)
    for prec in [p for p in args.precisions.split(",") if p]:
        try:
            res[f"{prec}_exact_inputs"] = feature_stats(features(net, exact[rows], args.device, prec), ref)
        except RuntimeError as exc:  # e.g. fp16 autocast unsupported on this device
            res[f"{prec}_exact_inputs"] = {"error": str(exc).splitlines()[0]}
    between = np.linalg.norm(ref[1:] - ref[:-1], axis=1) / np.linalg.norm(ref[:-1], axis=1)
    res["between_patches_rel_l2_min"] = float(between.min())
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        fp = res["fast_pixels"]
        print(f"{path.name}: {len(plan)} patches; exact vs official max |diff| {official.max_abs}")
        print(f"--fast-decode pixels: mean |diff| {fp['mean_abs']:.3f}, p99 {fp['p99_abs']:.0f}, max {fp['max_abs']}, "
              f"worst patch mean {fp['worst_patch_mean_abs']:.3f} grey levels")
        for key in [k for k in res if k.endswith("_fp32") or k.endswith("_inputs")]:
            v = res[key]
            if "error" in v:
                print(f"{key:18s} {v['error']}")
                continue
            print(f"{key:18s} rel L2 median {v['rel_l2_median']:.2e} max {v['rel_l2_max']:.2e}; "
                  f"cosine min {v['cos_min']:.6f} median {v['cos_median']:.6f}")
        print(f"(neighbouring patches differ by rel L2 >= {res['between_patches_rel_l2_min']:.3f}; "
              f"{rows.shape[0]} patches, random ViT-L with LayerScale gammas 0.5, device {args.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
