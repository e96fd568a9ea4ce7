"""Stage-1 training end to end on generated data (real HDF5 bags, a tiny BERT loaded through transformers'
Auto classes): learning, exports, and exact stop/resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mstar_extract.console import Reporter
from mstar_extract.pretrain import stage1
from mstar_extract.pretrain.checkpoint import list_checkpoints
from mstar_extract.pretrain.config import load_config
from mstar_extract.pretrain.stage1.config import Stage1Config
from mstar_extract.pretrain.stage1.export import load_teacher, mstar_to_transmil_state
from mstar_extract.pretrain.stage1.toydata import make_toy_dataset, toy_overrides

DIM = 16


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory):
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n_slides=96, n_types=4, feature_dim=DIM, n_genes=24,
                            patches=(20, 60), val_fraction=0.25, signal=2.0, seed=1)


def metrics(run: Path) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "event" not in r], [r for r in recs if r.get("event") == "val"]


def run(toy, out: Path, *extra: str, resume: str | None = None) -> Path:
    cfg = load_config(Stage1Config, None, toy_overrides(toy, out, DIM) + list(extra))
    assert stage1.main(cfg, resume=resume, reporter=Reporter(verbosity=-1)) == 0
    return out


def test_learns_aligned_embeddings(toy, tmp_path: Path) -> None:
    out = run(toy, tmp_path / "run", "train.epochs=30", "train.val_every=30")
    steps, vals = metrics(out)
    first = sum(s["loss"] for s in steps[:5]) / 5
    last = sum(s["loss"] for s in steps[-5:]) / 5
    assert last < 0.8 * first, (first, last)
    v = vals[-1]
    # chance level of Recall@k is k / (number of validation pairs)
    for other in ("report", "gene"):
        n = v[f"val_n_slide_{other}"]
        assert n >= 15
        assert v[f"val_R@1_slide_{other}"] >= 3 / n, v
        assert v[f"val_R@5_slide_{other}"] >= 2 * 5 / n, v
    assert v["val_loss"] < vals[0]["val_loss"] if len(vals) > 1 else v["val_loss"] < first
    # exports: the teacher reproduces the trained aggregator, the mSTAR layout has the same weights
    teacher = load_teacher(out / "teacher.pt")
    ck = torch.load(list_checkpoints(out)[-1][1], weights_only=True)  # checkpoints are tensors and plain data
    agg = {k[len("aggregator."):]: v for k, v in ck["model"].items() if k.startswith("aggregator.")}
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in agg.items())
    mst = mstar_to_transmil_state(torch.load(out / "aggregator_mstar.pth", weights_only=True))
    assert mst.keys() == agg.keys() and all(torch.equal(mst[k], agg[k]) for k in agg)
    assert (out / "config.yaml").is_file()
    assert load_config(Stage1Config, out / "config.yaml").aggregator.in_dim == DIM


def test_stop_and_resume_matches_uninterrupted(toy, tmp_path: Path) -> None:
    common = ["train.max_steps=4", "train.batch_size=8", "data.max_patches=16"]
    full, _ = metrics(run(toy, tmp_path / "full", *common))
    part = tmp_path / "part"
    run(toy, part, *common, "train.stop_after_steps=2")
    first, _ = metrics(part)
    assert [s["step"] for s in first] == [1, 2]
    assert [c[0] for c in list_checkpoints(part)] == [2]
    # a killed run logged a step after its last checkpoint, and died mid-line: resume logs every step once
    with (part / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "epoch": 0, "lr": 0.0, "loss": 123.0}\n{"step": 4, "lo')
    run(toy, part, *common, resume="auto")
    resumed, _ = metrics(part)
    assert [s["step"] for s in resumed] == [1, 2, 3, 4]
    for a, b in zip(full, resumed, strict=True):
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-9)


def test_resume_refuses_a_different_model(toy, tmp_path: Path) -> None:
    from mstar_extract.errors import UsageError

    out = run(toy, tmp_path / "r", "train.max_steps=1", "train.batch_size=8")
    with pytest.raises(UsageError, match="different 'aggregator' config"):
        run(toy, out, "train.max_steps=2", "train.batch_size=8", "aggregator.dim=16", resume="auto")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_steps(toy, tmp_path: Path) -> None:
    out = run(toy, tmp_path / "gpu", "train.max_steps=3", "train.batch_size=8", "dist.device=cuda", "train.precision=bf16")
    steps, _ = metrics(out)
    assert len(steps) == 3 and all(s["loss"] == s["loss"] for s in steps)
    run(toy, out, "train.max_steps=4", "train.batch_size=8", "dist.device=cuda", "train.precision=bf16", resume="auto")
    assert [s["step"] for s in metrics(out)[0]] == [1, 2, 3, 4]


def test_resume_from_a_malicious_checkpoint_is_refused_without_running_it(toy, tmp_path: Path) -> None:
    """`--resume FILE` with a crafted pickle: one line naming the file, exit 1, and the payload never runs."""
    from click.testing import CliRunner

    from mstar_extract.cli import main

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple:
            return (open, (str(marker), "w"))

    evil = tmp_path / "step_00000001.pt"
    torch.save({"model": {}, "step": 1, "epoch": 0, "batch_in_epoch": 1, "rng": [Payload()]}, evil)
    args = ["pretrain", "--stage", "1", "--resume", str(evil)]
    for s in toy_overrides(toy, tmp_path / "run", DIM) + ["train.max_steps=1", "train.batch_size=8"]:
        args += ["--set", s]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and lines[0].startswith(f"mstar: error: {evil}: refused to load this checkpoint"), res.stderr
    assert "weights_only" not in res.stderr and "Traceback" not in res.stderr
    assert not marker.exists()


def test_stage1_steps_wait_only_for_transformers_mask_check(toy, tmp_path: Path) -> None:
    """Our part of a stage-1 step never reads a value back from the device (losses are masked, not indexed;
    temperatures and the gradient norm stay tensors; the gathers need no size exchange). The one sync left is
    transformers' BERT checking the attention mask on the host, once per forward (their code, recorded here)."""
    from mstar_extract.pretrain import dist as D
    from mstar_extract.pretrain.loop import TrainLoop
    from mstar_extract.pretrain.stage1 import train as T
    from mstar_extract.testing.syncs import HostSyncRecorder

    cfg = load_config(Stage1Config, None, toy_overrides(toy, tmp_path / "run", DIM) + [
        "train.max_steps=4", "train.batch_size=8", "data.max_patches=16", "train.log_every=3"])
    info, reporter = D.init_distributed("cpu"), Reporter(verbosity=-1)
    train_recs, val_recs, table = T.prepare_data(cfg, reporter)
    model, raw = T.build_model(cfg, table, info, reporter)
    data = T.build_data(cfg, train_recs, val_recs, table, info)
    optimizer, scheduler = T.build_optimizer_and_schedule(raw, cfg, 4)
    rec, theirs = HostSyncRecorder(ignore=("transformers/",)), HostSyncRecorder()

    def labelled(epoch: int, start: int):
        for batch in data.make_loader(epoch, start):
            rec.step = theirs.step = loop.state.step + 1
            yield batch

    loop = TrainLoop(model=model, raw_model=raw, optimizer=optimizer, scheduler=scheduler, train_cfg=cfg.train,
                     grad_clip=cfg.optim.grad_clip, info=info, run_dir=tmp_path / "run", reporter=reporter,
                     config_dict={}, step_fn=T.make_step_fn(model, raw, cfg, info), make_loader=labelled,
                     batches_per_epoch=data.sampler.batches_per_epoch())
    with theirs, rec:
        loop.run()
    assert rec.records == [], [(r.step, r.op, r.where) for r in rec.records]
    assert {r.where.split("site-packages/")[-1].split(":")[0] for r in theirs.records} == {"transformers/masking_utils.py"}
    steps, _ = metrics(tmp_path / "run")
    assert [s["step"] for s in steps] == [1, 3, 4]
    assert all(type(s[k]) is float for s in steps for k in ("loss", "grad_norm", "temp_slide_report"))
