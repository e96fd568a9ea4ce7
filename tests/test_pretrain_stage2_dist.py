"""Stage 2 under a real two-process ``torchrun`` job on the CPU (gloo): sharded targets, DDP training, export.

The two ranks each take half of every global batch (the schedule deals units round-robin), so with augmentation
off a 2 × 4 run must end with the same student weights as a single process on batches of 8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mstar_extract.pretrain.config import load_config
from mstar_extract.pretrain.stage1.export import export_teacher
from mstar_extract.pretrain.stage1.transmil import TransMIL
from mstar_extract.pretrain.stage2.config import Stage2Config
from mstar_extract.pretrain.stage2.toydata import make_stage2_toy_data
from mstar_extract.pretrain.stage2.train import run_stage2

AGG = dict(in_dim=64, dim=32, heads=2, landmarks=8, pinv_iterations=6, residual_conv_kernel=3, dropout=0.0,
           attn_dropout=0.0)


def _settings(manifest: Path, teacher: Path) -> list[str]:
    return [f"data.manifest={manifest}", f"teacher.file={teacher}", "student.init=random",
            "student.arch=timm:test_vit", "train.num_workers=0", "train.log_every=1", "train.max_steps=3",
            "optim.lr=1e-3", "optim.warmup_steps=1", "augment.hflip=0", "augment.vflip=0", "augment.rot90=false",
            "augment.color_jitter=0"]


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(tmp_path: Path) -> None:
    data = make_stage2_toy_data(tmp_path / "data", n_slides=2, seed=1)
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.pt"
    export_teacher(TransMIL(**AGG), AGG, teacher)
    common = _settings(data.manifest, teacher)

    from mstar_extract.testing.cli import MODULE, mstar_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *MODULE,
           "pretrain", "--stage", "2", "--out", str(tmp_path / "ddp"), "--jsonl"]
    for s in [*common, "train.batch_size=4", "data.slides_per_batch=2"]:
        cmd += ["--set", s]
    env = mstar_env({**os.environ, "OMP_NUM_THREADS": "1"})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ddp = tmp_path / "ddp"
    card = json.loads((ddp / "model_card.json").read_text())
    assert card["world_size"] == 2 and card["global_batch"] == 8 and card["steps"] == 3
    assert sorted(p.name for p in (ddp / "targets").glob("*.h5")) == ["toy00.h5", "toy01.h5"]
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [e for e in events if e["event"] == "targets"] == [{"event": "targets", "computed": 2, "reused": 0}]
    steps = [json.loads(x)["step"] for x in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # rank 0 alone writes metrics

    single = run_stage2(load_config(Stage2Config, None, [
        *common, "train.batch_size=8", "data.slides_per_batch=4", f"run.out_dir={tmp_path / 'single'}",
        f"teacher.targets_dir={ddp / 'targets'}"]))
    assert single.targets_computed == []
    a = torch.load(ddp / "student.pth", weights_only=True)
    b = torch.load(single.student_path, weights_only=True)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-4, diff
    from mstar_extract.models.registry import get_spec

    torch.manual_seed(0)  # train.seed: the common random init
    init = get_spec("timm:test_vit").build().state_dict()
    assert max(float((a[k] - init[k]).abs().max()) for k in a) > 100 * diff  # it did train
