"""The shared training loop's rules that do not need a model: the precision choice (every branch, from plain
facts about the device), the one-transfer metrics read-back, and the host-sync detector the step tests rely on."""

from __future__ import annotations

import pytest
import torch

from mstar_extract.errors import UsageError
from mstar_extract.pretrain.loop import choose_precision, resolve_precision, to_floats
from mstar_extract.testing.syncs import HostSyncRecorder


@pytest.mark.parametrize(
    "precision, device, bf16_hw, dtype, scaler, note",
    [
        ("auto", "cpu", False, None, False, None),
        ("auto", "cuda", True, torch.bfloat16, False, None),  # A100/H100: native bf16
        ("auto", "cuda", False, torch.float16, True, "no bf16 hardware"),  # V100/T4: emulated bf16 is not chosen
        ("fp32", "cuda", True, None, False, None),
        ("fp16", "cuda", True, torch.float16, True, "GradScaler"),
        ("bf16", "cuda", True, torch.bfloat16, False, None),
        ("bf16", "cuda", False, torch.bfloat16, False, "only emulates bf16"),
        ("bf16", "cpu", False, torch.bfloat16, False, None),
    ],
)
def test_precision_rule(precision: str, device: str, bf16_hw: bool, dtype: torch.dtype | None, scaler: bool,
                        note: str | None) -> None:
    choice = choose_precision(precision, device, bf16_hw)
    assert choice.dtype == dtype and choice.needs_scaler == scaler
    if note is None:
        assert choice.note is None
    else:
        assert note in choice.note and "\n" not in choice.note
    if choice.needs_scaler:
        assert "GradScaler" in choice.note  # the one line that says fp16 comes with loss scaling


def test_precision_on_this_machine_and_refusals() -> None:
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        choose_precision("fp16", "cpu", False)
    with pytest.raises(UsageError, match="unknown precision"):
        choose_precision("int8", "cuda", True)
    cpu = resolve_precision("auto", torch.device("cpu"))
    assert cpu.dtype is None and cpu.name == "fp32"
    if torch.cuda.is_available():  # the real device query (including_emulation=False) decides bf16 vs fp16
        from mstar_extract.models.precision import auto_precision

        dev = torch.device("cuda", torch.cuda.current_device())
        assert resolve_precision("auto", dev).name == auto_precision(dev)


def test_metrics_are_read_back_in_one_transfer() -> None:
    values = {"loss": torch.tensor(1.5), "t": torch.tensor([2.0]).squeeze(), "lr": 0.1, "none": None,
              "half": torch.tensor(0.25, dtype=torch.bfloat16)}
    assert to_floats(values) == {"loss": 1.5, "t": 2.0, "lr": 0.1, "none": None, "half": 0.25}
    assert all(type(v) is float for k, v in to_floats(values).items() if k not in ("none",))


def test_the_sync_detector_sees_what_makes_a_gpu_wait() -> None:
    x = torch.randn(8)
    mask = x > 0
    rec = HostSyncRecorder()
    with rec:
        rec.step = 1
        float(x.sum())
        rec.step = 2
        x[mask].sum()
        rec.step = 3
        mask.nonzero()
        rec.step = 4
        bool(mask.any())
        rec.step = 5
        torch.where(mask, x, 0.0).sum()  # no sync: stays a tensor
        (x * mask).sum()
    assert rec.steps_with_syncs() == {1, 2, 3, 4}
    assert all(r.where.endswith(".py:" + r.where.rsplit(":", 1)[1]) and "test_pretrain_loop.py" in r.where
               for r in rec.records)
