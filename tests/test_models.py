"""Encoder registry, preprocessing and inference with real timm networks (random init, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mstar_extract.errors import UsageError
from mstar_extract.models.encoder import Encoder, benchmark_model, resolve_device, resolve_precision
from mstar_extract.models.preprocess import preprocess
from mstar_extract.models.registry import IMAGENET_MEAN, IMAGENET_STD, get_spec, registry_json

TINY = "timm:vit_tiny_patch16_224"
REPO = Path(__file__).resolve().parents[1]


def _patches(n: int, px: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour fields with texture: different patches look different."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, 8, 8, 3)).astype(np.float32)
    up = F.interpolate(torch.from_numpy(coarse).permute(0, 3, 1, 2), size=(px, px), mode="bicubic", align_corners=False)
    img = up.permute(0, 2, 3, 1).numpy() * 200 + rng.normal(0, 12, (n, px, px, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------- registry


def test_builtin_specs() -> None:
    spec = get_spec()
    assert spec.name == "mstar" and spec.architecture == "vit_large_patch16_224"
    assert spec.kwargs == {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True}
    assert spec.feature_dim == 1024 and spec.input_size == 224
    assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD
    assert spec.hub_repo == "Wangyh/mSTAR" and spec.hub_filename == "mSTAR.pth" and spec.gated
    uni = get_spec("UNI")
    assert uni.hub_repo == "MahmoodLab/UNI" and uni.hub_filename == "pytorch_model.bin"
    assert uni.kwargs == spec.kwargs


def test_unknown_models_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="unknown model 'nope'"):
        get_spec("nope")
    with pytest.raises(UsageError, match="timm:<name>"):
        get_spec("timm:")
    with pytest.raises(UsageError, match="timm:no_such_net_xyz"):
        get_spec("timm:no_such_net_xyz")


def test_timm_spec_feature_dim_is_the_output_size_of_models_with_a_conv_head() -> None:
    """MobileNetV3 pools, then applies a 1x1 conv head: its features are head_hidden_size (1024), not the
    num_features (288) before that head (the bag's shape check failed on every slide before this)."""
    import torch

    from mstar_extract.models import Encoder

    spec = get_spec("timm:mobilenetv3_small_050")
    enc = Encoder.create("timm:mobilenetv3_small_050", weights="random", device="cpu")
    out = enc.embed(np.zeros((2, 224, 224, 3), np.uint8))
    assert spec.feature_dim == enc.feature_dim == out.shape[1] == 1024
    assert isinstance(out, torch.Tensor)


def test_timm_spec_uses_its_own_config() -> None:
    spec = get_spec(TINY)
    assert spec.architecture == "vit_tiny_patch16_224" and spec.feature_dim == 192
    assert spec.mean == (0.5, 0.5, 0.5) and spec.input_size == 224
    assert spec.hub_repo and spec.hub_repo.startswith("timm/") and spec.hub_filename == "model.safetensors"
    assert spec.ignore_keys == ("head.",)


def test_weights_registry_file_matches_code() -> None:
    on_disk = json.loads((REPO / "weights" / "registry.json").read_text())
    assert on_disk == json.loads(registry_json()), "regenerate weights/registry.json from registry_json()"


# ------------------------------------------------------------------------------------------- preprocessing


def test_preprocess_matches_pil_reference() -> None:
    x = _patches(3, 256)
    out = preprocess(x)
    assert out.shape == (3, 3, 224, 224) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    ref = np.stack([
        ((np.asarray(Image.fromarray(a).resize((224, 224), Image.BILINEAR)) / 255.0 - mean) / std).transpose(2, 0, 1)
        for a in x
    ])
    one_level = 1.0 / 255.0 / min(IMAGENET_STD)
    diff = np.abs(out.numpy() - ref)
    assert diff.max() <= one_level * 1.05  # PIL rounds to uint8: at most one grey level apart
    assert diff.mean() < one_level / 2
    # the check can fail: a resize without antialiasing is clearly further from the reference
    plain = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2).float(), size=(224, 224), mode="bilinear",
                          align_corners=False, antialias=False)
    plain = ((plain / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)).numpy()
    assert np.abs(plain - ref).max() > 3 * one_level


