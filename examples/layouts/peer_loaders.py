"""Feed the three output layouts of ``mstar extract`` to CLAM's, TRIDENT's and the mSTAR repo's OWN loaders.

    python examples/layouts/peer_loaders.py WORK --clam CLAM --trident TRIDENT --mstar-repo MSTAR

CLAM, TRIDENT and MSTAR are checkouts of github.com/mahmoodlab/CLAM, github.com/mahmoodlab/TRIDENT and
github.com/Innse/mSTAR (the commits checked are named in docs/layouts.md); their code is imported from there,
never copied. Beside mstar's own dependencies their loaders import pandas and scipy (CLAM, mSTAR) and geopandas
and shapely (TRIDENT); put them on PYTHONPATH (e.g. ``pip install --target DIR pandas scipy geopandas shapely``).

In WORK: the test fixture slides (a 40x scan without a 20x level, a 40x scan with one, a 20x scan, a glass-only
slide), then ``mstar extract`` with a random-weight timm ViT-Tiny on the CPU in each layout (``out_mstar``,
``out_clam``, ``out_trident``). Each peer's check runs in its own Python process (CLAM and the mSTAR repo both
have top-level ``utils``/``models`` packages) and prints one ``ok``/``FAIL`` line per check; the last line is
one JSON object. "Features reproduced" means: the patches the peer's loader read, embedded by the same network,
give the features mstar stored (so the loader read exactly the pixels mstar read; the patches are resized to 224
with mstar's own resize, so only the reading is compared). Exit code 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "timm:vit_tiny_patch16_224"
RUN = ["--model", MODEL, "--weights", "random", "--device", "cpu", "--precision", "fp32", "--workers", "1",
       "--backend", "openslide",
       "--batch-size", "16", "--no-report"]
SLIDES = ("svs40", "svs40_l2", "svs20")
"""Slides with tissue: 20x patches read at level 0 (512 px), at a 2x level (256 px), on a 20x scan (256 px)."""

RESULTS: list[dict[str, Any]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append({"check": name, "ok": bool(ok), "detail": detail})
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)


def to_224(img: Any) -> np.ndarray:
    """The transform given to the peers' datasets: mstar's own resize to 224 (:func:`mstar_extract.reading.resize
    .resize_patch`), so that the features compare only which pixels the peer's loader read."""
    from mstar_extract.reading.resize import resize_patch

    return resize_patch(np.ascontiguousarray(np.asarray(img.convert("RGB"))), 224)


def embed(patches: list[np.ndarray]) -> np.ndarray:
    """The features mstar's encoder (same random weights: seeded) gives for uint8 (224, 224, 3) patches."""
    from mstar_extract.models import Encoder

    enc = embed.__dict__.setdefault("enc", None) or Encoder.create(MODEL, "random", device="cpu", precision="fp32")
    embed.__dict__["enc"] = enc
    return enc.embed(np.stack(patches)).cpu().numpy()


