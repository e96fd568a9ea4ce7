"""The three stage-1 encoders as one module: slide (TransMIL), report (BERT-style) and RNA-Seq, plus the
learnable temperatures of the contrastive losses."""

from __future__ import annotations

import torch
from torch import nn

from mstar_extract.pretrain.stage1.config import Stage1Config
from mstar_extract.pretrain.stage1.genes import GeneEncoder
from mstar_extract.pretrain.stage1.losses import Temperatures
from mstar_extract.pretrain.stage1.text import TextEncoder
from mstar_extract.pretrain.stage1.transmil import build_transmil

MODALITIES = ("slide", "report", "gene")


class Stage1Model(nn.Module):
    """Aggregator + text encoder + gene encoder + temperatures; ``forward(batch)`` → embeddings per modality."""

    def __init__(self, cfg: Stage1Config, n_genes: int, gene_init: torch.Tensor | None = None) -> None:
        super().__init__()
        dim = cfg.aggregator.dim
        self.aggregator = build_transmil(cfg.aggregator)
        t = cfg.text
        self.text = TextEncoder(t.model, dim, t.trainable_layers, t.gradient_checkpointing, t.local_files_only, t.pooling)
        g = cfg.genes
        self.genes = (
            GeneEncoder(n_genes, cfg.data.n_bins, g.dim, g.depth, g.heads, g.ff_mult, g.dropout, dim, gene_init)
            if n_genes else None
        )
        lc = cfg.loss
        self.temps = Temperatures(lc.temperature, lc.learn_temperature, lc.min_temperature)
        self.dim = dim

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {
            "slide": self.aggregator(batch["features"]),
            "report": self.text(batch["input_ids"], batch["attention_mask"]),
        }
        if self.genes is not None:
            out["gene"] = self.genes(batch["genes"])
        else:
            out["gene"] = out["slide"].new_zeros(out["slide"].shape)
        return {k: v.float() for k, v in out.items()}


def loss_weights(cfg: Stage1Config) -> dict[str, float]:
    """The weights of the four loss terms (``loss.w_*``)."""
    lc = cfg.loss
    return {"slide_report": lc.w_slide_report, "slide_gene": lc.w_slide_gene, "report_gene": lc.w_report_gene,
            "triplet": lc.w_triplet}


def masks_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Which rows of a batch carry each modality."""
    return {"slide": batch["has_slide"], "report": batch["has_report"], "gene": batch["has_gene"]}


def move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A collated batch on ``device`` (asynchronous copies from pinned memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
