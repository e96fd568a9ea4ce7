"""``mstar pretrain --stage 2``: self-taught training of the patch extractor, exported as mSTAR weights.

The steps of :func:`run_stage2`, one function each:

1. :func:`compute_all_targets` — teacher targets (:mod:`.teacher`), computed once per slide, sharded by rank,
   reused by later runs;
2. :func:`build_student` — student + ``proj`` (:mod:`.student`), DDP under torchrun, and its EMA copy, from
   ``student.init`` or from the ``--resume`` checkpoint;
3. :func:`build_batches` — the deterministic batch schedule over the bag coordinates (:mod:`.data`);
4. :func:`build_loop` + :func:`restore` + :func:`announce` — the stage-2 step (:mod:`.step`: augmentation, the extraction
   preprocessing, loss, EMA) in the shared training loop (AdamW, warm-up + cosine, AMP, atomic checkpoints,
   ``--resume auto``, ``metrics.jsonl``);
5. :func:`finish` — exports on rank 0 (:mod:`.export`: ``student.pth`` in the released mSTAR format,
   ``proj.pth``, ``model_card.json``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mstar_extract.console import Reporter
from mstar_extract.errors import MstarError, UsageError
from mstar_extract.pretrain import checkpoint as ckpt, dist as D
from mstar_extract.pretrain.config import config_to_dict, save_config
from mstar_extract.pretrain.loop import LoopState, total_steps
from mstar_extract.pretrain.stage2.config import Stage2Config
from mstar_extract.pretrain.stage2.step import Stage2Loop, Student, build_optimizer_and_schedule
from mstar_extract.pretrain.stage2.teacher import SlideEntry


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
    zeroshot_path: Path | None = None


@dataclass
class Stage2Run:
    """What the steps of one run share (the resolved inputs; nothing here changes while training)."""

    cfg: Stage2Config
    info: D.DistInfo
    reporter: Reporter
    run_dir: Path
    manifest_path: Path
    teacher_file: Path
    teacher_sha256: str
    entries: list[SlideEntry]
    targets_dir: Path


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
        return _run(start_run(cfg, info, reporter, manifest_path, teacher_file), resume)
    finally:
        D.cleanup()


def start_run(cfg: Stage2Config, info: D.DistInfo, reporter: Reporter, manifest_path: Path, teacher_file: Path) -> Stage2Run:
    """Run folder and resolved config, the manifest, the teacher's hash (computed on rank 0, shared)."""
    from mstar_extract.pretrain.stage2.data import read_stage2_manifest
    from mstar_extract.pretrain.stage2.teacher import teacher_sha256

    run_dir = Path(cfg.run.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
    entries = read_stage2_manifest(manifest_path)
    t_hash = D.broadcast_object(teacher_sha256(teacher_file) if info.is_main else None)
    targets_dir = Path(cfg.teacher.targets_dir) if cfg.teacher.targets_dir else run_dir / "targets"
    return Stage2Run(cfg, info, reporter, run_dir, manifest_path, teacher_file, t_hash, entries, targets_dir)


def _run(run: Stage2Run, resume: str | None) -> Stage2Result:
    from mstar_extract.pretrain.stage2.student import prepare_student_init

    if run.cfg.train.cpu_threads and run.info.device.type == "cpu":
        torch.set_num_threads(run.cfg.train.cpu_threads)
    resume_path = ckpt.resolve_resume(resume, run.run_dir)
    state = load_resume_state(run, resume_path)  # a bad or foreign checkpoint stops the run before any work
    # a fresh run checks (or fetches) the student's weights before the targets are computed
    prepared = prepare_student_init(run.cfg.student.init, run.cfg.student.arch) if state is None else None
    result = Stage2Result(run_dir=run.run_dir, steps=0)
    compute_all_targets(run, result)
    student = build_student(run, state, prepared)
    dataset = build_batches(run, student)
    loop = build_loop(run, student, dataset)
    restore(run, loop, state, resume, resume_path)
    announce(run, loop, dataset.n_patches)
    final = loop.run()
    finish(run, loop, student, dataset.n_patches, final, result)
    return result


def compute_all_targets(run: Stage2Run, result: Stage2Result) -> None:
    """Every slide's teacher targets (this rank's share computed or reused), then a check of all of them."""
    from mstar_extract.pretrain.stage2.teacher import compute_targets, targets_path, targets_valid

    info, cfg = run.info, run.cfg
    tdev = info.device if cfg.teacher.device == "auto" else D.resolve_device(cfg.teacher.device, info.local_rank)
    with (run.reporter.progress(len(run.entries), "stage 2 targets", unit="slide") if info.is_main else nullcontext()) as bar:
        tinfo = compute_targets(run.entries, run.teacher_file, run.targets_dir, tdev, cfg.teacher.dtype, info.rank,
                                info.world_size, run.teacher_sha256,
                                on_slide=(lambda sid, c: bar.update(info.world_size)) if bar is not None else None)
    D.barrier()
    for part in D.all_gather_object((tinfo.computed, tinfo.reused)):
        result.targets_computed += part[0]
        result.targets_reused += part[1]
    bad = [e.slide_id for e in run.entries if not targets_valid(targets_path(run.targets_dir, e.slide_id), e, run.teacher_sha256)]
    if bad:
        raise MstarError(f"{run.targets_dir}: targets missing or stale after computing them: {', '.join(bad[:5])}")
    if info.is_main:
        run.reporter.event("targets", computed=len(result.targets_computed), reused=len(result.targets_reused))
        run.reporter.info(f"targets: {len(result.targets_computed)} computed, {len(result.targets_reused)} reused "
                          f"({run.targets_dir})")


_RESUME_KEYS = (("student", "arch"), ("student", "proj_dim"), ("train", "batch_size"), ("train", "seed"),
                ("data", "slides_per_batch"), ("data", "patches_per_slide"))
"""Settings a resumed run must share with its checkpoint (the network shape and the batch schedule)."""


def _check_resume_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    for sec, key in _RESUME_KEYS:
        old, new = saved.get(sec, {}).get(key), current[sec][key]
        if sec in saved and old != new:
            raise UsageError(f"{path}: checkpoint was trained with {sec}.{key}={old!r}, this run has {new!r}; "
                             "use the same setting or a new --out")


def load_resume_state(run: Stage2Run, resume_path: Path | None) -> dict[str, Any] | None:
    """The ``--resume`` checkpoint (CPU tensors), checked against this run's settings and teacher; or None."""
    if resume_path is None:
        return None
    state = ckpt.load_checkpoint(resume_path, map_location="cpu")
    _check_resume_compatible(state.get("config", {}), config_to_dict(run.cfg), resume_path)
    old = state.get("extra", {}).get("teacher_sha256")
    if old and old != run.teacher_sha256:
        raise UsageError(f"{resume_path}: checkpoint was trained against another teacher ({old[:12]}...); "
                         "use a new --out, or resume with the same teacher file")
    return state


def _target_dim(run: Stage2Run) -> int:
    from mstar_extract.pretrain.stage2.teacher import read_targets, targets_path

    first = targets_path(run.targets_dir, run.entries[0].slide_id)
    target_dim = int(read_targets(first)[0].shape[1])
    if run.cfg.student.proj_dim and run.cfg.student.proj_dim != target_dim:
        raise UsageError(f"student.proj_dim {run.cfg.student.proj_dim} differs from the teacher's target size "
                         f"{target_dim} ({first})")
    return target_dim


def build_student(run: Stage2Run, state: dict[str, Any] | None, prepared: Any) -> Student:
    """Student + proj (seeded identically on every rank), DDP under torchrun, and its EMA copy.

    A fresh run initialises the student from ``student.init``; a resumed one builds the same architecture and
    takes every weight from the checkpoint (no hub download)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from mstar_extract.models.registry import get_spec
    from mstar_extract.pretrain.stage2.student import EmaModel, StudentInit, StudentWithProj, build_student_backbone

    cfg, info = run.cfg, run.info
    torch.manual_seed(cfg.train.seed)
    if state is None:
        backbone, spec, sinit = build_student_backbone(cfg.student.init, cfg.student.arch, seed=cfg.train.seed,
                                                       prepared=prepared)
        if sinit.weights_source == "random" and info.is_main:
            run.reporter.info(f"student.init=random: the student ({spec.name}) starts from a random initialisation "
                              f"(seed {cfg.train.seed})")
    else:
        sinit = StudentInit(**state["extra"]["student_init"])
        spec = get_spec(sinit.spec_name)
        backbone = spec.build()
    torch.manual_seed(cfg.train.seed + 1)  # proj init, identical on every rank
    raw = StudentWithProj(backbone, spec.feature_dim, _target_dim(run))
    if cfg.student.grad_checkpointing:
        raw.set_grad_checkpointing(True)
    raw.to(info.device).train()
    ema = EmaModel(raw.student).to(info.device)
    model: torch.nn.Module = raw
    if info.distributed:
        model = DDP(raw, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                    find_unused_parameters=cfg.dist.find_unused_parameters)
    return Student(raw, model, ema, spec, sinit)


def build_batches(run: Stage2Run, student: Student) -> Any:
    """This rank's batch schedule (:class:`~mstar_extract.pretrain.stage2.data.Stage2Batches`)."""
    from mstar_extract.pretrain.stage2.data import Stage2Batches, sources_for

    cfg, info, tc = run.cfg, run.info, run.cfg.train
    dataset = Stage2Batches(sources_for(run.entries, run.targets_dir, cfg.data.patch_size_level0), tc.batch_size,
                            cfg.data.slides_per_batch, tc.seed, info.rank, info.world_size, student.spec.input_size,
                            cfg.data.backend, cfg.data.patches_per_slide, cfg.data.open_slides_per_worker)
    if len(dataset) == 0:
        raise UsageError(f"too few patches for one batch of {tc.batch_size} on each of {info.world_size} process(es); "
                         "lower train.batch_size")
    return dataset


def _loader_factory(run: Stage2Run, dataset: Any) -> Any:
    """``make_loader(epoch, start_batch)``: the epoch's batches from ``start_batch`` on, read by worker processes."""
    from torch.utils.data import DataLoader

    from mstar_extract.pretrain.stage2.data import clean_worker_errors

    tc, dev = run.cfg.train, run.info.device

    def make_loader(epoch: int, start: int) -> Iterable[dict[str, torch.Tensor]]:
        dataset.set_epoch(epoch)
        kw: dict[str, Any] = {"batch_size": None, "sampler": range(start, len(dataset)),
                              "num_workers": tc.num_workers, "pin_memory": dev.type == "cuda"}
        if tc.num_workers > 0:
            kw["prefetch_factor"] = max(1, run.cfg.data.prefetch_batches)
        return clean_worker_errors(DataLoader(dataset, **kw))

    return make_loader


def build_loop(run: Stage2Run, student: Student, dataset: Any) -> Stage2Loop:
    """The training loop: optimiser, schedule, checkpoint contents (EMA, teacher hash, how the student began)."""
    cfg, info = run.cfg, run.info
    per_epoch = len(dataset)
    optimizer, scheduler = build_optimizer_and_schedule(student.raw, cfg, total_steps(cfg.train, per_epoch))
    extra = {"teacher_sha256": run.teacher_sha256, "student_init": asdict(student.init)}
    return Stage2Loop(
        student=student, cfg=cfg, optimizer=optimizer, scheduler=scheduler, info=info, run_dir=run.run_dir,
        reporter=run.reporter, config_dict=config_to_dict(cfg), make_loader=_loader_factory(run, dataset),
        batches_per_epoch=per_epoch, extra_state=lambda: {**extra, "ema": student.ema.module.state_dict()},
        desc=f"stage 2 ({cfg.train.batch_size * info.world_size} patches/step)",
    )


def restore(run: Stage2Run, loop: Stage2Loop, state: dict[str, Any] | None, resume: str | None,
            resume_path: Path | None) -> None:
    """Load the checkpoint into the loop and the EMA, or say that a new run starts."""
    info, reporter = run.info, run.reporter
    if state is not None:
        loop.load(state)
        loop.student.ema.module.load_state_dict(state["extra"]["ema"])
        if info.is_main:
            reporter.info(f"resumed from {resume_path} at step {loop.state.step}")
    elif resume == "auto" and info.is_main:
        reporter.info(f"no checkpoint in {ckpt.checkpoint_dir(run.run_dir)}: starting a new run")


def announce(run: Stage2Run, loop: Stage2Loop, n_patches: list[int]) -> None:
    """One line (rank 0): slides, patches, student, processes, steps."""
    from mstar_extract.pretrain.stage2.student import count_parameters

    if run.info.is_main:
        s = loop.student
        run.reporter.info(f"stage 2: {len(run.entries)} slides, {sum(n_patches)} patches, student {s.spec.name} "
                          f"({count_parameters([s.raw]) / 1e6:.1f}M trainable), {run.info.world_size} process(es) on "
                          f"{run.info.device}, {loop.total_steps} steps of {loop.global_batch} patches")


def finish(run: Stage2Run, loop: Stage2Loop, student: Student, n_patches: list[int], final: LoopState,
           result: Stage2Result) -> None:
    """Record the run in ``result``; at the end of the schedule (not at ``stop_after_steps``) export on rank 0."""
    from mstar_extract.pretrain.stage2.export import Provenance, export_run

    info, reporter = run.info, run.reporter
    result.steps = final.step
    result.history = _read_history(run.run_dir / "metrics.jsonl") if info.is_main else []
    if final.step < loop.total_steps:  # train.stop_after_steps: leave with a checkpoint, export at the end
        if info.is_main:
            reporter.info(f"stopped at step {final.step} of {loop.total_steps}; continue with --resume auto")
    elif info.is_main:
        prov = Provenance(run.teacher_file, run.teacher_sha256, run.manifest_path, len(run.entries), int(sum(n_patches)),
                          final.step, info.world_size)
        files = export_run(run.cfg, student.raw, student.spec, student.init, prov, run.run_dir,
                           result.history[-1] if result.history else None)
        result.student_path, result.proj_path, result.card_path = files.student, files.proj, files.card
        result.zeroshot_path = files.zeroshot
        reporter.info(f"stage 2 done at step {final.step}: student {files.student}; {files.zeroshot_note}")
        reporter.event("done", step=final.step, student=str(files.student), proj=str(files.proj), card=str(files.card),
                       zeroshot=str(files.zeroshot) if files.zeroshot else None)
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