def compare(a: np.ndarray, b: np.ndarray) -> tuple[float, str]:
    """(lowest per-patch cosine, a short description) of two (N, D) feature sets."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return float(cos.min()), f"features reproduced: min cosine {cos.min():.6f}, max |d| {np.abs(a - b).max():.2e}"


SAME = 0.9999
"""Lowest cosine that counts as "the same pixels": the features are exact (max |d| 0) when mstar reads the pixels
as stored (the default); ``--fast-decode`` moves them by about a grey level (cosine > 0.99999), while a wrong
footprint gives cosine < 0.99 (see the mSTAR fallback check)."""


# ------------------------------------------------------------------------------------------------- prepare
def paths(work: Path) -> dict[str, Path]:
    return {"slides": work / "fx" / "slides", **{k: work / f"out_{k}" for k in ("mstar", "clam", "trident")}}


def prepare(work: Path) -> dict[str, Path]:
    """Fixture slides and one OUT per layout (reused when already there)."""
    from mstar_extract.testing.cli import run_mstar
    from mstar_extract.testing.fixtures import build_fixture_set, make_svs
    from mstar_extract.testing.scene import random_scene

    outs = paths(work)
    slides = outs["slides"]
    if not (slides / "svs40_l2.svs").exists():
        build_fixture_set(work / "fx", small=True)
        make_svs(slides / "svs40_l2.svs", random_scene(1500.0, 1000.0, seed=1, border=True), 0.25, 40, levels=(1, 2, 8))
    for layout in ("mstar", "clam", "trident"):
        fresh = not outs[layout].exists()
        r = run_mstar("extract", slides, outs[layout], "--layout", layout, *RUN,
                      env={**os.environ, "MSTAR_PROGRESS_INTERVAL": "3600"})
        if r.returncode != 0:
            sys.exit(f"mstar extract --layout {layout} failed:\n{r.stderr}")
        warned = [ln for ln in r.stderr.splitlines() if "misread by CLAM-style readers" in ln]
        if fresh and layout == "mstar":
            check("mstar extract --layout mstar warns once about the 20x scan's TRIDENT-style coords", len(warned) == 1,
                  warned[0] if warned else "no warning")
        if fresh and layout != "mstar":
            check(f"mstar extract --layout {layout} does not warn", not warned)
    return outs


def bag_of(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        return f["features"][()], f["coords"][()]


# ------------------------------------------------------------------------------------------------- CLAM
def check_clam(clam: Path, out: Path, slides: Path, work: Path) -> None:
    """CLAM's extract_features_fp.py pieces (Dataset_All_Bags, Whole_Slide_Bag_FP) and its training dataset."""
    import openslide
    import torch

    sys.path.insert(0, str(clam))
    os.chdir(clam)
    from dataset_modules.dataset_generic import Generic_MIL_Dataset
    from dataset_modules.dataset_h5 import Dataset_All_Bags, Whole_Slide_Bag_FP

    bags = Dataset_All_Bags(str(out / "manifest.csv"))
    ids = sorted(str(bags[i]) for i in range(len(bags)))
    check("CLAM Dataset_All_Bags(OUT/manifest.csv) lists the slide ids", set(SLIDES) <= set(ids), str(ids))
    for sid in SLIDES:
        wsi = openslide.open_slide(str(slides / f"{sid}.svs"))
        ds = Whole_Slide_Bag_FP(file_path=str(out / "patches" / f"{sid}.h5"), wsi=wsi,
                                img_transforms=to_224)
        items = [ds[i] for i in range(len(ds))]
        feats, coords = bag_of(out / "h5_files" / f"{sid}.h5")
        footprint = int(ds.patch_size * wsi.level_downsamples[int(ds.patch_level)])
        same_xy = np.array_equal(np.stack([it["coord"] for it in items]), coords)
        cos, how = compare(embed([it["img"] for it in items]), feats)
        check(f"CLAM Whole_Slide_Bag_FP(patches/{sid}.h5)", same_xy and footprint == 512 // (2 if sid == "svs20" else 1)
              and cos >= SAME, f"patch_level {int(ds.patch_level)}, patch_size {int(ds.patch_size)} = {footprint} level-0 "
                               f"px; {len(items)} patches; {how}")
    csv = work / "clam_labels.csv"
    csv.write_text("case_id,slide_id,label\n" + "".join(f"p{i},{s},{'a' if i % 2 else 'b'}\n" for i, s in enumerate(SLIDES)))
    mil = Generic_MIL_Dataset(csv_path=str(csv), data_dir=str(out), shuffle=False, print_info=False,
                              label_dict={"a": 0, "b": 1}, patient_strat=False, ignore=[])
    for i, sid in enumerate(SLIDES):
        pt_feats, _ = mil[i]
        h5_feats = bag_of(out / "h5_files" / f"{sid}.h5")[0]
        check(f"CLAM Generic_MIL_Dataset loads pt_files/{sid}.pt", isinstance(pt_feats, torch.Tensor)
              and np.array_equal(pt_feats.numpy(), h5_feats), f"{tuple(pt_feats.shape)}")
    mil.load_from_h5(True)
    f, _, c = mil[0]
    check("CLAM Generic_MIL_Dataset.load_from_h5(True) reads h5_files/<id>.h5", f.shape[0] == c.shape[0] > 0,
          f"features {tuple(f.shape)}, coords {tuple(c.shape)}")


