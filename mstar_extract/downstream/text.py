"""The report encoder of a zero-shot checkpoint, and the class embeddings of a prompt file.

:func:`load_text_tower` rebuilds ``text_encoder`` (``AutoModelForMaskedLM`` from the config stored in the file)
and ``proj_text`` and loads them from the checkpoint's ``model_state_dict`` keys, the keys the official code
takes (those containing ``text_encoder`` / ``proj_text``, ``module.`` removed). Every key of the encoder
itself must be there (only the masked-LM head, unused here, may be missing). The tokenizer comes from the
checkpoint too, so nothing is downloaded. A checkpoint without our ``text`` record (e.g. one made by mSTAR's
authors) needs ``text_model``: a Hugging Face id or folder whose config and tokenizer fit it (the official code
uses ``dmis-lab/biobert-base-cased-v1.2``, 512 tokens, CLS pooling).

:func:`class_embeddings` is the official ``zero_shot_classifier``: for each class, every name × every template
is embedded (report embedding = ``proj_text`` of the CLS hidden state, or the masked mean when stage 1 was
trained with ``text.pooling: mean``), L2-normalised, averaged over names and templates, and normalised again.
Texts are padded to the longest in their batch instead of to ``max_tokens`` (the attention mask makes the
result the same up to float rounding; tested against the official padding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mstar_extract.downstream.prompts import Prompts
from mstar_extract.errors import MstarError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_TEXT_MODEL = "dmis-lab/biobert-base-cased-v1.2"


class TextTower(nn.Module):
    """``text_encoder`` (masked-LM model) + ``proj_text``: texts → report embeddings (B, D)."""

    def __init__(self, text_encoder: PreTrainedModel, proj_text: nn.Linear, pooling: str = "cls") -> None:
        super().__init__()
        self.text_encoder, self.proj_text, self.pooling = text_encoder, proj_text, pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from mstar_extract.pretrain.textexport import base_model

        hidden = base_model(self.text_encoder)(input_ids=input_ids, attention_mask=attention_mask)[0]
        if self.pooling == "mean":
            w = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return self.proj_text((hidden * w).sum(1) / w.sum(1).clamp_min(1.0))
        return self.proj_text(hidden[:, 0])


def _text_record(ckpt: dict[str, Any], text_model: str | None, where: str) -> tuple[dict[str, Any], Any]:
    """(text record {config, max_tokens, pooling}, tokenizer) of the checkpoint, or of ``text_model`` when it is
    given or the checkpoint has no record."""
    from mstar_extract.pretrain.textexport import config_dict, load_tokenizer_files

    rec = ckpt.get("text")
    if isinstance(rec, dict) and text_model is None:
        return rec, load_tokenizer_files(rec["tokenizer_files"], where)
    from transformers import AutoConfig, AutoTokenizer

    name = text_model or DEFAULT_TEXT_MODEL
    try:
        cfg = AutoConfig.from_pretrained(name)
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise MstarError(f"{where}: no text record in the checkpoint, and text model {name!r} cannot be loaded "
                         f"({exc.__class__.__name__})") from None
    return {"config": config_dict(cfg), "max_tokens": 512, "pooling": "cls"}, tok


def load_text_tower(ckpt: dict[str, Any], where: str, text_model: str | None = None,
                    device: torch.device | str = "cpu") -> tuple[TextTower, Any, int]:
    """(text tower in eval mode on ``device``, tokenizer, max tokens) of a zero-shot checkpoint."""
    from mstar_extract.pretrain.textexport import base_model, mlm_from_config

    rec, tokenizer = _text_record(ckpt, text_model, where)
    sd = {k.replace("module.", ""): v for k, v in ckpt["model_state_dict"].items()}
    enc = {k[len("text_encoder."):]: v for k, v in sd.items() if k.startswith("text_encoder.")}
    mlm = mlm_from_config(rec["config"])
    result = mlm.load_state_dict(enc, strict=False)
    prefix = mlm.base_model_prefix + "."
    missing = [k for k in result.missing_keys if k.startswith(prefix)]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[:3]
        raise MstarError(f"{where}: text_encoder weights do not fit its config ({'missing' if missing else 'unexpected'}: "
                         f"{', '.join(bad)})")
    w, b = sd["proj_text.weight"], sd["proj_text.bias"]
    if int(w.shape[1]) != int(getattr(base_model(mlm).config, "hidden_size", w.shape[1])):
        raise MstarError(f"{where}: proj_text takes {int(w.shape[1])} inputs, the encoder gives another size")
    proj = nn.Linear(int(w.shape[1]), int(w.shape[0]))
    proj.load_state_dict({"weight": w, "bias": b})
    tower = TextTower(mlm, proj, str(rec.get("pooling", "cls"))).eval().requires_grad_(False).to(device)
    return tower, tokenizer, int(rec.get("max_tokens", 512))


@torch.inference_mode()
def class_embeddings(tower: TextTower, tokenizer: Any, prompts: Prompts, max_tokens: int,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """The zero-shot classifier: (D, C), one L2-normalised column per class (see the module docstring)."""
    columns = []
    for label in prompts.classes:
        per_name = []
        for name in prompts.names[label]:
            tok = tokenizer(prompts.texts(label, name), padding=True, truncation=True, max_length=max_tokens,
                            return_tensors="pt")
            emb = tower(tok["input_ids"].to(device), tok["attention_mask"].to(device)).float()
            per_name.append(F.normalize(emb, dim=-1))
        col = torch.stack(per_name, dim=0).mean(dim=(0, 1))
        columns.append(col / col.norm())
    return torch.stack(columns, dim=1)
