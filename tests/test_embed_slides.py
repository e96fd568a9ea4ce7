"""`mstar embed-slides` and `mstar extract --slide-encoder`: real HDF5 bags, a real exported aggregator, the
real TransMIL; each embedding equals the aggregator applied by hand to all of the bag's patches."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mstar_extract.pretrain.stage1.export import export_mstar, export_teacher
from mstar_extract.pretrain.stage1.transmil import TransMIL
from mstar_extract.store.bags import write_bag
from mstar_extract.testing.cli import run_mstar

DIM = 16
AGG = dict(in_dim=DIM, dim=24, heads=2, landmarks=8, pinv_iterations=6, residual_conv_kernel=3, dropout=0.25,
           attn_dropout=0.1)
FEATS = {"model": "timm:test_vit", "weights_sha256": "ab" * 32, "feature_dim": DIM}


def cli(*args: object):
    """The real command line, in this process (a subprocess per call would spend seconds importing torch)."""
    from click.testing import CliRunner

    from mstar_extract.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    r.returncode = r.exit_code
    return r


def make_bag(path: Path, n: int, seed: int, model: str = FEATS["model"], sha: str = FEATS["weights_sha256"],
             dim: int = DIM) -> Path:
    """A complete bag as `mstar extract` writes it (every required attribute), with random features."""
    rng = np.random.default_rng(seed)
    side = max(1, int(np.ceil(np.sqrt(n))))
    coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1) * 512
    attrs = {"slide_id": path.stem, "slide_path": f"/slides/{path.stem}.svs", "model": model, "weights_sha256": sha,
             "feature_dim": dim, "patch_size": 256, "patch_size_level0": 512, "target_mpp": 0.5,
             "target_magnification": 20.0, "level0_mpp": 0.25, "level0_magnification": 40.0, "level0_width": 10000,
             "level0_height": 8000, "input_size": 224, "precision": "fp32", "settings": {}}
    return write_bag(path, rng.normal(size=(n, dim)).astype(np.float32), coords, attrs)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("embed")
    torch.manual_seed(3)
    agg = TransMIL(**AGG)
    for p in agg.parameters():  # away from the near-zero init, so a wrong patch order or subset shows
        p.data.add_(0.05 * torch.randn_like(p))
    teacher = export_teacher(agg, AGG, root / "teacher.pt", feature_model=FEATS)
    mstar = export_mstar(agg, root / "aggregator_mstar.pth", AGG, FEATS)
    bags = root / "bags"
    made = {"a": make_bag(bags / "a.h5", 300, 1), "b": make_bag(bags / "b.h5", 7, 2), "c": make_bag(bags / "c.h5", 1, 3)}
    return {"root": root, "teacher": teacher, "mstar": mstar, "bags": bags, "made": made}


def by_hand(aggregator_file: Path, bag: Path) -> np.ndarray:
    """The aggregator's state dict loaded into a fresh TransMIL, eval mode, over every patch in bag order."""
    obj = torch.load(aggregator_file, weights_only=True)
    net = TransMIL(**obj["aggregator"])
    net.load_state_dict(obj["state_dict"])
    with h5py.File(bag, "r") as f:
        x = torch.from_numpy(f["features"][()]).float()
    with torch.no_grad():
        return net.eval()(x[None])[0].numpy()


def read_embedding(path: Path) -> tuple[np.ndarray, dict]:
    with h5py.File(path, "r") as f:
        return f["embedding"][()], dict(f.attrs)


def test_embeddings_equal_the_aggregator_by_hand_with_provenance_and_table(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_mstar("embed-slides", world["bags"], out, "--aggregator", world["teacher"], "--device", "cpu", "--jsonl")
    assert r.returncode == 0, r.stderr
    sha = hashlib.sha256(world["teacher"].read_bytes()).hexdigest()
    for sid, bag in world["made"].items():
        emb, attrs = read_embedding(out / "slide_features" / f"{sid}.h5")
        np.testing.assert_allclose(emb, by_hand(world["teacher"], bag), rtol=1e-5, atol=1e-5)
        assert attrs["aggregator_sha256"] == sha and attrs["complete"] == 1
        assert attrs["feature_model"] == FEATS["model"] and attrs["feature_weights_sha256"] == FEATS["weights_sha256"]
        with h5py.File(bag, "r") as f:
            assert attrs["n_patches"] == f["features"].shape[0]
    with h5py.File(out / "slide_features.h5", "r") as f:
        ids = [s.decode() if isinstance(s, bytes) else s for s in f["slide_ids"][()]]
        assert ids == ["a", "b", "c"] and f["embeddings"].shape == (3, AGG["dim"])
        np.testing.assert_allclose(f["embeddings"][0], by_hand(world["teacher"], world["made"]["a"]), rtol=1e-5, atol=1e-5)
        assert f.attrs["aggregator_sha256"] == sha
    rows = list(csv.DictReader(open(out / "slide_features.csv")))
    assert [(r["slide_id"], r["n_patches"]) for r in rows] == [("a", "300"), ("b", "7"), ("c", "1")]
    events = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [e["slide_id"] for e in events if e["event"] == "done"] == ["a", "b", "c"]
    # mSTAR's downstream layout of the same aggregator gives the same embeddings
    out2 = tmp_path / "out2"
    assert cli("embed-slides", world["bags"] / "a.h5", out2, "--aggregator", world["mstar"], "-q").returncode == 0
    np.testing.assert_allclose(read_embedding(out2 / "slide_features" / "a.h5")[0],
                               read_embedding(out / "slide_features" / "a.h5")[0], rtol=1e-6, atol=1e-6)


def test_rerun_skips_current_redoes_stale_and_refuses_another_aggregator(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    bags = tmp_path / "bags"
    make_bag(bags / "x.h5", 20, 5)
    make_bag(bags / "y.h5", 30, 6)
    assert cli("embed-slides", bags, out, "--aggregator", world["teacher"], "-q").returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "slide_features").glob("*.h5")}
    r = cli("embed-slides", bags, out, "--aggregator", world["teacher"], "--jsonl")
    assert r.returncode == 0
    assert [json.loads(ln)["event"] for ln in r.stdout.splitlines()].count("skipped") == 2
    assert {p.name: p.stat().st_mtime_ns for p in (out / "slide_features").glob("*.h5")} == before
    manifest = list(csv.DictReader(open(out / "slide_features" / "manifest.csv")))
    assert sorted((m["slide_id"], m["status"]) for m in manifest) == [("x", "done"), ("y", "done")]
    # a re-extracted bag (new content) is embedded again
    make_bag(bags / "x.h5", 25, 7)
    assert cli("embed-slides", bags, out, "--aggregator", world["teacher"], "-q").returncode == 0
    emb, attrs = read_embedding(out / "slide_features" / "x.h5")
    assert attrs["n_patches"] == 25
    np.testing.assert_allclose(emb, by_hand(world["teacher"], bags / "x.h5"), rtol=1e-5, atol=1e-5)
    # another aggregator: refused per slide without --overwrite, redone with it
    torch.manual_seed(9)
    other = export_teacher(TransMIL(**AGG), AGG, tmp_path / "other.pt", feature_model=FEATS)
    r = cli("embed-slides", bags, out, "--aggregator", other)
    assert r.returncode == 1 and "another aggregator" in r.stderr and "--overwrite" in r.stderr
    assert cli("embed-slides", bags, out, "--aggregator", other, "--overwrite", "-q").returncode == 0
    np.testing.assert_allclose(read_embedding(out / "slide_features" / "y.h5")[0], by_hand(other, bags / "y.h5"),
                               rtol=1e-5, atol=1e-5)


