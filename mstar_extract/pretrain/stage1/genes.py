"""RNA-Seq encoder: a small transformer over gene tokens (docs/pretrain.md, "Model").

Token i = gene-id embedding(i) + expression-bin embedding(bin_i); a learned CLS token is prepended; pre-norm
transformer blocks use ``torch.nn.functional.scaled_dot_product_attention`` (exact attention where the paper's
scBERT-style model used Performer); the final-LayerNorm CLS goes through Linear(dim→out_dim).
At the defaults (dim 200, 2 blocks, ff 4×) the blocks hold ≈0.97M parameters, plus n_genes × 200 for the
gene table.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mstar_extract.errors import UsageError


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, ff_mult: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise UsageError(f"genes.dim {dim} is not divisible by genes.heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ff_mult * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ff(self.norm2(x)))


class GeneEncoder(nn.Module):
    """Binned expression of ``n_genes`` genes (B, G) int64 → sample embedding (B, out_dim)."""

    def __init__(
        self,
        n_genes: int,
        n_bins: int,
        dim: int = 200,
        depth: int = 2,
        heads: int = 4,
        ff_mult: int = 4,
        dropout: float = 0.1,
        out_dim: int = 512,
        gene_init: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.n_genes, self.n_bins = n_genes, n_bins
        self.gene_emb = nn.Embedding(n_genes, dim)
        self.bin_emb = nn.Embedding(n_bins, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.gene_emb.weight, std=0.02)
        nn.init.normal_(self.bin_emb.weight, std=0.02)
        nn.init.normal_(self.cls_token, std=0.02)
        if gene_init is not None:
            with torch.no_grad():
                rows = ~torch.isnan(gene_init).any(dim=1)
                self.gene_emb.weight[rows] = gene_init[rows].to(self.gene_emb.weight.dtype)
        self.blocks = nn.ModuleList(_Block(dim, heads, ff_mult, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, bins: torch.Tensor) -> torch.Tensor:
        if bins.dim() != 2 or bins.shape[1] != self.n_genes:
            raise ValueError(f"expected binned expression (B, {self.n_genes}), got {tuple(bins.shape)}")
        ids = torch.arange(self.n_genes, device=bins.device)
        x = self.gene_emb(ids)[None] + self.bin_emb(bins.clamp(0, self.n_bins - 1))
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, 0]))


def load_gene_embeddings(path: str | Path, genes: list[str], dim: int) -> tuple[torch.Tensor, int]:
    """Read a Gene2Vec-style text file (``GENE v1 ... vD`` per line; a word2vec ``count dim`` header is skipped).

    Returns (tensor (G, dim) with NaN rows for genes the file lacks, number of genes found). Errors name the
    file and line.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: gene-embedding file not found")
    index = {g: i for i, g in enumerate(genes)}
    out = torch.full((len(genes), dim), float("nan"))
    found = 0
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts or (lineno == 1 and len(parts) == 2 and all(s.isdigit() for s in parts)):
                continue
            gene, values = parts[0], parts[1:]
            if len(values) != dim:
                raise UsageError(f"{p}: line {lineno}: {len(values)} values for gene {gene}, genes.dim is {dim}")
            if gene in index:
                try:
                    out[index[gene]] = torch.tensor([float(v) for v in values])
                except ValueError:
                    raise UsageError(f"{p}: line {lineno}: non-numeric value") from None
                found += 1
    return out, found
