"""Files that pretraining reads back: checkpoints and teacher files are loaded with ``weights_only=True`` (a crafted
pickle is refused, never run), random states survive that round trip exactly, and read failures are one line even
when the library's exception has no message."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mstar_extract.errors import MstarError
from mstar_extract.pretrain.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mstar_extract.pretrain.stage1.export import export_teacher, load_teacher
from mstar_extract.pretrain.stage1.transmil import TransMIL

AGG = dict(in_dim=8, dim=16, heads=2, landmarks=4, pinv_iterations=6, residual_conv_kernel=3, dropout=0.0,
           attn_dropout=0.0)


class CreatesAFile:
    """A pickle payload: unpickling it calls ``open(marker, "w")``, i.e. creates ``marker`` (arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def _assert_refused(exc: pytest.ExceptionInfo[MstarError], path: Path, marker: Path) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"{path}: refused to load"), msg
    assert "weights_only" not in msg and "trust" not in msg, msg  # never an invitation to load it anyway
    assert not marker.exists(), "the payload ran"


def test_a_malicious_checkpoint_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "step_00000001.pt"
    torch.save({"model": {}, "step": 1, "extra": {"x": CreatesAFile(marker)}}, evil)
    with pytest.raises(MstarError) as exc:
        load_checkpoint(evil)
    _assert_refused(exc, evil, marker)
    assert "io.open" in str(exc.value)  # what it tried to call


def test_a_malicious_teacher_file_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    good = export_teacher(TransMIL(**AGG), AGG, tmp_path / "teacher.pt")
    obj = torch.load(good, weights_only=True)
    obj["meta"] = {"note": CreatesAFile(marker)}
    evil = tmp_path / "evil_teacher.pt"
    torch.save(obj, evil)
    with pytest.raises(MstarError) as exc:
        load_teacher(evil)
    _assert_refused(exc, evil, marker)
    assert isinstance(load_teacher(good), TransMIL)  # what we write loads under the same rule


def test_random_states_survive_a_weights_only_checkpoint(tmp_path: Path) -> None:
    random.seed(3)
    np.random.seed(4)
    np.random.standard_normal()  # numpy caches a gaussian: that is part of its state too
    torch.manual_seed(5)
    state = rng_state()
    want = (random.random(), np.random.standard_normal(3).tolist(), np.random.rand(), torch.rand(3).tolist())
    path = save_checkpoint(tmp_path / "c.pt", {"model": {}, "step": 0, "rng": [state]})
    loaded = torch.load(path, weights_only=True)  # the checkpoint is tensors and plain data only
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(loaded["rng"][0])
    got = (random.random(), np.random.standard_normal(3).tolist(), np.random.rand(), torch.rand(3).tolist())
    assert got == want


def test_a_damaged_checkpoint_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "step_00000002.pt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(MstarError) as exc:
        load_checkpoint(bad)
    assert str(exc.value).startswith(f"{bad}: cannot read checkpoint (") and "\n" not in str(exc.value)


# ------------------------------------------------------------------------- exceptions without a message
# No real bag or tokenizer folder we could build makes h5py or transformers raise an OSError with an empty
# message, so the library call is made to raise one (fault injection); everything else is the real code path.


def test_an_unreadable_bag_with_an_empty_error_message_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import h5py

    from mstar_extract.pretrain.stage1 import data

    bag = tmp_path / "bag.h5"
    with h5py.File(bag, "w") as f:
        f["features"] = np.zeros((3, 4), np.float32)

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError()  # str() == "": str(exc).splitlines()[0] raised IndexError here

    monkeypatch.setattr(h5py, "File", fail)
    with pytest.raises(MstarError, match=r"bag\.h5: cannot read feature bag \(OSError\)$"):
        data.bag_shape(bag)
    with pytest.raises(MstarError, match=r"bag\.h5: cannot read feature bag \(OSError\)$"):
        data.read_bag_rows(bag, np.array([0, 1]))


def test_a_text_model_error_with_an_empty_message_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from mstar_extract.pretrain.stage1.text import TextEncoder, load_tokenizer

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError()

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", fail)
    with pytest.raises(MstarError, match=r"^text model 'x': cannot load the tokenizer \(OSError\)$"):
        load_tokenizer("x")
    with pytest.raises(MstarError, match=r"^text model 'x': cannot load it \(OSError\)$"):
        TextEncoder("x")
