"""Stage 2 (self-taught patch extractor) on real generated slides, bags, a real exported teacher and a real timm
student (``timm:test_vit``, 64-d): targets computed once and reused, teacher untouched, EMA frozen, loss falls,
exact resume, export formats."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mstar_extract.errors import UsageError
from mstar_extract.pretrain.config import load_config
from mstar_extract.pretrain.stage1.export import export_teacher, load_teacher
from mstar_extract.pretrain.stage1.transmil import TransMIL
from mstar_extract.pretrain.stage2.config import AugmentConfig, Stage2Config
from mstar_extract.pretrain.stage2.data import epoch_units, rank_batches, read_stage2_manifest
from mstar_extract.pretrain.stage2.teacher import compute_targets, read_targets, teacher_sha256
from mstar_extract.pretrain.stage2.toydata import make_stage2_toy_data
from mstar_extract.pretrain.stage2.train import run_stage2

AGG = dict(in_dim=64, dim=32, heads=2, landmarks=8, pinv_iterations=6, residual_conv_kernel=3, dropout=0.0,
           attn_dropout=0.0)


def make_teacher(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    export_teacher(TransMIL(**AGG), AGG, path)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("stage2_toy")
    data = make_stage2_toy_data(root / "data", n_slides=2, seed=0)
    # "targets": a targets folder shared by the tests that are not about computing targets (filled once, reused)
    return {"root": root, "data": data, "teacher": make_teacher(root / "teacher.pt"), "targets": root / "targets"}


def cfg_for(toy: dict, out: Path, *extra: str) -> Stage2Config:
    return load_config(Stage2Config, None, [
        f"data.manifest={toy['data'].manifest}", f"teacher.file={toy['teacher']}", "student.init=random",
        "student.arch=timm:test_vit", "train.batch_size=4", "data.slides_per_batch=2", "train.num_workers=0",
        "train.log_every=1", "optim.lr=2e-3", "optim.warmup_steps=1", "optim.weight_decay=0.0",
        f"run.out_dir={out}", *extra])


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.glob("*.h5"))}


def test_targets_are_the_teachers_contextual_embeddings_and_are_reused(toy: dict, tmp_path: Path) -> None:
    entries = read_stage2_manifest(toy["data"].manifest)
    tdir = tmp_path / "targets"
    first = compute_targets(entries, toy["teacher"], tdir, dtype="float32")
    assert sorted(first.computed) == sorted(e.slide_id for e in entries) and not first.reused
    before = _mtimes(tdir)
    second = compute_targets(entries, toy["teacher"], tdir, dtype="float32")
    assert not second.computed and sorted(second.reused) == sorted(first.computed)
    assert _mtimes(tdir) == before  # nothing rewritten

    # the stored targets are the frozen teacher's per-patch outputs over the whole slide, row-aligned with coords
    import h5py

    teacher = load_teacher(toy["teacher"])
    with h5py.File(entries[0].features, "r") as f:
        feats, coords = f["features"][()], f["coords"][()]
    want = teacher.patch_embeddings(torch.from_numpy(feats)[None])[1][0].numpy()
    got, got_coords, attrs = read_targets(tdir / f"{entries[0].slide_id}.h5")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got_coords, coords)
    assert attrs["teacher_sha256"] == teacher_sha256(toy["teacher"]) and attrs["complete"] == 1

    # a changed bag (new mtime) or another teacher makes them stale -> recomputed
    os.utime(entries[0].features, ns=(before[f"{entries[0].slide_id}.h5"], before[f"{entries[0].slide_id}.h5"] + 10**9))
    third = compute_targets(entries, toy["teacher"], tdir, dtype="float32")
    assert third.computed == [entries[0].slide_id]
    other = make_teacher(tmp_path / "other_teacher.pt", seed=5)
    fourth = compute_targets(entries, other, tdir)
    assert sorted(fourth.computed) == sorted(e.slide_id for e in entries)


def test_sharded_targets_split_the_slides_between_ranks(toy: dict, tmp_path: Path) -> None:
    entries = read_stage2_manifest(toy["data"].manifest)
    r0 = compute_targets(entries, toy["teacher"], tmp_path, rank=0, world_size=2)
    r1 = compute_targets(entries, toy["teacher"], tmp_path, rank=1, world_size=2)
    assert r0.computed == [entries[0].slide_id] and r1.computed == [entries[1].slide_id]


def test_ema_never_receives_gradients() -> None:
    from mstar_extract.models.registry import get_spec
    from mstar_extract.pretrain.loop import build_optimizer
    from mstar_extract.pretrain.stage2.losses import Stage2Loss
    from mstar_extract.pretrain.stage2.student import EmaModel, StudentWithProj, param_groups

    torch.manual_seed(0)
    spec = get_spec("timm:test_vit")
    model = StudentWithProj(spec.build(), spec.feature_dim, 32).train()
    ema = EmaModel(model.student)
    cfg = load_config(Stage2Config).optim
    cfg.lr = 1e-2
    groups = param_groups(model, 0.0, 1.0)
    for g in groups:
        g["lr"] = cfg.lr
    opt = build_optimizer(groups, cfg)
    loss_fn = Stage2Loss(lam=0.6)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    for _ in range(3):
        x = torch.randn(4, 3, 160, 160)
        feats, pred = model(x)
        parts = loss_fn(pred, torch.randn(4, 32), feats, ema(x))
        opt.zero_grad()
        parts.total.backward()
        opt.step()
        ema.update(model.student, 0.9)
        assert all(not p.requires_grad and p.grad is None for p in ema.parameters())
        assert not ema.training
    assert all(p.grad is not None for p in model.student.parameters() if p.requires_grad)
    moved = [k for k, v in ema.module.state_dict().items() if not torch.equal(v, start[k])]
    assert moved, "the EMA follows the student"
    sd_s = model.student.state_dict()
    assert any(not torch.equal(v, sd_s[k]) for k, v in ema.module.state_dict().items())


def test_schedule_is_deterministic_balanced_and_covers_every_patch() -> None:
    n = [37, 5, 20]
    units = epoch_units(n, unit=4, seed=3, epoch=0)
    assert [ (u.slide, u.rows.tolist()) for u in units] == [(u.slide, u.rows.tolist()) for u in epoch_units(n, 4, 3, 0)]
    for s, k in enumerate(n):
        seen = np.unique(np.concatenate([u.rows for u in units if u.slide == s]))
        np.testing.assert_array_equal(seen, np.arange(k))
    b0, b1 = rank_batches(units, 2, 0, 2), rank_batches(units, 2, 1, 2)
    assert len(b0) == len(b1) > 0
    assert epoch_units(n, 4, 3, 1)[0].rows.tolist() != units[0].rows.tolist() or len(units) == 1


def test_augmentation_is_seeded_and_keeps_uint8_patches() -> None:
    from mstar_extract.pretrain.stage2.augment import augment_uint8

    x = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    cfg = AugmentConfig()
    a = augment_uint8(x, cfg, torch.Generator().manual_seed(1))
    b = augment_uint8(x, cfg, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == x.shape and torch.equal(a, b)
    geo = AugmentConfig(hflip=1.0, vflip=0.0, rot90=False, color_jitter=0.0)
    assert torch.equal(augment_uint8(x, geo, torch.Generator()), x.flip(2))
    off = AugmentConfig(hflip=0.0, vflip=0.0, rot90=False, color_jitter=0.0)
    assert torch.equal(augment_uint8(x, off, torch.Generator()), x)


def test_short_run_learns_keeps_teacher_and_reuses_targets(toy: dict, tmp_path: Path) -> None:
    teacher_hash = teacher_sha256(toy["teacher"])
    teacher_bytes = toy["teacher"].read_bytes()
    tdir = tmp_path / "shared_targets"
    res = run_stage2(cfg_for(toy, tmp_path / "run1", f"teacher.targets_dir={tdir}", "train.epochs=2",
                             "train.max_steps=24",
                             "augment.color_jitter=0"))
    losses = [h["loss_teacher"] for h in res.history]
    assert res.steps == len(losses) == 24
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:2]), losses
    assert sorted(res.targets_computed) == ["toy00", "toy01"]
    assert toy["teacher"].read_bytes() == teacher_bytes and teacher_sha256(toy["teacher"]) == teacher_hash

    # exports: student.pth loads strict into the same registry network, proj.pth, model card
    from mstar_extract.models.registry import get_spec
    from mstar_extract.models.weights import load_into, load_state_dict_file

    spec = get_spec("timm:test_vit")
    load_into(spec.build(), load_state_dict_file(res.student_path), spec, res.student_path)
    proj = torch.load(res.proj_path, weights_only=True)["model_state_dict"]  # mSTAR's layout (zero-shot code)
    assert set(proj) == {"proj.weight", "proj.bias"}
    assert proj["proj.weight"].shape == (32, 64) and proj["proj.bias"].shape == (32,)
    assert res.zeroshot_path is None  # this toy teacher has no stage-1 report encoder beside it
    card = json.loads(res.card_path.read_text())
    assert card["teacher_sha256"] == teacher_hash and card["steps"] == res.steps
    assert card["init"]["init"] == "random" and card["manifest_sha256"] and card["n_patches"] == sum(toy["data"].n_patches)
    metrics = [json.loads(line) for line in (tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["patches_per_s"] > 0 for m in metrics if "loss" in m)

    # a second run with the same teacher reuses every target file untouched
    before = _mtimes(tdir)
    res2 = run_stage2(cfg_for(toy, tmp_path / "run2", f"teacher.targets_dir={tdir}", "train.max_steps=1"))
    assert res2.targets_computed == [] and sorted(res2.targets_reused) == ["toy00", "toy01"]
    assert _mtimes(tdir) == before


def test_resume_auto_continues_exactly(toy: dict, tmp_path: Path) -> None:
    common = ("train.max_steps=4", "train.ckpt_every=2", "loss.ema_momentum=0.5")
    full = run_stage2(cfg_for(toy, tmp_path / "full", *common))
    part = run_stage2(cfg_for(toy, tmp_path / "part", *common, "train.stop_after_steps=2", "train.num_workers=2",
                              "student.grad_checkpointing=true"))
    assert part.steps == 2 and part.student_path is None
    rest = run_stage2(cfg_for(toy, tmp_path / "part", *common), resume="auto")
    assert rest.steps == 4
    by_step = {h["step"]: h["loss"] for h in full.history}
    resumed = {h["step"]: h["loss"] for h in rest.history if h["step"] > 2}
    for step in (3, 4):
        assert resumed[step] == pytest.approx(by_step[step], rel=1e-4, abs=1e-5)
    with pytest.raises(UsageError, match="train.batch_size"):
        run_stage2(cfg_for(toy, tmp_path / "part", *common, "train.batch_size=8"), resume="auto")
    a = torch.load(full.student_path, weights_only=True)
    b = torch.load(rest.student_path, weights_only=True)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_clear_errors_before_any_work(toy: dict, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="teacher.file"):
        run_stage2(cfg_for(toy, tmp_path / "x", "teacher.file=null"))
    bad = tmp_path / "m.csv"
    bad.write_text("slide_id,slide,features\na,missing.svs,missing.h5\n")
    with pytest.raises(UsageError, match="missing.svs"):
        read_stage2_manifest(bad)
    with pytest.raises(UsageError, match="multiple"):
        run_stage2(cfg_for(toy, tmp_path / "y", "train.batch_size=5"))


def test_docs_and_example_configs_match_the_defaults() -> None:
    from mstar_extract.pretrain.config import config_reference

    repo = Path(__file__).resolve().parents[1]
    doc = (repo / "docs" / "pretrain.md").read_text(encoding="utf-8")
    section = doc[doc.index("# Stage 2"):]
    assert config_reference(Stage2Config) in section  # every field, default and source, verbatim
    full = load_config(Stage2Config, repo / "examples" / "pretrain" / "stage2.yaml")
    defaults = Stage2Config()
    for name in ("teacher", "loss", "augment", "optim", "dist", "export"):
        if name == "teacher":
            assert full.teacher.dtype == defaults.teacher.dtype
            continue
        assert getattr(full, name) == getattr(defaults, name), name
    assert (full.student.init, full.student.arch, full.loss.ema_weight) == ("uni", "mstar", 0.6)
    tiny = load_config(Stage2Config, repo / "examples" / "pretrain" / "stage2_tiny.yaml")
    assert tiny.student.arch == "timm:test_vit" and tiny.teacher.file.endswith("teacher.pt")


def test_layer_decay_groups_and_distances() -> None:
    from mstar_extract.models.registry import get_spec
    from mstar_extract.pretrain.stage2.losses import DISTANCES, Stage2Loss
    from mstar_extract.pretrain.stage2.student import StudentWithProj, ema_momentum, param_groups

    spec = get_spec("timm:test_vit")
    model = StudentWithProj(spec.build(), spec.feature_dim, 8)
    flat = param_groups(model, 0.05, 1.0)
    decayed = param_groups(model, 0.05, 0.5, proj_lr_scale=10.0)
    n = sum(p.numel() for p in model.parameters())
    for groups in (flat, decayed):
        assert sum(p.numel() for g in groups for p in g["params"]) == n
    assert {g["lr_scale"] for g in flat} == {1.0}
    scales = sorted({round(g["lr_scale"], 6) for g in decayed})
    assert len(scales) > 3 and scales[0] < 0.1 and 10.0 in scales
    assert ema_momentum(0, 100, 0.99, "cosine") == pytest.approx(0.99)
    assert ema_momentum(100, 100, 0.99, "cosine") == pytest.approx(1.0)
    a = torch.randn(5, 8)
    for name, fn in DISTANCES.items():
        assert float(fn(a, a)) == pytest.approx(0.0, abs=1e-6), name
        assert float(fn(a, -a)) > 0.1, name
    parts = Stage2Loss(lam=0.6)(a, -a, a, -a)
    assert float(parts.total) == pytest.approx(2.0 + 0.6 * 2.0, rel=1e-5)


def test_unreadable_slide_during_training_is_one_clear_error(toy: dict, tmp_path: Path) -> None:
    import shutil

    from mstar_extract.errors import MstarError

    data = tmp_path / "data"
    shutil.copytree(toy["data"].manifest.parent, data)
    tdir = tmp_path / "targets"
    run_stage2(cfg_for({**toy, "data": type(toy["data"])(data / "manifest.csv", [], [], [])}, tmp_path / "a",
                       f"teacher.targets_dir={tdir}", "train.max_steps=1"))
    (data / "slides" / "toy01.svs").write_bytes(b"not a slide at all")  # bags untouched: targets are reused
    with pytest.raises(MstarError) as err:
        run_stage2(cfg_for({**toy, "data": type(toy["data"])(data / "manifest.csv", [], [], [])}, tmp_path / "b",
                           f"teacher.targets_dir={tdir}", "train.num_workers=1", "train.max_steps=20"))
    msg = str(err.value)
    assert "toy01.svs" in msg and "\n" not in msg and "Traceback" not in msg


def test_bench_train_reports_patches_per_second() -> None:
    from click.testing import CliRunner

    from mstar_extract.cli import main

    res = CliRunner().invoke(main, ["bench", "train", "--model", "timm:test_vit", "--batch-size", "4", "--steps", "2",
                                    "--warmup", "1", "--device", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout[res.stdout.index("{"):])
    assert doc["patches_per_s"] > 0 and doc["batch_size"] == 4 and doc["steps"] == 2 and doc["device"] == "cpu"


def _recorded_run(toy: dict, out: Path, *extra: str):
    """Stage 2 built by its own steps (train.py), run under the host-sync recorder; each record carries the step
    during which it happened (the label moves when the loader hands out the next batch)."""
    from mstar_extract.console import Reporter
    from mstar_extract.pretrain import dist as D
    from mstar_extract.pretrain.stage2 import train as T
    from mstar_extract.testing.syncs import HostSyncRecorder

    cfg = cfg_for(toy, out, *extra)
    info = D.init_distributed("cpu")
    run = T.start_run(cfg, info, Reporter(verbosity=-1), *T._check(cfg))
    T.compute_all_targets(run, T.Stage2Result(run.run_dir, 0))
    student = T.build_student(run, None, None)
    loop = T.build_loop(run, student, T.build_batches(run, student))
    rec = HostSyncRecorder()
    batches = loop.make_loader

    def labelled(epoch: int, start: int):
        for batch in batches(epoch, start):
            rec.step = loop.state.step + 1
            yield batch

    loop.make_loader = labelled
    with rec:
        loop.run()
    return loop, rec


def test_training_steps_never_wait_for_the_device(toy: dict, tmp_path: Path) -> None:
    """No step reads a value back from the device (no .item()/float(), nonzero, boolean-mask indexing): on a GPU
    the host queues step after step. Metrics still hold exactly the logging steps' values."""
    loop, rec = _recorded_run(toy, tmp_path / "run", "train.log_every=3", "train.max_steps=5", "augment.hflip=0.5",
                              "augment.color_jitter=0.8", "augment.hue=0.05", f"teacher.targets_dir={toy['targets']}")
    assert loop.state.step == 5
    assert rec.records == [], [(r.step, r.op, r.where) for r in rec.records]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 3, 5]
    for m in lines:
        assert all(type(m[k]) is float for k in ("loss", "loss_teacher", "loss_ema", "grad_norm", "patches_per_s"))
        assert m["loss"] == pytest.approx(m["loss_teacher"] + 0.6 * m["loss_ema"], rel=1e-5)


