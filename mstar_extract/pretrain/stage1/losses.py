"""Stage-1 losses: masked symmetric InfoNCE per modality pair and a batch-hard triplet loss.

All functions take embeddings of the *global* batch (already gathered across ranks) plus boolean masks saying
which rows carry the modality; rows without it are left out of that pair's loss. A loss with nothing to compare
(fewer than two valid rows, or no anchor with both a positive and a negative) is an exact zero that is still
connected to the graph, so every parameter receives a (zero) gradient and DDP stays in step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _zero(*tensors: torch.Tensor) -> torch.Tensor:
    return sum((t.sum() * 0.0 for t in tensors), torch.zeros((), device=tensors[0].device))


def _masked_cross_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy with target = the diagonal, over the columns where ``mask`` (n,), as (n,)."""
    masked = logits.masked_fill(~mask[None, :], torch.finfo(logits.dtype).min)
    return torch.logsumexp(masked, dim=1) - logits.diagonal()


def info_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE between row-aligned embeddings ``a`` and ``b`` (n, d) over the rows where ``mask``.

    ``logit_scale`` is 1/temperature (a scalar tensor). Embeddings are L2-normalised here. With a mask the rows
    without it are left out by masking (no boolean indexing, whose result size the host would have to wait
    for); fewer than two valid rows give an exact, connected zero.
    """
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    if mask is None:
        if a.shape[0] < 2:
            return _zero(a, b, logit_scale)
        logits = logit_scale.float() * a @ b.t()
        target = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    logits = logit_scale.float() * a @ b.t()
    n = mask.sum()
    per_row = _masked_cross_entropy(logits, mask) + _masked_cross_entropy(logits.t(), mask)
    loss = 0.5 * torch.where(mask, per_row, 0.0).sum() / n.clamp_min(1)
    return torch.where(n >= 2, loss, _zero(a, b, logit_scale))


def batch_hard_triplet(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.3,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017) with Euclidean distance.

    For each valid anchor: the farthest sample of the same label and the closest of another label;
    loss = mean(relu(d(a,p) − d(a,n) + margin)) over anchors that have both. Labels < 0 are invalid. Invalid
    rows are masked out of the distance matrix (no boolean indexing: no host-device synchronisation); no anchor
    with both gives an exact, connected zero.
    """
    valid = labels >= 0
    if mask is not None:
        valid = valid & mask
    x = emb.float()
    sq = (x * x).sum(-1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.t()).clamp_min(0.0)
    both = valid[:, None] & valid[None, :]
    same = (labels[:, None] == labels[None, :]) & both
    eye = torch.eye(len(labels), dtype=torch.bool, device=x.device)
    pos = same & ~eye
    neg = ~same & both
    has = pos.any(1) & neg.any(1)
    # sqrt with a tiny floor keeps the gradient finite at zero distance
    dist = (d2 + 1e-12).sqrt()
    d_ap = torch.where(pos, dist, torch.full_like(dist, -math.inf)).amax(1)
    d_an = torch.where(neg, dist, torch.full_like(dist, math.inf)).amin(1)
    terms = torch.where(has, F.relu(torch.where(has, d_ap - d_an, 0.0) + margin), 0.0)
    n = has.sum()
    return torch.where(n > 0, terms.sum() / n.clamp_min(1), _zero(emb))


class Temperatures(nn.Module):
    """One learnable CLIP-style temperature per pair, stored as log(1/T); clamped to T >= min_temperature."""

    PAIRS = ("slide_report", "slide_gene", "report_gene")

    def __init__(self, init: float = 0.07, learnable: bool = True, min_temperature: float = 0.01) -> None:
        super().__init__()
        self.max_log_scale = math.log(1.0 / min_temperature)
        self.log_scale = nn.Parameter(torch.full((len(self.PAIRS),), math.log(1.0 / init)), requires_grad=learnable)

    def scale(self, pair: str) -> torch.Tensor:
        """1/T for ``pair`` (clamped)."""
        i = self.PAIRS.index(pair)
        return self.log_scale[i].clamp(max=self.max_log_scale).exp()

    def values(self) -> dict[str, torch.Tensor]:
        """Current temperatures (0-d tensors on the device; the loop reads them back on logging steps)."""
        with torch.no_grad():
            return {p: 1.0 / self.scale(p) for p in self.PAIRS}


def stage1_losses(
    emb: dict[str, torch.Tensor],
    masks: dict[str, torch.Tensor],
    labels: torch.Tensor,
    temps: Temperatures,
    weights: dict[str, float],
    margin: float,
) -> dict[str, torch.Tensor]:
    """All stage-1 loss terms and their weighted sum ``loss``.

    ``emb`` and ``masks`` have keys ``slide``, ``report``, ``gene`` (global batch, row-aligned); the triplet
    loss uses the concatenation of the three L2-normalised embeddings on rows that have all three modalities
    and a cancer-type label. ``weights`` keys: slide_report, slide_gene, report_gene, triplet.
    """
    out: dict[str, torch.Tensor] = {}
    # float32 whatever the caller's autocast: under bf16 autocast the similarity matmuls would otherwise run in
    # bf16 (logit errors ~0.4 at scale 100; cancellation in the triplet's |x|²+|y|²−2x·y distances)
    with torch.autocast(device_type=labels.device.type, enabled=False):
        for pair in Temperatures.PAIRS:
            m1, m2 = pair.split("_")
            out[pair] = info_nce(emb[m1], emb[m2], temps.scale(pair), masks[m1] & masks[m2])
        full = masks["slide"] & masks["report"] & masks["gene"]
        cat = torch.cat([F.normalize(emb[m].float(), dim=-1) for m in ("slide", "report", "gene")], dim=-1)
        out["triplet"] = batch_hard_triplet(cat, labels, margin, full)
    total = sum((weights[k] * out[k] for k in ("slide_report", "slide_gene", "report_gene", "triplet")),
                torch.zeros((), device=cat.device))
    out["loss"] = total
    return out