# ------------------------------------------------------------------------------------------------- mSTAR repo
def check_mstar_repo(repo: Path, outs: dict[str, Path], work: Path) -> None:
    """The mSTAR repo's Feature_extract dataset, and its diagnosis and survival downstream datasets."""
    import openslide

    slides, out = outs["slides"], outs["clam"]
    sys.path.insert(0, str(repo / "Feature_extract"))
    from dataset.dataset_h5 import Whole_Slide_Bag_FP

    def loader(coords_file: Path, sid: str):
        wsi = openslide.open_slide(str(slides / f"{sid}.svs"))
        return wsi, Whole_Slide_Bag_FP(file_path=str(coords_file), wsi=wsi, custom_transforms=to_224,
                                       fast_read=True)

    for sid in SLIDES:
        wsi, ds = loader(out / "patches" / f"{sid}.h5", sid)
        feats, coords = bag_of(out / "h5_files" / f"{sid}.h5")
        items = [ds[i] for i in range(len(ds))]
        cos, how = compare(embed([img for img, _ in items]), feats)
        check(f"mSTAR Feature_extract Whole_Slide_Bag_FP(patches/{sid}.h5)", cos >= SAME and np.array_equal(ds.coords, coords),
              f"patch_level {int(ds.patch_level)}, patch_size {int(ds.patch_size)}; {how}")
    # the misread the issue describes: the same class given TRIDENT-style coords (the mstar layout's default)
    wsi, ds = loader(outs["mstar"] / "coords" / "svs20.h5", "svs20")
    feats, _ = bag_of(outs["mstar"] / "features" / "svs20.h5")
    cos, how = compare(embed([ds[i][0] for i in range(len(ds))]), feats)
    check("mSTAR Feature_extract given TRIDENT-style coords of the 20x scan falls back (as warned)",
          (int(ds.patch_level), int(ds.patch_size)) == (0, 512) and cos < 0.99,
          f"reads patch_level {int(ds.patch_level)}, patch_size {int(ds.patch_size)} for 256-px patches: min cosine {cos:.4f}")

    sys.path.insert(0, str(repo / "downstream_task" / "diagnosis_preidction"))
    from datasets.Subtyping import Dataset_Subtyping

    csv = work / "mstar_subtyping.csv"
    csv.write_text("case,slide,label,fold\n" + "".join(f"p{i},{s},{'A' if i % 2 else 'B'},train\n" for i, s in enumerate(SLIDES)))
    sub = Dataset_Subtyping(root=str(out), csv_file=str(csv), feature="pt_files")
    _, x, _ = sub[0]
    check("mSTAR diagnosis Dataset_Subtyping(root=OUT, feature='pt_files')",
          np.array_equal(x.numpy(), bag_of(out / "h5_files" / f"{SLIDES[0]}.h5")[0]),
          f"{tuple(x.shape)}, n_features {sub.n_features}")
    for mod in [m for m in sys.modules if m == "datasets" or m.startswith("datasets.")]:
        del sys.modules[mod]
    sys.path.insert(0, str(repo / "downstream_task" / "survival_prediction"))
    from datasets.TCGA_Survival import TCGA_Survival

    root = work / "survival_root"
    root.mkdir(exist_ok=True)
    if not (root / "TCGA-TOY").exists():
        (root / "TCGA-TOY").symlink_to(out.resolve())
    rows = [f"TCGA-TOY,p{i},{10 + 7 * i},{i % 2},{SLIDES[i % 3]}.pt,train" for i in range(10)]
    csv = work / "mstar_survival.csv"
    csv.write_text("Study,ID,Event,Status,WSI,split\n" + "\n".join(rows) + "\n")
    surv = TCGA_Survival(csv_file=str(csv), feature_path=str(root), modal="WSI", study="TOY", feature=".")
    _, wsi_feats, *_ = surv[0]
    check("mSTAR survival TCGA_Survival(feature_path, study, feature='.') with OUT as TCGA-<study>",
          np.array_equal(wsi_feats.numpy(), bag_of(out / "h5_files" / f"{SLIDES[0]}.h5")[0]), f"{tuple(wsi_feats.shape)}")


