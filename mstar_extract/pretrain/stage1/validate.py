"""Stage-1 validation: the training losses on the validation split and cross-modal retrieval Recall@k."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from mstar_extract.pretrain import dist as D
from mstar_extract.pretrain.stage1.config import Stage1Config
from mstar_extract.pretrain.stage1.data import Collate, Stage1Dataset
from mstar_extract.pretrain.stage1.losses import stage1_losses
from mstar_extract.pretrain.stage1.model import MODALITIES, Stage1Model, loss_weights, masks_of, move


def recall_at_k(query: torch.Tensor, gallery: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Cross-modal retrieval: row i of ``query`` should find row i of ``gallery`` (cosine similarity)."""
    with torch.autocast(device_type=query.device.type, enabled=False):  # bf16 similarities would tie (and count as hits)
        sims = F.normalize(query.float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).t()
    rank = (sims > sims.diagonal()[:, None]).sum(1)
    return {k: float((rank < k).float().mean()) for k in ks}


@torch.no_grad()
def embed_dataset(model: Stage1Model, ds: Stage1Dataset, collate: Collate, batch_size: int, info: D.DistInfo) -> dict[str,
                  torch.Tensor]:
    """Embeddings, masks and labels of this rank's shard (rows rank::world) gathered over all ranks."""
    mine = list(range(info.rank, len(ds), info.world_size))
    dim = model.dim
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in (*MODALITIES, "m_slide", "m_report", "m_gene", "label")}
    for s in range(0, len(mine), batch_size):
        batch = move(collate([ds[i] for i in mine[s : s + batch_size]]), info.device)
        emb = model(batch)
        for k in MODALITIES:
            parts[k].append(emb[k].float())
        for k, v in masks_of(batch).items():
            parts["m_" + k].append(v)
        parts["label"].append(batch["label"])
    empty = {k: torch.zeros(0, dim, device=info.device) for k in MODALITIES}
    empty.update({f"m_{k}": torch.zeros(0, dtype=torch.bool, device=info.device) for k in MODALITIES})
    empty["label"] = torch.zeros(0, dtype=torch.long, device=info.device)
    return {k: D.all_gather_nograd(torch.cat(v) if v else empty[k]) for k, v in parts.items()}


def _chunked_losses(e: dict[str, torch.Tensor], model: Stage1Model, cfg: Stage1Config, chunk: int) -> dict[str, float]:
    """The training losses over the validation embeddings, in chunks of one global batch, weighted by size."""
    n = e["slide"].shape[0]
    sums: dict[str, float] = {}
    for s in range(0, n, chunk):
        sl = slice(s, min(s + chunk, n))
        out = stage1_losses({k: e[k][sl] for k in MODALITIES}, {k: e["m_" + k][sl] for k in MODALITIES}, e["label"][sl],
                            model.temps, loss_weights(cfg), cfg.loss.margin)
        w = (sl.stop - sl.start) / n
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + w * float(v)
    return {f"val_{k}": v for k, v in sums.items()}


@torch.no_grad()
def validate(model: Stage1Model, ds: Stage1Dataset, collate: Collate, cfg: Stage1Config, info: D.DistInfo) -> dict[str, float]:
    """Validation losses (in global-batch-sized chunks) and Recall@1/5 slide→report, slide→gene."""
    was = model.training
    model.eval()
    e = embed_dataset(model, ds, collate, cfg.train.batch_size, info)
    model.train(was)
    res = _chunked_losses(e, model, cfg, cfg.train.batch_size * info.world_size)
    for other in ("report", "gene"):
        keep = e["m_slide"] & e["m_" + other]
        if int(keep.sum()) >= 2:
            r = recall_at_k(e["slide"][keep], e[other][keep])
            res[f"val_R@1_slide_{other}"], res[f"val_R@5_slide_{other}"] = r[1], r[5]
            res[f"val_n_slide_{other}"] = float(keep.sum())
    return res
