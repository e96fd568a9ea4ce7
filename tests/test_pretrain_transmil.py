"""TransMIL aggregator: shapes, masking, per-patch outputs, Nyström pseudo-inverse, export layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mstar_extract.pretrain.stage1.export import export_mstar, export_teacher, load_teacher, mstar_to_transmil_state
from mstar_extract.pretrain.stage1.transmil import NystromAttention, TransMIL, moore_penrose_pinv


def small(**kw: int) -> TransMIL:
    args = dict(in_dim=24, dim=32, heads=4, landmarks=8)
    args.update(kw)
    torch.manual_seed(0)
    return TransMIL(**args).eval()


def test_default_architecture_and_shapes() -> None:
    torch.manual_seed(0)
    m = TransMIL().eval()  # the paper (docs/pretrain.md): 1024 → 512, 8 heads, 256 landmarks
    assert m._fc1[0].in_features == 1024 and m._fc1[0].out_features == 512
    assert isinstance(m._fc1[1], torch.nn.ReLU) and m._fc1[2].p == 0.25
    assert m.layer1.attn.heads == 8 and m.layer1.attn.landmarks == 256 and m.cls_token.shape == (1, 1, 512)
    with torch.no_grad():
        out = m(torch.randn(2, 300, 1024))
    assert out.shape == (2, 512) and torch.isfinite(out).all()


@pytest.mark.parametrize("n", [1, 2, 7, 16, 37, 100])
def test_any_bag_size(n: int) -> None:
    m = small()
    with torch.no_grad():
        cls, patches = m.patch_embeddings(torch.randn(3, n, 24))
        assert cls.shape == (3, 32) and patches.shape == (3, n, 32)
        x = torch.randn(2, n, 24)
        assert torch.allclose(m(x), m.patch_embeddings(x)[0], atol=1e-6)


def test_wrong_input_dim_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"\(B, N, 24\)"):
        small()(torch.randn(1, 5, 23))


def test_mask_equals_unpadded_runs() -> None:
    m = small()
    lengths = [5, 17, 30]
    x = torch.randn(3, 30, 24)
    mask = torch.zeros(3, 30, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    x[~mask] = 1e3  # padding garbage must not leak in
    with torch.no_grad():
        batched = m(x, mask)
        cls_b, patches_b = m.patch_embeddings(x, mask)
        for i, n in enumerate(lengths):
            alone_cls, alone_patches = m.patch_embeddings(x[i : i + 1, :n])
            assert torch.allclose(batched[i], alone_cls[0], atol=1e-5)
            assert torch.allclose(cls_b[i], alone_cls[0], atol=1e-5)
            assert torch.allclose(patches_b[i, :n], alone_patches[0], atol=1e-5)
            assert (patches_b[i, n:] == 0).all()


def test_patch_embeddings_depend_on_context() -> None:
    m = small()
    x = torch.randn(1, 20, 24)
    with torch.no_grad():
        _, full = m.patch_embeddings(x)
        _, part = m.patch_embeddings(x[:, :10])
    assert not torch.allclose(full[0, :10], part[0], atol=1e-4)  # whole-slide context changes each patch's output


def test_pinv_iteration_approximates_pseudo_inverse() -> None:
    torch.manual_seed(0)
    a = (torch.randn(2, 3, 16, 16) * 2).softmax(-1).double()
    z = moore_penrose_pinv(a, iterations=20)
    assert torch.allclose(z, torch.linalg.pinv(a), atol=1e-6)
    z6 = moore_penrose_pinv(a, iterations=6)
    assert (a @ z6 @ a - a).abs().max() < 0.05


def test_nystrom_equals_softmax_attention_when_each_landmark_is_one_token() -> None:
    torch.manual_seed(0)
    att = NystromAttention(dim=16, heads=2, landmarks=8, pinv_iterations=30, residual_conv_kernel=0, dropout=0.0).eval()
    x = torch.randn(1, 8, 16)
    with torch.no_grad():
        out = att(x)
        q, k, v = att.to_qkv(x).chunk(3, dim=-1)
        split = lambda t: t.reshape(1, 8, 2, 8).transpose(1, 2)  # noqa: E731
        ref = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
        ref = att.to_out(ref.transpose(1, 2).reshape(1, 8, 16))
    assert torch.allclose(out, ref, atol=1e-4)


def test_bf16_autocast_runs_and_stays_close() -> None:
    m = small()
    x = torch.randn(2, 50, 24)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
    assert torch.isfinite(out).all() and (out.float() - ref).abs().max() < 0.2


def test_gradients_reach_every_parameter() -> None:
    m = small().train()
    m(torch.randn(2, 20, 24)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_exports_load_back(tmp_path: Path) -> None:
    m = small()
    x = torch.randn(1, 12, 24)
    cfg = dict(in_dim=24, dim=32, heads=4, landmarks=8, pinv_iterations=6, residual_conv_kernel=33, dropout=0.25,
               attn_dropout=0.1)
    t = load_teacher(export_teacher(m, cfg, tmp_path / "teacher.pt", {"step": 3}))
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    with torch.no_grad():
        assert torch.equal(t.patch_embeddings(x)[1], m.patch_embeddings(x)[1])
    obj = torch.load(export_mstar(m, tmp_path / "agg.pth"), weights_only=True)
    keys = set(obj["model_state_dict"])
    # the module names of mSTAR's downstream TransMIL (Nyström attention as in TransMIL's code)
    for k in ("vision_encoder._fc1.0.weight", "vision_encoder.cls_token", "vision_encoder.layer1.attn.to_qkv.weight",
              "vision_encoder.layer2.attn.to_out.0.bias", "vision_encoder.layer1.attn.res_conv.weight",
              "vision_encoder.pos_layer.proj2.weight", "vision_encoder.norm.weight", "vision_encoder.layer2.norm.bias"):
        assert k in keys
    fresh = small()
    torch.nn.init.zeros_(fresh.cls_token)
    fresh.load_state_dict(mstar_to_transmil_state(obj), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))


def test_load_teacher_rejects_other_files(tmp_path: Path) -> None:
    from mstar_extract.errors import MstarError

    torch.save({"model": 1}, tmp_path / "x.pt")
    with pytest.raises(MstarError, match="not a stage-1 teacher file"):
        load_teacher(tmp_path / "x.pt")