# ------------------------------------------------------------------------------------------------- TRIDENT
def check_trident(trident: Path, out: Path, slides: Path, work: Path) -> None:
    """TRIDENT's coords reader and patcher, its patch-feature step on our coords, and its Processor jobs on OUT."""
    import h5py
    import torch

    sys.path.insert(0, str(trident))
    from trident import load_wsi
    from trident.IO import read_coords
    from trident.patch_encoder_models.load import CustomInferenceEncoder

    class Embed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # uint8 (B, 224, 224, 3) from the transform below
            return torch.from_numpy(embed(list(x.numpy())))

    job = "20x_256px_0px_overlap"
    enc_name = "timm-vit_tiny_patch16_224"
    for sid in SLIDES:
        coords_path = out / job / "patches" / f"{sid}_patches.h5"
        attrs, coords = read_coords(str(coords_path))
        wsi = load_wsi(slide_path=str(slides / f"{sid}.svs"), lazy_init=False)
        patcher = wsi.create_patcher(patch_size=attrs["patch_size"], src_mag=attrs["level0_magnification"],
                                     dst_mag=attrs["target_magnification"], custom_coords=coords, coords_only=True)
        check(f"TRIDENT read_coords + create_patcher({sid}_patches.h5)",
              patcher.patch_size_src == attrs["patch_size_level0"] == 512 // (2 if sid == "svs20" else 1),
              f"patch_size {attrs['patch_size']} at {attrs['target_magnification']}x of a "
              f"{attrs['level0_magnification']}x scan: {patcher.patch_size_src} level-0 px, {len(coords)} patches")
        # TRIDENT's own patch-feature step on our coordinates (it reads at its level, resizes to 256, then the
        # encoder to 224: two resizes instead of mstar's one, so close, not equal)
        encoder = CustomInferenceEncoder(enc_name, Embed(), lambda img: torch.from_numpy(to_224(img).copy()),
                                         torch.float32)
        theirs = wsi.extract_patch_features(encoder, str(coords_path), str(work / "trident_features"), device="cpu",
                                            batch_limit=64)
        with h5py.File(theirs, "r") as f:
            t_feats, t_coords = f["features"][()], f["coords"][()]
        feats, coords_ours = bag_of(out / job / f"features_{enc_name}" / f"{sid}.h5")
        cos, how = compare(t_feats, feats)
        check(f"TRIDENT extract_patch_features on {sid}_patches.h5 matches our bag",
              np.array_equal(t_coords, coords_ours) and cos > 0.999, how)
    check_trident_jobs(out, slides, job, enc_name)


