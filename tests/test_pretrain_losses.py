"""Stage-1 losses: InfoNCE against a direct computation, masking, triplet, temperatures."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mstar_extract.pretrain.stage1.losses import Temperatures, batch_hard_triplet, info_nce, stage1_losses


def reference_info_nce(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    s = scale * a @ b.t()
    n = len(a)
    l1 = -sum(math.log(math.exp(s[i, i]) / sum(math.exp(s[i, j]) for j in range(n))) for i in range(n)) / n
    l2 = -sum(math.log(math.exp(s[i, i]) / sum(math.exp(s[j, i]) for j in range(n))) for i in range(n)) / n
    return float((l1 + l2) / 2)


def test_info_nce_matches_the_formula() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(6, 8).double(), torch.randn(6, 8).double()
    got = info_nce(a, b, torch.tensor(1 / 0.07))
    assert abs(float(got) - reference_info_nce(a, b, 1 / 0.07)) < 1e-4
    aligned = info_nce(a, a.clone(), torch.tensor(1 / 0.07))
    assert float(aligned) < float(got)


def test_masked_rows_do_not_matter() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(8, 4), torch.randn(8, 4)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1], dtype=torch.bool)
    base = info_nce(a, b, torch.tensor(10.0), mask)
    a2, b2 = a.clone(), b.clone()
    a2[~mask], b2[~mask] = torch.randn(2, 4) * 100, torch.randn(2, 4)
    assert torch.allclose(base, info_nce(a2, b2, torch.tensor(10.0), mask))
    assert torch.allclose(base, info_nce(a[mask], b[mask], torch.tensor(10.0)))


def test_too_few_rows_is_a_connected_zero() -> None:
    a = torch.randn(3, 4, requires_grad=True)
    loss = info_nce(a, torch.randn(3, 4), torch.tensor(10.0), torch.tensor([True, False, False]))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert a.grad is not None and float(a.grad.abs().sum()) == 0.0


def test_batch_hard_triplet_on_a_hand_example() -> None:
    emb = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 3.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # anchor0: d_ap=1, d_an=2 → 0 ; anchor1: d_ap=1, d_an=sqrt(5) → 0 ; anchor2: d_ap=1, d_an=2 → 0; anchor3: 1-3
    assert float(batch_hard_triplet(emb, labels, margin=0.3)) == 0.0
    loss = batch_hard_triplet(emb, labels, margin=1.5)
    expected = (max(1 - 2 + 1.5, 0) + max(1 - math.sqrt(5) + 1.5, 0) + max(1 - 2 + 1.5, 0) + max(1 - 3 + 1.5, 0)) / 4
    assert abs(float(loss) - expected) < 1e-5
    # unlabelled rows and rows without a positive are left out
    labels2 = torch.tensor([0, -1, 1, 2])
    assert float(batch_hard_triplet(emb, labels2, 0.3)) == 0.0


def test_temperature_is_learnable_and_clamped() -> None:
    t = Temperatures(init=0.07, learnable=True, min_temperature=0.05)
    assert abs(1 / float(t.scale("slide_gene").detach()) - 0.07) < 1e-6
    with torch.no_grad():
        t.log_scale.fill_(10.0)
    assert abs(1 / float(t.scale("slide_gene").detach()) - 0.05) < 1e-6
    assert Temperatures(learnable=False).log_scale.requires_grad is False


def test_stage1_losses_weights_and_masks() -> None:
    torch.manual_seed(0)
    emb = {k: torch.randn(6, 8, requires_grad=True) for k in ("slide", "report", "gene")}
    masks = {k: torch.ones(6, dtype=torch.bool) for k in emb}
    masks["gene"][[1, 4]] = False
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    w = {"slide_report": 1.0, "slide_gene": 0.5, "report_gene": 2.0, "triplet": 3.0}
    out = stage1_losses(emb, masks, labels, Temperatures(), w, 0.3)
    total = sum(w[k] * out[k] for k in w)
    assert torch.allclose(out["loss"], total)
    assert torch.allclose(out["slide_gene"], info_nce(emb["slide"], emb["gene"], torch.tensor(1 / 0.07), masks["gene"]))
    out["loss"].backward()
    assert float(emb["gene"].grad[[1, 4]].abs().sum()) == 0.0  # rows without expression get no gradient