def test_preprocess_keeps_224_unresized() -> None:
    x = _patches(2, 224, seed=3)
    out = preprocess(x, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)).numpy()
    expected = (x.transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(out, expected, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        preprocess(x.astype(np.float32))


# -------------------------------------------------------------------------------------------------- encoder


def test_device_and_precision_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(UsageError, match="--device"):
        resolve_device("tpu7")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            resolve_device("cuda:0")
    else:
        with pytest.raises(UsageError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    cpu = torch.device("cpu")
    assert resolve_precision(None, cpu) == "fp32"
    assert resolve_precision("bfloat16", cpu) == "bf16"
    with pytest.raises(UsageError, match="--precision"):
        resolve_precision("fp8", cpu)


def test_tiny_encoder_embeds_uint8_batches(capsys: pytest.CaptureFixture[str]) -> None:
    from mstar_extract.console import NORMAL, setup_logging

    setup_logging(NORMAL)  # as the CLI does (without it the line goes to pytest's log capture, not stderr)
    enc = Encoder.create(TINY, weights="random", device="cpu")
    assert "MEANINGLESS" in capsys.readouterr().err
    assert enc.weights_sha256 == "random" and enc.precision == "fp32" and enc.feature_dim == 192
    x = _patches(4, 256, seed=1)
    feats = enc.embed(x)
    assert feats.shape == (4, 192) and feats.dtype == torch.float32
    # same input through the raw timm model gives the same features
    with torch.inference_mode():
        ref = enc.model(preprocess(x, mean=enc.spec.mean, std=enc.spec.std))
    torch.testing.assert_close(feats, ref)
    # a torch uint8 batch works as well, and an empty batch gives (0, D)
    torch.testing.assert_close(enc.embed(torch.from_numpy(x[:2])), feats[:2])
    assert enc.embed(np.zeros((0, 224, 224, 3), np.uint8)).shape == (0, 192)


def test_compiled_encoder_pads_the_last_batch() -> None:
    enc = Encoder.create(TINY, weights="random", device="cpu", compile=True, compile_backend="eager")
    plain = Encoder(enc.spec, enc.model, enc.weights, torch.device("cpu"), "fp32")
    x = _patches(5, 224, seed=2)
    full = enc.embed(x[:4])
    last = enc.embed(x[4:])  # padded to 4 internally, only its own row comes back
    assert last.shape == (1, 192)
    torch.testing.assert_close(torch.cat([full, last]), plain.embed(x), rtol=1e-4, atol=1e-4)


def test_benchmark_model_reports_throughput() -> None:
    enc = Encoder.create(TINY, weights="random", device="cpu")
    res = benchmark_model(enc, batch_size=2, seconds=None, iters=2, warmup=1, input_px=256)
    assert res["patches_per_s"] > 0 and res["iters"] == 2
    assert {"patches_per_s", "device", "batch_size", "precision", "compile"} <= set(res)
    assert res["device"] == "cpu" and res["batch_size"] == 2 and res["precision"] == "fp32" and res["input_px"] == 256


# The ViT-L of the "mstar" spec (built through the registry, a weights file loaded strictly, features equal to the
# network's own) is tested once, on the exported stage-2 student: tests/test_pretrain_stage2_vitl.py.


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_matches_cpu_fp32() -> None:
    cpu = Encoder.create(TINY, weights="random", device="cpu")
    gpu = Encoder(cpu.spec, get_spec(TINY).build(), cpu.weights, torch.device("cpu"), "fp32")
    gpu.model.load_state_dict(cpu.model.state_dict())
    gpu.precision = "bf16"
    gpu.to("cuda")
    x = _patches(8, 256, seed=5)
    a = cpu.embed(x)
    b = gpu.embed(torch.from_numpy(x).pin_memory()).cpu()
    assert F.cosine_similarity(a, b).min() > 0.99


def test_random_weights_are_the_same_network_in_every_process():
    """--weights random: every process (--devices, torchrun ranks, reruns) builds the same seeded network, so one
    OUT never mixes features of different random networks; the global RNG is left as it was."""
    import torch

    from mstar_extract.models.weights import ResolvedWeights, build_with_weights

    spec = get_spec("timm:vit_tiny_patch16_224")
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_with_weights(spec, ResolvedWeights("random", None, "random"))
    after = torch.rand(3)
    b = build_with_weights(spec, ResolvedWeights("random", None, "random"))
    assert torch.equal(before, after)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