def test_bags_of_another_extractor_fail_with_the_reason(world: dict, tmp_path: Path) -> None:
    bags = tmp_path / "bags"
    make_bag(bags / "good.h5", 10, 1)
    make_bag(bags / "uni.h5", 10, 2, model="uni")
    make_bag(bags / "otherweights.h5", 10, 3, sha="cd" * 32)
    make_bag(bags / "wide.h5", 10, 4, dim=DIM + 1)
    make_bag(bags / "empty.h5", 0, 5)
    (bags / "broken.h5").write_bytes(b"not hdf5")
    out = tmp_path / "out"
    r = cli("embed-slides", bags, bags / "missing.h5", out, "--aggregator", world["teacher"])
    assert r.returncode == 1
    rows = {m["slide_id"]: m for m in csv.DictReader(open(out / "slide_features" / "manifest.csv"))}
    assert rows["good"]["status"] == "done" and rows["empty"]["status"] == "no_tissue"
    assert "features from model uni" in rows["uni"]["error"] and "timm:test_vit" in rows["uni"]["error"]
    assert "weights cdcdcdcdcdcd" in rows["otherweights"]["error"]
    assert f"{DIM + 1}-d" in rows["wide"]["error"]
    assert rows["broken"]["status"] == "failed" and rows["missing"]["error"].endswith("bag not found")
    assert "Traceback" not in r.stderr
    assert sorted(p.name for p in (out / "slide_features").glob("*.h5")) == ["good.h5"]


def test_usage_errors_exit_2(world: dict, tmp_path: Path) -> None:
    r = cli("embed-slides", world["bags"], tmp_path / "o", "--aggregator", tmp_path / "nope.pt")
    assert r.returncode == 2 and "aggregator file not found" in r.stderr
    r = cli("embed-slides", tmp_path, tmp_path / "o", "--aggregator", world["teacher"])
    assert r.returncode == 2 and "no feature bags" in r.stderr


@pytest.mark.slow
def test_extract_with_slide_encoder_embeds_each_bag(fixture_slides: dict, tmp_path: Path) -> None:
    """The hook: `extract --slide-encoder` writes the embedding of each new bag, equal to embed-slides' (the bags
    record weights 'random' and the 64-d test_vit, which this aggregator says it was trained on)."""
    agg_cfg = {**AGG, "in_dim": 64}
    torch.manual_seed(4)
    agg = export_teacher(TransMIL(**agg_cfg), agg_cfg, tmp_path / "t.pt",
                         feature_model={"model": "timm:test_vit", "weights_sha256": "random", "feature_dim": 64})
    slide = fixture_slides["svs20"].path
    out = tmp_path / "out"
    args = ("extract", slide, out, "--model", "timm:test_vit", "--weights", "random", "--workers", "0", "--no-qc",
            "--no-report", "-q")
    r = cli(*args, "--slide-encoder", agg)
    assert r.returncode == 0, r.stderr
    sid = slide.name.split(".")[0]
    emb, attrs = read_embedding(out / "slide_features" / f"{sid}.h5")
    np.testing.assert_allclose(emb, by_hand(agg, out / "features" / f"{sid}.h5"), rtol=1e-5, atol=1e-5)
    assert (out / "slide_features.csv").is_file()
    # an aggregator trained on other features is refused before any work
    bad = export_teacher(TransMIL(**agg_cfg), agg_cfg, tmp_path / "bad.pt",
                         feature_model={"model": "uni", "weights_sha256": "ef" * 32, "feature_dim": 64})
    r = cli(*args[:2], tmp_path / "out_bad", *args[3:], "--slide-encoder", bad)
    assert r.returncode == 2 and "--slide-encoder: features from model timm:test_vit" in r.stderr
    assert not (tmp_path / "out_bad" / "features").exists()
