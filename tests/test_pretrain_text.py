"""Report encoder: a tiny BERT saved locally and loaded through AutoModel/AutoTokenizer; freezing; errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mstar_extract.errors import MstarError
from mstar_extract.pretrain.stage1.text import TextEncoder, load_tokenizer
from mstar_extract.pretrain.stage1.toydata import make_tiny_bert


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("bert"), hidden=16, layers=3, heads=2)


def grads(enc: TextEncoder, tok) -> set[str]:
    enc.zero_grad()
    batch = tok(["well differentiated adenocarcinoma", "squamous"], padding="max_length", truncation=True, max_length=12,
                return_tensors="pt")
    out = enc(batch["input_ids"], batch["attention_mask"])
    assert out.shape == (2, 24)
    out.pow(2).sum().backward()
    return {n for n, p in enc.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_tokenizer_knows_the_vocabulary(bert: Path) -> None:
    tok = load_tokenizer(str(bert), local_files_only=True)
    assert "[UNK]" not in tok.tokenize("Adenocarcinoma, poorly differentiated")
    ids = tok(["x " * 50], truncation=True, max_length=10, padding="max_length")["input_ids"][0]
    assert len(ids) == 10  # cut to max_tokens


@pytest.mark.parametrize("trainable, layers, embeddings",
                         [(0, set(), False), (1, {"2"}, False), (2, {"1", "2"}, False), (-1, {"0", "1", "2"}, True)])
def test_freezing(bert: Path, trainable: int, layers: set[str], embeddings: bool) -> None:
    torch.manual_seed(0)
    enc = TextEncoder(str(bert), out_dim=24, trainable_layers=trainable, local_files_only=True)
    assert enc.proj.in_features == 16  # hidden_size of the model
    got = grads(enc, load_tokenizer(str(bert), True))
    assert {"proj.weight", "proj.bias"} <= got
    assert {n.split(".")[3] for n in got if n.startswith("encoder.encoder.layer.")} == layers
    assert any(n.startswith("encoder.embeddings.") for n in got) == embeddings
    assert not any("pooler" in n for n, p in enc.named_parameters() if p.requires_grad)


def test_mean_pooling_ignores_padding(bert: Path) -> None:
    enc = TextEncoder(str(bert), out_dim=8, trainable_layers=0, local_files_only=True, pooling="mean").eval()
    tok = load_tokenizer(str(bert), True)
    short = tok(["glandular mucin"], padding="max_length", max_length=6, return_tensors="pt")
    long = tok(["glandular mucin"], padding="max_length", max_length=12, return_tensors="pt")
    with torch.no_grad():
        a = enc(short["input_ids"], short["attention_mask"])
        b = enc(long["input_ids"], long["attention_mask"])
    assert torch.allclose(a, b, atol=1e-5)


def test_missing_model_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(MstarError, match="text model") as info:
        TextEncoder(str(tmp_path / "no_such_model"), local_files_only=True)
    assert "\n" not in str(info.value)
    with pytest.raises(MstarError, match="cannot load the tokenizer"):
        load_tokenizer(str(tmp_path / "no_such_model"), local_files_only=True)
