"""A full-size ViT-L/16 student (started from a weights file, as a lab starts from UNI's: the suite's shared random
ViT-L; ONE optimisation step on the CPU, one patch) exports a ``student.pth``
that loads with ``strict=True`` into the released mSTAR architecture, and through ``--weights``' own loader
(:meth:`Encoder.create`, what ``mstar extract --weights`` calls) holds exactly the exported tensors and embeds. This is also
the suite's one test of the ``mstar`` spec's ViT-L (300 M parameters) with a weights file; the end-to-end command
with a ViT-L is tests/test_extract.py's, against the official transform."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from mstar_extract.pretrain.config import load_config
from mstar_extract.pretrain.stage1.export import export_teacher
from mstar_extract.pretrain.stage1.transmil import TransMIL
from mstar_extract.pretrain.stage2.config import Stage2Config
from mstar_extract.pretrain.stage2.toydata import make_stage2_toy_data
from mstar_extract.pretrain.stage2.train import run_stage2
from mstar_extract.testing.mounts import ram_folder

AGG = dict(in_dim=64, dim=32, heads=2, landmarks=8, pinv_iterations=6, residual_conv_kernel=3, dropout=0.0,
           attn_dropout=0.0)


@pytest.fixture(scope="module")
def vitl_run(vit_large_weights: Path) -> Iterator[dict]:
    with ram_folder("stage2-vitl", gigabytes=7) as root:  # a 3.6 GB checkpoint, a 1.2 GB student.pth
        yield _run(root, vit_large_weights)


def _run(root: Path, init: Path) -> dict:
    data = make_stage2_toy_data(root / "data", n_slides=1, seed=2)
    torch.manual_seed(0)
    teacher = root / "teacher.pt"
    export_teacher(TransMIL(**AGG), AGG, teacher)
    cfg = load_config(Stage2Config, None, [
        f"data.manifest={data.manifest}", f"teacher.file={teacher}", f"student.init={init}", "student.arch=mstar",
        "train.batch_size=1", "data.slides_per_batch=1", "train.max_steps=1", "train.num_workers=0",
        "train.log_every=1", "export.verify=false", f"run.out_dir={root / 'run'}"])  # the test verifies
    res = run_stage2(cfg)
    return {"root": root, "data": data, "res": res}


@pytest.mark.slow
def test_vit_large_student_exports_the_released_format(vitl_run: dict, vit_large_weights: Path) -> None:
    import numpy as np
    import timm

    from mstar_extract.models.encoder import Encoder
    from mstar_extract.models.weights import sha256_file

    res = vitl_run["res"]
    assert res.steps == 1 and len(res.history) == 1
    sd = torch.load(res.student_path, map_location="cpu", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert not any(k.startswith(("module.", "student.", "proj.", "head.")) for k in sd)
    with torch.device("meta"):  # the released architecture, without 8 CPU-seconds of random initialisation
        net = timm.create_model("vit_large_patch16_224", pretrained=False, init_values=1e-5, num_classes=0,
                                dynamic_img_size=True)
    result = net.load_state_dict(sd, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    # through --weights' own loader (registry build + strict load): the exported tensors themselves, and features
    # of one 224-px patch (a ViT-L pass costs ~5 CPU-seconds here; their fidelity to the official transform is
    # tests/test_extract.py's)
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    enc = Encoder.create("mstar", weights=str(res.student_path), device="cpu")
    assert 300e6 < sum(p.numel() for p in enc.model.parameters()) < 310e6  # ViT-L/16
    assert enc.feature_dim == 1024 and enc.weights_sha256 == sha256_file(res.student_path)
    loaded = enc.model.state_dict()
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    feats = enc.embed(x)
    assert feats.shape == (1, 1024) and torch.isfinite(feats).all() and feats.abs().max() > 0
    proj = torch.load(res.proj_path, weights_only=True)["model_state_dict"]
    assert proj["proj.weight"].shape == (32, 1024)
    card = json.loads(res.card_path.read_text())
    assert card["architecture"] == "vit_large_patch16_224" and card["timm_kwargs"]["init_values"] == 1e-5
    assert card["steps"] == 1 and card["feature_dim"] == 1024
    assert card["init"]["weights_path"] == str(vit_large_weights) and card["init"]["weights_source"] != "random"
    assert card["init"]["weights_sha256"] == sha256_file(vit_large_weights)
