"""Report encoder: any Hugging Face BERT-style model (hub id or local folder), CLS → Linear(hidden→out_dim).

``pooling="mean"`` (masked mean of the last hidden states) is offered as an alternative to the CLS token.

Freezing (``trainable_layers``): 0 = the whole encoder is frozen (only the projection learns); k > 0 = the
last k transformer layers learn, embeddings and earlier layers are frozen; -1 = everything learns. The
pooler is never used (the CLS hidden state is), so it is always frozen (keeps DDP from waiting on it).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mstar_extract.errors import MstarError, UsageError, first_line


def load_tokenizer(name: str, local_files_only: bool = False) -> Any:
    """``AutoTokenizer`` for a model id or folder; a missing or unreachable model is one clear error."""
    from transformers import AutoTokenizer

    _quiet_transformers()

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=local_files_only)
    except (OSError, ValueError) as exc:
        raise MstarError(f"text model '{name}': cannot load the tokenizer ({first_line(exc)})") from None


def _quiet_transformers() -> None:
    """No per-weight loading bars or advisory warnings from transformers on our stderr."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def _layers(model: nn.Module) -> nn.ModuleList | None:
    enc = getattr(model, "encoder", None)
    layers = getattr(enc, "layer", None) if enc is not None else None
    return layers if isinstance(layers, nn.ModuleList) else None


class TextEncoder(nn.Module):
    """Tokenised reports (input_ids, attention_mask) → report embedding (B, out_dim)."""

    def __init__(
        self,
        name: str,
        out_dim: int = 512,
        trainable_layers: int = 4,
        gradient_checkpointing: bool = False,
        local_files_only: bool = False,
        pooling: str = "cls",
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise UsageError(f"text.pooling must be cls or mean, got {pooling!r}")
        self.pooling = pooling
        from transformers import AutoModel

        _quiet_transformers()
        try:
            self.encoder = AutoModel.from_pretrained(name, local_files_only=local_files_only)
        except (OSError, ValueError) as exc:
            raise MstarError(f"text model '{name}': cannot load it ({first_line(exc)})") from None
        hidden = int(self.encoder.config.hidden_size)
        self.proj = nn.Linear(hidden, out_dim)
        self._freeze(trainable_layers, name)
        if gradient_checkpointing:
            # non-reentrant checkpointing: gradients reach trainable layers even when the embeddings are frozen
            self.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _freeze(self, trainable_layers: int, name: str) -> None:
        enc = self.encoder
        if trainable_layers < 0:
            enc.requires_grad_(True)
        else:
            enc.requires_grad_(False)
            if trainable_layers > 0:
                layers = _layers(enc)
                if layers is None:
                    raise UsageError(f"text.trainable_layers={trainable_layers}: '{name}' has no encoder.layer list; use 0 or -1")
                for layer in list(layers)[-trainable_layers:]:
                    layer.requires_grad_(True)
        pooler = getattr(enc, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the pretrained encoder (these get ``text.lr_scale``)."""
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "mean":
            w = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return self.proj((hidden * w).sum(1) / w.sum(1).clamp_min(1.0))
        return self.proj(hidden[:, 0])