def check_trident_jobs(out: Path, slides: Path, job: str, enc_name: str) -> None:
    """TRIDENT's Processor on OUT as its job folder: patching and patch features already done, slide features."""
    import h5py
    import torch
    from trident import Processor
    from trident.patch_encoder_models.load import CustomInferenceEncoder
    from trident.slide_encoder_models.load import MeanSlideEncoder

    proc = Processor(job_dir=str(out), wsi_source=str(slides), wsi_ext=[".svs"])
    patches = {p.name: p.stat().st_mtime_ns for p in (out / job / "patches").glob("*.h5")}
    proc.run_patching_job(target_magnification=20, patch_size=256, overlap=0, visualize=False)
    check("TRIDENT Processor.run_patching_job(20x, 256 px) on OUT finds every coords file done (nothing recomputed)",
          patches == {p.name: p.stat().st_mtime_ns for p in (out / job / "patches").glob("*.h5")} and len(patches) == 4,
          f"{len(patches)} files in {job}/patches")
    feats_dir = out / job / f"features_{enc_name}"
    before = {p.name: p.stat().st_mtime_ns for p in feats_dir.glob("*.h5")}
    encoder = CustomInferenceEncoder(enc_name, torch.nn.Identity(), lambda img: img, torch.float32)  # never called
    proc.run_patch_feature_extraction_job(coords_dir=job, patch_encoder=encoder, device="cpu", saveas="h5")
    after = {p.name: p.stat().st_mtime_ns for p in feats_dir.glob("*.h5")}
    check("TRIDENT Processor.run_patch_feature_extraction_job on OUT finds every bag done (nothing recomputed)",
          before == after and len(before) == 4, f"{len(before)} bags in {feats_dir.relative_to(out)}")
    slide_enc = MeanSlideEncoder(model_name=f"mean-{enc_name}")
    proc.run_slide_feature_extraction_job(slide_encoder=slide_enc, coords_dir=job, device="cpu")
    for sid in SLIDES:
        with h5py.File(out / job / f"slide_features_mean-{enc_name}" / f"{sid}.h5", "r") as f:
            emb = f["features"][()]
        feats, _ = bag_of(out / job / f"features_{enc_name}" / f"{sid}.h5")
        check(f"TRIDENT run_slide_feature_extraction_job (mean) reads features_{enc_name}/{sid}.h5",
              np.allclose(emb.reshape(-1), feats.mean(0), atol=1e-5), f"slide embedding {emb.shape}")
    import geopandas as gpd

    n = [len(gpd.read_file(out / "contours_geojson" / f"{s}.geojson")) for s in SLIDES]
    check("TRIDENT's GeoJSON reader (geopandas) reads contours_geojson/", all(k > 0 for k in n), f"polygons {n}")


# ------------------------------------------------------------------------------------------------- main
def run_child(which: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One peer's checks in a fresh process (their package names collide); returns its results."""
    cmd = [sys.executable, __file__, str(args.work), "--only", which, "--clam", str(args.clam),
           "--trident", str(args.trident), "--mstar-repo", str(args.mstar_repo)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("ok  ", "FAIL"))]
    print("\n".join(lines), flush=True)
    if r.returncode != 0 and not lines:
        print(r.stdout[-3000:], r.stderr[-3000:], sep="\n")
        return [{"check": which, "ok": False, "detail": "crashed"}]
    try:
        return json.loads(r.stdout.strip().splitlines()[-1])["results"]
    except (ValueError, IndexError, KeyError):
        print(r.stderr[-3000:])
        return [{"check": which, "ok": False, "detail": "no result"}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path)
    p.add_argument("--clam", type=Path, required=True)
    p.add_argument("--trident", type=Path, required=True)
    p.add_argument("--mstar-repo", type=Path, required=True)
    p.add_argument("--only", choices=("clam", "trident", "mstar"), default=None)
    args = p.parse_args(argv)
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    outs = paths(args.work) if args.only else prepare(args.work)
    checks: dict[str, Callable[[], None]] = {
        "clam": lambda: check_clam(args.clam.resolve(), outs["clam"], outs["slides"], args.work),
        "mstar": lambda: check_mstar_repo(args.mstar_repo.resolve(), outs, args.work),
        "trident": lambda: check_trident(args.trident.resolve(), outs["trident"], outs["slides"], args.work),
    }
    if args.only:
        checks[args.only]()
        print(json.dumps({"results": RESULTS}))
        return 0
    results = RESULTS + [r for which in checks for r in run_child(which, args)]
    failed = [r["check"] for r in results if not r["ok"]]
    print(json.dumps({"checks": len(results), "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
