"""TransMIL slide aggregator with Nyström attention (docs/pretrain.md, "Model"), written for this project.

Architecture (Shao et al., NeurIPS 2021, as used by mSTAR): ``_fc1`` = Linear(in_dim→dim) + ReLU + Dropout(0.25);
a CLS token; TransLayer (pre-norm Nyström attention, residual) → PPEG (7/5/3 depth-wise convs on the tokens
laid out as a square grid) → TransLayer → LayerNorm; the CLS output is the 512-d slide embedding.

Parameter names follow the module layout of mSTAR's downstream ``TransMIL`` (``_fc1.0``, ``cls_token``,
``layer{1,2}.norm``, ``layer{1,2}.attn.to_qkv``, ``.attn.to_out.0``, ``.attn.res_conv``, ``pos_layer.proj{,1,2}``,
``norm``), so an exported state dict loads there without renaming (see :mod:`mstar_extract.pretrain.stage1.export`).

Nyström attention (Xiong et al., AAAI 2021): the sequence is front-padded with zeros to a multiple of the
number of landmarks m; landmarks are segment means of queries and keys; softmax(QK̃ᵀ)·pinv(softmax(Q̃K̃ᵀ))·
softmax(Q̃Kᵀ)V, with the pseudo-inverse approximated by the paper's iterative scheme
Z ← ¼ Z (13I − AZ (15I − AZ (7I − AZ))) from Z₀ = Aᵀ / (‖A‖₁ ‖A‖∞). The attention core always runs in float32
(the pseudo-inverse iteration is not stable in bf16), whatever the autocast context.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from mstar_extract.pretrain.stage1.config import AggregatorConfig


def moore_penrose_pinv(a: torch.Tensor, iterations: int = 6) -> torch.Tensor:
    """Iterative approximation of the pseudo-inverse of a batch of square matrices ``a`` (..., m, m)."""
    abs_a = a.abs()
    norm_1 = abs_a.sum(dim=-2).amax(dim=-1)  # max column sum
    norm_inf = abs_a.sum(dim=-1).amax(dim=-1)  # max row sum
    z = a.transpose(-1, -2) / (norm_1 * norm_inf)[..., None, None]
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention with TransMIL's settings and parameter names."""

    def __init__(
        self,
        dim: int = 512,
        heads: int = 8,
        landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_conv_kernel: int = 33,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.dim_head = dim // heads
        self.landmarks = landmarks
        self.pinv_iterations = pinv_iterations
        self.scale = self.dim_head**-0.5
        inner = self.dim_head * heads
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv: nn.Conv2d | None = None
        if residual_conv_kernel:
            k = residual_conv_kernel
            self.res_conv = nn.Conv2d(heads, heads, (k, 1), padding=(k // 2, 0), groups=heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, n, dim) → (B, n, dim)."""
        b, n, _ = x.shape
        m = self.landmarks
        pad = (m - n % m) % m
        if pad:
            x = F.pad(x, (0, 0, pad, 0))  # zeros at the front, as in TransMIL's Nyström attention
        qkv = self.to_qkv(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v = qkv.float().chunk(3, dim=-1)
            q, k, v = (t.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
            q = q * self.scale
            seg = math.ceil(n / m)
            q_land = q.reshape(b, self.heads, m, seg, self.dim_head).mean(dim=3)
            k_land = k.reshape(b, self.heads, m, seg, self.dim_head).mean(dim=3)
            attn1 = (q @ k_land.transpose(-1, -2)).softmax(dim=-1)
            attn2 = (q_land @ k_land.transpose(-1, -2)).softmax(dim=-1)
            attn3 = (q_land @ k.transpose(-1, -2)).softmax(dim=-1)
            attn2_inv = moore_penrose_pinv(attn2, self.pinv_iterations)
            out = (attn1 @ attn2_inv) @ (attn3 @ v)
            if self.res_conv is not None:
                out = out + F.conv2d(v, self.res_conv.weight.float(), padding=self.res_conv.padding, groups=self.heads)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * self.dim_head).to(qkv.dtype)
        out = self.to_out(out)
        return out[:, -n:]


class TransLayer(nn.Module):
    """Pre-norm residual Nyström attention block."""

    def __init__(self, dim: int, heads: int, landmarks: int, pinv_iterations: int, residual_conv_kernel: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads, landmarks, pinv_iterations, residual_conv_kernel, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding generator: depth-wise 7×7, 5×5 and 3×3 convs on the square token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, side: int) -> torch.Tensor:
        b, _, c = x.shape
        cls_tok, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).reshape(b, c, side, side)
        grid = self.proj(grid) + grid + self.proj1(grid) + self.proj2(grid)
        return torch.cat([cls_tok, grid.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(nn.Module):
    """The stage-1 slide aggregator: patch features (B, N, in_dim) → slide embedding (B, dim)."""

    def __init__(
        self,
        in_dim: int = 1024,
        dim: int = 512,
        heads: int = 8,
        landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_conv_kernel: int = 33,
        dropout: float = 0.25,
        attn_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_dim, self.dim = in_dim, dim
        self._fc1 = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        layer_args = (dim, heads, landmarks, pinv_iterations, residual_conv_kernel, attn_dropout)
        self.layer1 = TransLayer(*layer_args)
        self.pos_layer = PPEG(dim)
        self.layer2 = TransLayer(*layer_args)
        self.norm = nn.LayerNorm(dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """TransMIL's initialisation: Xavier-normal linears with zero bias, unit LayerNorms, CLS ~ N(0, 1e-6)."""
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.xavier_normal_(mod.weight)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.LayerNorm):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)
        nn.init.normal_(self.cls_token, std=1e-6)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """All output tokens after the final norm: (B, 1 + side², dim); token 1+i ↔ patch i for i < N."""
        if x.dim() != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"expected patch features (B, N, {self.in_dim}), got {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError("a slide needs at least one patch")
        h = self._fc1(x)
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        if extra:  # fill the square grid by repeating the first tokens (TransMIL); extra <= n always holds
            h = torch.cat([h, h[:, :extra]], dim=1)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)
        h = self.layer1(h)
        h = self.pos_layer(h, side)
        h = self.layer2(h)
        return self.norm(h)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Slide embeddings (B, dim). ``mask`` (B, N) bool marks real patches of a padded batch.

        With a mask, every slide is run alone on its real patches (exactly what an unpadded call gives), since
        PPEG's grid and the Nyström landmarks depend on the sequence length.
        """
        if mask is None:
            return self._tokens(x)[:, 0]
        return torch.cat([self._tokens(x[i : i + 1, mask[i]])[:, 0] for i in range(x.shape[0])], dim=0)

    def patch_embeddings(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(slide embedding (B, dim), per-patch contextual embeddings (B, N, dim)) from the final layer.

        The per-patch outputs are the final-LayerNorm tokens of each input patch in whole-slide context: the
        stage-2 teacher targets. With a mask, padded positions of the per-patch output are zero.
        """
        if mask is None:
            tok = self._tokens(x)
            n = x.shape[1]
            return tok[:, 0], tok[:, 1 : 1 + n]
        cls_out, patches = [], x.new_zeros(x.shape[0], x.shape[1], self.dim)
        for i in range(x.shape[0]):
            tok = self._tokens(x[i : i + 1, mask[i]])
            cls_out.append(tok[:, 0])
            patches[i, mask[i]] = tok[0, 1 : 1 + int(mask[i].sum())].to(patches.dtype)
        return torch.cat(cls_out, dim=0), patches


def build_transmil(cfg: AggregatorConfig) -> TransMIL:
    """A :class:`TransMIL` from the ``aggregator`` config section."""
    return TransMIL(
        in_dim=cfg.in_dim,
        dim=cfg.dim,
        heads=cfg.heads,
        landmarks=cfg.landmarks,
        pinv_iterations=cfg.pinv_iterations,
        residual_conv_kernel=cfg.residual_conv_kernel,
        dropout=cfg.dropout,
        attn_dropout=cfg.attn_dropout,
    )