def test_random_init_is_not_extractions_random_weights_warning(toy: dict, tmp_path: Path) -> None:
    """`mstar pretrain --stage 2 --init random` trains from scratch on purpose: one info line, not extraction's
    four-line `--weights random` warning about meaningless features."""
    from click.testing import CliRunner

    from mstar_extract.cli import main

    args = ["pretrain", "--stage", "2", "--init", "random", "--out", str(tmp_path / "r")]
    for s in ["train.max_steps=1", "train.batch_size=4", "data.slides_per_batch=2", "train.num_workers=0",
              "student.arch=timm:test_vit", f"data.manifest={toy['data'].manifest}", f"teacher.file={toy['teacher']}",
              f"teacher.targets_dir={toy['targets']}"]:
        args += ["--set", s]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    err = res.stderr
    assert "MEANINGLESS" not in err and "--weights random" not in err, err
    assert "student.init=random: the student (timm:test_vit) starts from a random initialisation" in err


def test_a_malicious_teacher_file_stops_stage_2_before_any_work(toy: dict, tmp_path: Path) -> None:
    from mstar_extract.errors import MstarError

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple:
            return (open, (str(marker), "w"))

    obj = torch.load(toy["teacher"], weights_only=True)
    obj["meta"] = {"x": Payload()}
    evil = tmp_path / "teacher.pt"
    torch.save(obj, evil)
    with pytest.raises(MstarError, match=f"^{evil}: refused to load this teacher file"):
        run_stage2(cfg_for(toy, tmp_path / "run", f"teacher.file={evil}"))
    assert not marker.exists()
    assert not list((tmp_path / "run" / "targets").glob("*.h5"))


