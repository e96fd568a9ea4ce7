"""``mstar pretrain --stage 2``: self-taught training of the patch extractor (design §6), exported as mSTAR weights.

Steps of :func:`run_stage2`:

1. teacher targets (:mod:`~mstar_extract.pretrain.teacher`): computed once per slide, sharded by rank, reused;
2. training: patches read at the bag coordinates (:mod:`~mstar_extract.pretrain.stage2_data`), augmented
   (:mod:`~mstar_extract.pretrain.stage2_augment`) and preprocessed exactly as in extraction; student + proj
   (:mod:`~mstar_extract.pretrain.student`) under DDP; loss = D(proj(student(x)), target) + λ·D'(student(x),
   ema(x)) (:mod:`~mstar_extract.pretrain.stage2_losses`); AdamW, warm-up + cosine, AMP, atomic checkpoints,
   ``--resume auto``, ``metrics.jsonl``;
3. export (rank 0): ``student.pth`` (released mSTAR format, strict-load verified), ``proj.pth``,
   ``model_card.json``.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import torch

from mstar_extract import __version__
from mstar_extract.console import Reporter
from mstar_extract.errors import MstarError, UsageError
from mstar_extract.pretrain import checkpoint as ckpt
from mstar_extract.pretrain import dist as D
from mstar_extract.pretrain.config import config_to_dict, save_config
from mstar_extract.pretrain.loop import TrainLoop, build_optimizer, total_steps, warmup_cosine
from mstar_extract.pretrain.stage2_config import Stage2Config
from mstar_extract.store.atomic import write_text_atomic

log = logging.getLogger("mstar")

CARD_FORMAT = "mstar-stage2-student/1"


@dataclass
class Stage2Result:
    """What a stage-2 run produced (on rank 0; other ranks get the same step counts)."""

    run_dir: Path
    steps: int
    targets_computed: list[str] = field(default_factory=list)
    targets_reused: list[str] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    student_path: Path | None = None
    proj_path: Path | None = None
    card_path: Path | None = None


CONFIG_CLASS = Stage2Config


def main(cfg: Stage2Config, resume: str | None = None, reporter: Reporter | None = None) -> int:
    """Entry point of ``mstar pretrain --stage 2`` (the CLI resolved the config, ``--set`` and ``--out``)."""
    run_stage2(cfg, resume=resume, reporter=reporter)
    return 0


def _check(cfg: Stage2Config) -> tuple[Path, Path]:
    manifest = Path(cfg.data.manifest).expanduser() if cfg.data.manifest else None
    teacher = Path(cfg.teacher.file).expanduser() if cfg.teacher.file else None
    if manifest is None:
        raise UsageError("data.manifest is required (a CSV with slide_id, slide, features)")
    if teacher is None:
        raise UsageError("teacher.file is required (the teacher export of `mstar pretrain --stage 1`)")
    if not teacher.is_file():
        raise UsageError(f"{teacher}: teacher file not found (teacher.file)")
    if cfg.train.batch_size % cfg.data.slides_per_batch:
        raise UsageError(f"train.batch_size ({cfg.train.batch_size}) must be a multiple of data.slides_per_batch "
                         f"({cfg.data.slides_per_batch})")
    return manifest, teacher


def run_stage2(cfg: Stage2Config, resume: str | None = None, reporter: Reporter | None = None) -> Stage2Result:
    """Run stage 2 with a resolved config (single process, or one rank of a torchrun job).

    Relative paths in the config are relative to the current directory (as in stage 1).
    """
    reporter = reporter or Reporter()
    manifest_path, teacher_file = _check(cfg)
    info = D.init_distributed(cfg.dist.device, cfg.dist.backend, cfg.dist.timeout_s)
    try:
        return _run(cfg, info, manifest_path, teacher_file, resume, reporter)
    finally:
        D.cleanup()


def _run(cfg: Stage2Config, info: D.DistInfo, manifest_path: Path, teacher_file: Path, resume: str | None,
         reporter: Reporter) -> Stage2Result:
    from mstar_extract.pretrain.stage2_data import read_stage2_manifest
    from mstar_extract.pretrain.teacher import compute_targets, targets_path, targets_valid, teacher_sha256

    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
    entries = read_stage2_manifest(manifest_path)
    prepared = None
    if ckpt.resolve_resume(resume, run_dir) is None:  # a fresh run: check/fetch the student weights first
        from mstar_extract.pretrain.student import prepare_student_init

        prepared = prepare_student_init(cfg.student.init, cfg.student.arch, warn_stream=reporter.stderr)
    t_hash = teacher_sha256(teacher_file) if info.is_main else None
    t_hash = D.broadcast_object(t_hash)
    targets_dir = Path(cfg.teacher.targets_dir) if cfg.teacher.targets_dir else run_dir / "targets"
    tdev = info.device if cfg.teacher.device == "auto" else D.resolve_device(cfg.teacher.device, info.local_rank)

    # 1. teacher targets -----------------------------------------------------------------------------------
    result = Stage2Result(run_dir=run_dir, steps=0)
    with (reporter.progress(len(entries), "stage 2 targets", unit="slide") if info.is_main else nullcontext()) as bar:
        tinfo = compute_targets(entries, teacher_file, targets_dir, tdev, cfg.teacher.dtype, info.rank,
                                info.world_size, t_hash,
                                on_slide=(lambda sid, c: bar.update(info.world_size)) if bar is not None else None)
    D.barrier()
    for part in D.all_gather_object((tinfo.computed, tinfo.reused)):
        result.targets_computed += part[0]
        result.targets_reused += part[1]
    bad = [e.slide_id for e in entries if not targets_valid(targets_path(targets_dir, e.slide_id), e, t_hash)]
    if bad:
        raise MstarError(f"{targets_dir}: targets missing or stale after computing them: {', '.join(bad[:5])}")
    if info.is_main:
        reporter.event("targets", computed=len(result.targets_computed), reused=len(result.targets_reused))
        reporter.info(f"targets: {len(result.targets_computed)} computed, {len(result.targets_reused)} reused "
                      f"({targets_dir})")

    _train(cfg, info, entries, targets_dir, t_hash, teacher_file, manifest_path, resume, reporter, result, prepared)
    return result


_RESUME_KEYS = (("student", "arch"), ("student", "proj_dim"), ("train", "batch_size"), ("train", "seed"),
                ("data", "slides_per_batch"), ("data", "patches_per_slide"))
"""Settings a resumed run must share with its checkpoint (the network shape and the batch schedule)."""


def _check_resume_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    for sec, key in _RESUME_KEYS:
        old, new = saved.get(sec, {}).get(key), current[sec][key]
        if sec in saved and old != new:
            raise UsageError(f"{path}: checkpoint was trained with {sec}.{key}={old!r}, this run has {new!r}; "
                             "use the same setting or a new --out")


class Stage2Loop(TrainLoop):
    """The shared :class:`~mstar_extract.pretrain.loop.TrainLoop`, plus the EMA update after every optimiser step."""

    def __init__(self, *, ema: Any, student: torch.nn.Module, ema_cfg: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self.ema, self.student, self.ema_cfg = ema, student, ema_cfg
        self.momentum = float(ema_cfg.ema_momentum)

    def _optimise(self, loss: torch.Tensor) -> float | None:
        from mstar_extract.pretrain.student import ema_momentum

        gnorm = super()._optimise(loss)
        self.momentum = ema_momentum(self.state.step, self.total_steps, self.ema_cfg.ema_momentum,
                                     self.ema_cfg.ema_schedule)
        self.ema.update(self.student, self.momentum)
        return gnorm


def _train(cfg: Stage2Config, info: D.DistInfo, entries: list, targets_dir: Path, t_hash: str, teacher_file: Path,
           manifest_path: Path, resume: str | None, reporter: Reporter, result: Stage2Result,
           prepared: Any = None) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader

    from mstar_extract.models.preprocess import preprocess
    from mstar_extract.models.registry import get_spec
    from mstar_extract.pretrain.stage2_augment import augment_uint8
    from mstar_extract.pretrain.stage2_data import Stage2Batches, clean_worker_errors, sources_for
    from mstar_extract.pretrain.stage2_losses import Stage2Loss
    from mstar_extract.pretrain.student import (EmaModel, StudentInit, StudentWithProj, build_student_backbone,
                                                 count_parameters, param_groups)
    from mstar_extract.pretrain.teacher import read_targets, targets_path

    dev, run_dir = info.device, result.run_dir
    resume_path = ckpt.resolve_resume(resume, run_dir)
    state = ckpt.load_checkpoint(resume_path, map_location="cpu") if resume_path is not None else None
    if state is not None:
        _check_resume_compatible(state.get("config", {}), config_to_dict(cfg), resume_path)
        old = state.get("extra", {}).get("teacher_sha256")
        if old and old != t_hash:
            raise UsageError(f"{resume_path}: checkpoint was trained against another teacher ({old[:12]}...); "
                             "use a new --out, or resume with the same teacher file")

    torch.manual_seed(cfg.train.seed)
    if state is None:
        backbone, spec, sinit = build_student_backbone(cfg.student.init, cfg.student.arch, warn_stream=reporter.stderr,
                                                       seed=cfg.train.seed, prepared=prepared)
    else:  # the weights come from the checkpoint: no hub download on resume
        sinit = StudentInit(**state["extra"]["student_init"])
        spec = get_spec(sinit.spec_name)
        backbone = spec.build()
    torch.manual_seed(cfg.train.seed + 1)  # proj init, identical on every rank
    first = targets_path(targets_dir, entries[0].slide_id)
    target_dim = int(read_targets(first)[0].shape[1])
    proj_dim = cfg.student.proj_dim or target_dim
    if proj_dim != target_dim:
        raise UsageError(f"student.proj_dim {proj_dim} differs from the teacher's target size {target_dim} ({first})")
    raw = StudentWithProj(backbone, spec.feature_dim, proj_dim)
    if cfg.student.grad_checkpointing:
        raw.set_grad_checkpointing(True)
    raw.to(dev).train()
    ema = EmaModel(raw.student).to(dev)
    model: torch.nn.Module = raw
    if info.distributed:
        model = DDP(raw, device_ids=[dev.index] if dev.type == "cuda" else None,
                    find_unused_parameters=cfg.dist.find_unused_parameters)

    tc = cfg.train
    dataset = Stage2Batches(sources_for(entries, targets_dir, cfg.data.patch_size_level0), tc.batch_size,
                            cfg.data.slides_per_batch, tc.seed, info.rank, info.world_size, spec.input_size,
                            cfg.data.backend, cfg.data.patches_per_slide, cfg.data.open_slides_per_worker)
    per_epoch = len(dataset)
    if per_epoch == 0:
        raise UsageError(f"too few patches for one batch of {tc.batch_size} on each of {info.world_size} process(es); "
                         "lower train.batch_size")

    def make_loader(epoch: int, start: int) -> Iterable[dict[str, torch.Tensor]]:
        dataset.set_epoch(epoch)
        kw: dict[str, Any] = {"batch_size": None, "sampler": range(start, len(dataset)),
                              "num_workers": tc.num_workers, "pin_memory": dev.type == "cuda"}
        if tc.num_workers > 0:
            kw["prefetch_factor"] = max(1, cfg.data.prefetch_batches)
        return clean_worker_errors(DataLoader(dataset, **kw))

    criterion = Stage2Loss(cfg.loss.distance, cfg.loss.ema_distance, cfg.loss.ema_weight)
    global_batch = tc.batch_size * info.world_size
    clock = {"t": time.monotonic(), "step": 0}

    def step_fn(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        x = batch["pixels"].to(dev, non_blocking=True)
        target = batch["targets"].to(dev, non_blocking=True)
        with torch.autocast(device_type=dev.type, enabled=False):
            gen = torch.Generator(device=dev)
            gen.manual_seed((tc.seed * 1_000_003 + info.rank * 7919 + loop.state.step) & 0x7FFFFFFF)
            x = augment_uint8(x, cfg.augment, gen)
            x = preprocess(x, spec.input_size, spec.mean, spec.std)
        feats, pred = model(x)
        ema_feats = ema(x) if cfg.loss.ema_weight > 0 else None
        parts = criterion(pred, target, feats, ema_feats)
        now = time.monotonic()
        clock["step"] += 1
        rate = clock["step"] * global_batch / max(now - clock["t"], 1e-9)
        return {"loss": parts.total, "loss_teacher": parts.teacher.detach(), "loss_ema": parts.ema.detach(),
                "ema_momentum": loop.momentum, "patches_per_s": rate}

    groups = param_groups(raw, cfg.optim.weight_decay, cfg.optim.layer_decay, cfg.optim.proj_lr_scale)
    for g in groups:
        g["lr"] = cfg.optim.lr * g.get("lr_scale", 1.0)
    optimizer = build_optimizer(groups, cfg.optim)
    n_total = total_steps(tc, per_epoch)
    scheduler = warmup_cosine(optimizer, cfg.optim.warmup_steps, n_total, cfg.optim.min_lr_ratio)
    extra = {"teacher_sha256": t_hash, "student_init": asdict(sinit)}
    loop = Stage2Loop(
        ema=ema, student=raw.student, ema_cfg=cfg.loss,
        model=model, raw_model=raw, optimizer=optimizer, scheduler=scheduler, train_cfg=tc,
        grad_clip=cfg.optim.grad_clip, info=info, run_dir=run_dir, reporter=reporter, config_dict=config_to_dict(cfg),
        step_fn=step_fn, make_loader=make_loader, batches_per_epoch=per_epoch,
        extra_state=lambda: {**extra, "ema": ema.module.state_dict()},
        desc=f"stage 2 ({global_batch} patches/step)",
    )
    if state is not None:
        loop.load(state)
        ema.module.load_state_dict(state["extra"]["ema"])
        if info.is_main:
            reporter.info(f"resumed from {resume_path} at step {loop.state.step}")
    elif resume == "auto" and info.is_main:
        reporter.info(f"no checkpoint in {ckpt.checkpoint_dir(run_dir)}: starting a new run")
    if info.is_main:
        reporter.info(f"stage 2: {len(entries)} slides, {sum(dataset.n_patches)} patches, student {spec.name} "
                      f"({count_parameters([raw]) / 1e6:.1f}M trainable), {info.world_size} process(es) on {dev}, "
                      f"{n_total} steps of {global_batch} patches")
    final = loop.run()
    result.steps = final.step
    result.history = _read_history(run_dir / "metrics.jsonl") if info.is_main else []
    if final.step < loop.total_steps:  # train.stop_after_steps: leave with a checkpoint, export at the end
        if info.is_main:
            reporter.info(f"stopped at step {final.step} of {loop.total_steps}; continue with --resume auto")
    elif info.is_main:
        _export(cfg, raw, spec, sinit, t_hash, teacher_file, manifest_path, entries, dataset.n_patches, final.step,
                info.world_size, result)
        reporter.info(f"stage 2 done at step {final.step}: student {result.student_path}")
        reporter.event("done", step=final.step, student=str(result.student_path), proj=str(result.proj_path),
                       card=str(result.card_path))
    D.barrier()


def _read_history(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "loss" in rec:
            out.append(rec)
    return out


def _export(cfg: Stage2Config, model: Any, spec: Any, sinit: Any, t_hash: str, teacher_file: Path,
            manifest_path: Path, entries: list, n_patches: list[int], steps: int, world: int,
            result: Stage2Result) -> None:
    from mstar_extract.models.weights import sha256_file
    from mstar_extract.pretrain.stage2_data import file_sha256
    from mstar_extract.pretrain.student import export_student

    run_dir = result.run_dir
    student_path, proj_path = run_dir / cfg.export.student, run_dir / cfg.export.proj
    export_student(model, spec, student_path, proj_path, verify=cfg.export.verify)
    card = {
        "format": CARD_FORMAT,
        "model": spec.name,
        "architecture": spec.architecture,
        "timm_kwargs": spec.kwargs,
        "feature_dim": spec.feature_dim,
        "proj_dim": model.target_dim,
        "input_size": spec.input_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "init": asdict(sinit),
        "teacher_file": str(teacher_file),
        "teacher_sha256": t_hash,
        "manifest": str(manifest_path),
        "manifest_sha256": file_sha256(manifest_path),
        "n_slides": len(entries),
        "n_patches": int(sum(n_patches)),
        "steps": steps,
        "global_batch": cfg.train.batch_size * world,
        "world_size": world,
        "student_file": cfg.export.student,
        "student_sha256": sha256_file(student_path, use_cache=False),
        "proj_file": cfg.export.proj,
        "proj_sha256": sha256_file(proj_path, use_cache=False),
        "final_metrics": result.history[-1] if result.history else None,
        "usage": f"mstar extract SLIDES OUT --model {spec.name} --weights {student_path}",
        "config": config_to_dict(cfg),
        "mstar_extract_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    card_path = run_dir / cfg.export.card
    write_text_atomic(card_path, json.dumps(card, indent=2, default=str) + "\n")
    result.student_path, result.proj_path, result.card_path = student_path, proj_path, card_path
