"""A full-size ViT-L/16 student (random init, ONE optimisation step on the CPU, batch 2) exports a ``student.pth``
that loads with ``strict=True`` into the released mSTAR architecture and drives ``mstar extract --weights``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mstar_extract.pretrain.config import load_config
from mstar_extract.pretrain.stage1.export import export_teacher
from mstar_extract.pretrain.stage1.transmil import TransMIL
from mstar_extract.pretrain.stage2.config import Stage2Config
from mstar_extract.pretrain.stage2.toydata import make_stage2_toy_data
from mstar_extract.pretrain.stage2.train import run_stage2

AGG = dict(in_dim=64, dim=32, heads=2, landmarks=8, pinv_iterations=6, residual_conv_kernel=3, dropout=0.0,
           attn_dropout=0.0)


@pytest.fixture(scope="module")
def vitl_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("stage2_vitl")
    data = make_stage2_toy_data(root / "data", n_slides=1, seed=2)
    torch.manual_seed(0)
    teacher = root / "teacher.pt"
    export_teacher(TransMIL(**AGG), AGG, teacher)
    cfg = load_config(Stage2Config, None, [
        f"data.manifest={data.manifest}", f"teacher.file={teacher}", "student.init=random", "student.arch=mstar",
        "train.batch_size=2", "data.slides_per_batch=1", "train.max_steps=1", "train.num_workers=0",
        "train.log_every=1", f"run.out_dir={root / 'run'}"])
    res = run_stage2(cfg)
    return {"root": root, "data": data, "res": res}


@pytest.mark.slow
def test_vit_large_student_exports_the_released_format(vitl_run: dict) -> None:
    import timm

    res = vitl_run["res"]
    assert res.steps == 1 and len(res.history) == 1
    sd = torch.load(res.student_path, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert not any(k.startswith(("module.", "student.", "proj.", "head.")) for k in sd)
    net = timm.create_model("vit_large_patch16_224", pretrained=False, init_values=1e-5, num_classes=0,
                            dynamic_img_size=True)
    result = net.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    out = net.eval()(torch.zeros(1, 3, 224, 224))
    assert out.shape == (1, 1024) and torch.isfinite(out).all()
    proj = torch.load(res.proj_path, weights_only=True)["model_state_dict"]
    assert proj["proj.weight"].shape == (32, 1024)
    card = json.loads(res.card_path.read_text())
    assert card["architecture"] == "vit_large_patch16_224" and card["timm_kwargs"]["init_values"] == 1e-5
    assert card["steps"] == 1 and card["feature_dim"] == 1024


@pytest.mark.slow
def test_exported_student_runs_through_mstar_extract(vitl_run: dict, tmp_path: Path) -> None:
    from mstar_extract.store.bags import validate_bag
    from mstar_extract.testing.fixtures import make_svs
    from mstar_extract.testing.scene import random_scene

    slide = make_svs(tmp_path / "small.svs", random_scene(700.0, 500.0, seed=9, n_blobs=1, holes=False, pen=False,
                                                          dust=False), mpp=0.5, magnification=20, levels=(1, 4))
    student = vitl_run["res"].student_path
    from mstar_extract.testing.cli import run_mstar

    out = tmp_path / "out"
    proc = run_mstar("extract", slide, out, "--weights", student, "--device", "cpu", "--batch-size", "8", timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from mstar_extract.models.weights import sha256_file

    bag = out / "features" / "small.h5"
    assert validate_bag(bag, {"feature_dim": 1024, "weights_sha256": sha256_file(student)}) is None