def test_a_student_from_a_weights_file_holds_its_tensors_and_training_never_writes_to_the_file(tmp_path: Path) -> None:
    """``student.init=PATH``: the network is built without a random initialisation and adopts the file's tensors,
    which are mapped from the file copy-on-write: an optimiser step changes the student, never the file."""
    from mstar_extract.models.registry import get_spec
    from mstar_extract.models.weights import sha256_file
    from mstar_extract.pretrain.stage2.student import StudentWithProj, build_student_backbone

    torch.manual_seed(3)
    saved = get_spec("timm:test_vit").build().state_dict()
    path = tmp_path / "init.pth"
    torch.save(saved, path)
    digest = sha256_file(path)
    backbone, spec, init = build_student_backbone(str(path), "timm:test_vit", seed=0)
    assert init.weights_source != "random" and init.weights_sha256 == digest
    got = backbone.state_dict()
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
    assert all(p.requires_grad and not p.is_meta for p in backbone.parameters())
    net = StudentWithProj(backbone, spec.feature_dim, 8).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    _, pred = net(torch.randn(2, 3, 160, 160))
    pred.square().mean().backward()
    opt.step()
    assert not torch.equal(backbone.state_dict()["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])
    assert sha256_file(path, use_cache=False) == digest  # the file is as it was


def _cuda_loop(precision: str, run_dir: Path, reporter=None):
    """A stage-2 loop on the GPU (the bench's set-up: random timm:test_vit student, patches already on the device)."""
    from mstar_extract.console import Reporter
    from mstar_extract.pretrain.config import apply_overrides
    from mstar_extract.pretrain.dist import DistInfo
    from mstar_extract.pretrain.stage2.step import Stage2Loop, Student, build_optimizer_and_schedule
    from mstar_extract.pretrain.stage2.student import EmaModel, StudentWithProj, build_student_backbone

    dev = torch.device("cuda", torch.cuda.current_device())
    cfg = apply_overrides(Stage2Config(), ["train.batch_size=8", f"train.precision={precision}", "train.log_every=4"])
    backbone, spec, init = build_student_backbone("random", "timm:test_vit", seed=0)
    net = StudentWithProj(backbone, spec.feature_dim, 32).to(dev).train()
    student = Student(net, net, EmaModel(net.student).to(dev), spec, init)
    opt, sched = build_optimizer_and_schedule(net, cfg, 20)
    g = torch.Generator(device=dev).manual_seed(0)
    batch = {"pixels": torch.randint(0, 256, (8, 160, 160, 3), dtype=torch.uint8, device=dev, generator=g),
             "targets": torch.randn(8, 32, device=dev, generator=g)}
    loop = Stage2Loop(student=student, cfg=cfg, optimizer=opt, scheduler=sched, info=DistInfo(device=dev),
                      run_dir=run_dir, reporter=reporter or Reporter(verbosity=-1), config_dict={},
                      make_loader=lambda e, s: [], batches_per_epoch=20)
    return loop, batch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_training_steps_do_not_synchronise(tmp_path: Path) -> None:
    loop, batch = _cuda_loop("auto", tmp_path)
    loop.train_step(batch)  # first step: allocations, cuDNN/cuBLAS set-up
    loop.state.step += 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            res = loop.train_step(batch)
            loop.state.step += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rec = loop.log_step(res)  # the logging step reads back, once
    assert rec["loss"] == rec["loss"] and rec["grad_norm"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_trains_with_a_grad_scaler(tmp_path: Path) -> None:
    import io

    from mstar_extract.console import Reporter

    err = io.StringIO()
    loop, batch = _cuda_loop("fp16", tmp_path, Reporter(stderr=err))
    assert loop.amp_dtype == torch.float16 and loop.scaler.is_enabled()
    assert err.getvalue().count("\n") == 1 and "GradScaler" in err.getvalue()
    first = {k: v.detach().clone() for k, v in loop.student.raw.named_parameters()}
    for _ in range(6):  # the scaler may skip the first steps (inf gradients at scale 65536) while it calibrates
        res = loop.train_step(batch)
        loop.state.step += 1
    rec = loop.log_step(res)
    assert rec["loss"] == rec["loss"] and loop.scaler.get_scale() > 0
    assert any(not torch.equal(first[k], v) for k, v in loop.student.raw.named_parameters())
