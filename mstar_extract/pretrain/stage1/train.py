"""Stage 1, the run: data → model → optimiser → the shared training loop → exports.

Entry point :func:`main` (``mstar pretrain --stage 1``, also under ``torchrun``). Each step of a run is one
function below: :func:`prepare_data`, :func:`build_model`, :func:`build_data`, :func:`make_step_fn`,
:func:`build_optimizer_and_schedule`, :func:`resume_loop`, :func:`export_run`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from mstar_extract.console import Reporter
from mstar_extract.errors import UsageError
from mstar_extract.pretrain import checkpoint as ckpt, dist as D
from mstar_extract.pretrain.config import config_to_dict, save_config
from mstar_extract.pretrain.loop import TrainLoop, build_optimizer, param_groups, total_steps, warmup_cosine
from mstar_extract.pretrain.sampler import GlobalBatchSampler
from mstar_extract.pretrain.stage1.config import Stage1Config
from mstar_extract.pretrain.stage1.data import (
    Collate,
    GeneTable,
    SlideRecord,
    Stage1Dataset,
    attach_genes,
    load_gene_table,
    read_manifest,
    split_records,
)
from mstar_extract.pretrain.stage1.export import export_mstar, export_teacher, export_text, feature_model_of
from mstar_extract.pretrain.stage1.genes import load_gene_embeddings
from mstar_extract.pretrain.stage1.losses import stage1_losses
from mstar_extract.pretrain.stage1.model import Stage1Model, loss_weights, masks_of, move
from mstar_extract.pretrain.stage1.text import load_tokenizer
from mstar_extract.pretrain.stage1.validate import validate

# config sections whose change makes a checkpoint unusable
_MODEL_KEYS = ("aggregator", "text", "genes")
# settings that may change between a checkpoint and its continuation
_FREE = {
    "text": ("lr_scale", "gradient_checkpointing", "local_files_only"),
    "aggregator": ("dropout", "attn_dropout"),
    "genes": ("dropout",),
}


def _without_free(section: str, values: dict[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (values or {}).items() if k not in _FREE.get(section, ())}


def _check_resume_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    for key in _MODEL_KEYS:
        if _without_free(key, saved.get(key)) != _without_free(key, current.get(key)):
            raise UsageError(f"{path}: checkpoint was trained with a different '{key}' config section; "
                             "use a new --out or the same config")
    for key in ("n_bins", "binning", "gene_list", "max_patches"):
        if saved.get("data", {}).get(key) != current["data"].get(key):
            raise UsageError(f"{path}: checkpoint was trained with data.{key}={saved.get('data', {}).get(key)!r}")


def prepare_data(cfg: Stage1Config, reporter: Reporter,
                 is_main: bool = True) -> tuple[list[SlideRecord], list[SlideRecord], GeneTable | None]:
    """Read and check manifest + gene table; (train records, val records, gene table)."""
    d = cfg.data
    if not d.manifest:
        raise UsageError("data.manifest is required (set it in the YAML or with --set data.manifest=FILE)")
    records = read_manifest(d.manifest, cfg.aggregator.in_dim)
    table = load_gene_table(d.gene_table, d.gene_list, d.n_bins, d.binning) if d.gene_table else None
    missing = attach_genes(records, table)
    if table is not None and missing and is_main:
        reporter.warn(f"{missing} of {len(records)} slides have no row in the gene table (gene modality masked)")
    train, val = split_records(records, d.train_split, d.val_split, d.val_fraction)
    if not train:
        raise UsageError(f"{d.manifest}: no training rows (split == '{d.train_split}')")
    return train, val, table


def main(cfg: Stage1Config, resume: str | None = None, reporter: Reporter | None = None) -> int:
    """Train stage 1 as configured; write checkpoints, metrics and the exports into ``cfg.run.out_dir``."""
    reporter = reporter or Reporter()
    info = D.init_distributed(cfg.dist.device, cfg.dist.backend, cfg.dist.timeout_s)
    try:
        return _run(cfg, resume, reporter, info)
    finally:
        D.cleanup()


def build_model(cfg: Stage1Config, table: GeneTable | None, info: D.DistInfo,
                reporter: Reporter) -> tuple[nn.Module, Stage1Model]:
    """(the model to call — DDP-wrapped under torchrun —, the unwrapped model), seeded by ``train.seed``."""
    torch.manual_seed(cfg.train.seed)
    gene_init = None
    if table is not None and cfg.data.gene_embeddings:
        gene_init, found = load_gene_embeddings(cfg.data.gene_embeddings, table.genes, cfg.genes.dim)
        if info.is_main:
            reporter.info(f"gene embeddings: {found} of {len(table.genes)} genes initialised from {cfg.data.gene_embeddings}")
    raw = Stage1Model(cfg, len(table.genes) if table else 0, gene_init).to(info.device)
    if not info.distributed:
        return raw, raw
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(raw, device_ids=ids, find_unused_parameters=cfg.dist.find_unused_parameters), raw


@dataclass
class Stage1Data:
    """The datasets, the report collation and the deterministic batch order of a run."""

    train: Stage1Dataset
    val: Stage1Dataset
    collate: Collate
    sampler: GlobalBatchSampler
    make_loader: Callable[[int, int], Iterable[dict[str, torch.Tensor]]]


def build_data(cfg: Stage1Config, train_recs: list[SlideRecord], val_recs: list[SlideRecord], table: GeneTable | None,
               info: D.DistInfo) -> Stage1Data:
    """Datasets + sampler + ``make_loader(epoch, start_batch)`` (this rank's batches, resumable mid-epoch)."""
    tc, d = cfg.train, cfg.data
    collate = Collate(load_tokenizer(cfg.text.model, cfg.text.local_files_only), cfg.text.max_tokens)
    train_ds = Stage1Dataset(train_recs, table, d.max_patches, cfg.aggregator.in_dim, tc.seed, train=True)
    val_ds = Stage1Dataset(val_recs, table, d.max_patches, cfg.aggregator.in_dim, tc.seed, train=False)
    sampler = GlobalBatchSampler(len(train_ds), tc.batch_size, info.rank, info.world_size, tc.seed, shuffle=True, drop_last=True)
    if sampler.batches_per_epoch() == 0:
        raise UsageError(f"training split has {len(train_ds)} slides, "
                         f"fewer than one global batch ({sampler.global_batch}); lower train.batch_size")

    def make_loader(epoch: int, start: int) -> Iterable[dict[str, torch.Tensor]]:
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch, start)
        g = torch.Generator()
        g.manual_seed(tc.seed * 1000003 + epoch)
        return DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate, num_workers=tc.num_workers,
                          pin_memory=info.device.type == "cuda", generator=g)

    return Stage1Data(train_ds, val_ds, collate, sampler, make_loader)


def make_step_fn(model: nn.Module, raw: Stage1Model, cfg: Stage1Config,
                 info: D.DistInfo) -> Callable[[dict[str, torch.Tensor]], dict[str, Any]]:
    """One training step's forward: embeddings of this rank, gathered over ranks, → every loss term (tensors).

    Every rank's training batch has exactly ``train.batch_size`` rows (the sampler drops the incomplete global
    batch), so the gathers need not exchange sizes."""
    weights = loss_weights(cfg)

    def step_fn(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        batch = move(batch, info.device)
        emb = model(batch)
        g_emb = {k: D.all_gather_with_grad(v, same_size=True) for k, v in emb.items()}
        g_mask = {k: D.all_gather_nograd(v, same_size=True) for k, v in masks_of(batch).items()}
        labels = D.all_gather_nograd(batch["label"], same_size=True)
        out: dict[str, Any] = stage1_losses(g_emb, g_mask, labels, raw.temps, weights, cfg.loss.margin)
        out.update({f"temp_{k}": v for k, v in raw.temps.values().items()})
        return out

    return step_fn


def build_optimizer_and_schedule(raw: Stage1Model, cfg: Stage1Config, n_total: int) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (the text encoder's own weights at ``text.lr_scale``) and the warm-up + cosine schedule."""
    o = cfg.optim
    groups = param_groups([(n, p) for n, p in raw.named_parameters() if not n.startswith("text.encoder.")], o.lr, o.weight_decay)
    groups += param_groups([(n, p) for n, p in raw.named_parameters() if n.startswith("text.encoder.")], o.lr, o.weight_decay,
                           cfg.text.lr_scale)
    optimizer = build_optimizer(groups, o)
    return optimizer, warmup_cosine(optimizer, o.warmup_steps, n_total, o.min_lr_ratio)


def resume_loop(loop: TrainLoop, resume: str | None, run_dir: Path, cfg_dict: dict[str, Any], info: D.DistInfo,
                reporter: Reporter) -> None:
    """Restore ``loop`` from ``--resume`` (checked against this config), or say that a new run starts."""
    resume_path = ckpt.resolve_resume(resume, run_dir)
    if resume_path is not None:
        state = ckpt.load_checkpoint(resume_path, map_location=info.device)
        _check_resume_compatible(state.get("config", {}), cfg_dict, resume_path)
        loop.load(state)
        if info.is_main:
            reporter.info(f"resumed from {resume_path} at step {loop.state.step}")
    elif resume == "auto" and info.is_main:
        reporter.info(f"no checkpoint in {ckpt.checkpoint_dir(run_dir)}: starting a new run")


def export_run(raw: Stage1Model, cfg: Stage1Config, cfg_dict: dict[str, Any], step: int, epoch: int, run_dir: Path,
               reporter: Reporter, data: Stage1Data) -> None:
    """Rank 0: the stage-2 teacher file, the aggregator in mSTAR's downstream layout, and the report encoder in
    mSTAR's zero-shot layout; the first two record the patch-feature model of the training bags."""
    meta = {"step": step, "epoch": epoch, "config": cfg_dict}
    bags = [r.features for r in data.train.records + data.val.records if r.features is not None]
    feature_model, warning = feature_model_of(bags)
    if warning:
        reporter.warn(warning)
    agg_cfg = dataclasses.asdict(cfg.aggregator)
    teacher = export_teacher(raw.aggregator, agg_cfg, run_dir / cfg.export.teacher, meta, feature_model)
    mst = export_mstar(raw.aggregator, run_dir / cfg.export.mstar, agg_cfg, feature_model)
    text = export_text(raw.text, data.collate.tokenizer, cfg.text, run_dir / cfg.export.text, {"step": step})
    reporter.info(f"stage 1 done at step {step}: teacher {teacher}, mSTAR layout {mst}, report encoder {text}")
    reporter.event("done", step=step, teacher=str(teacher), mstar=str(mst), text=str(text))


def _run(cfg: Stage1Config, resume: str | None, reporter: Reporter, info: D.DistInfo) -> int:
    run_dir, tc = Path(cfg.run.out_dir), cfg.train
    if tc.cpu_threads and info.device.type == "cpu":
        torch.set_num_threads(tc.cpu_threads)
    train_recs, val_recs, table = prepare_data(cfg, reporter, info.is_main)
    cfg_dict = config_to_dict(cfg)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    ckpt.resolve_resume(resume, run_dir)  # a missing --resume file is a usage error before the model is built
    model, raw = build_model(cfg, table, info, reporter)
    data = build_data(cfg, train_recs, val_recs, table, info)
    n_total = total_steps(tc, data.sampler.batches_per_epoch())
    optimizer, scheduler = build_optimizer_and_schedule(raw, cfg, n_total)
    loop = TrainLoop(
        model=model, raw_model=raw, optimizer=optimizer, scheduler=scheduler, train_cfg=tc, grad_clip=cfg.optim.grad_clip,
        info=info, run_dir=run_dir, reporter=reporter, config_dict=cfg_dict, step_fn=make_step_fn(model, raw, cfg, info),
        make_loader=data.make_loader, batches_per_epoch=data.sampler.batches_per_epoch(),
        val_fn=(lambda epoch: validate(raw, data.val, data.collate, cfg, info)) if len(data.val) else None, desc="stage 1",
    )
    resume_loop(loop, resume, run_dir, cfg_dict, info, reporter)
    if info.is_main:
        n_params = sum(p.numel() for p in raw.parameters() if p.requires_grad)
        reporter.info(
            f"stage 1: {len(data.train)} train / {len(data.val)} val slides, {info.world_size} process(es) on {info.device}, "
            f"{n_params / 1e6:.2f}M trainable parameters, {n_total} steps"
        )
    state = loop.run()
    if info.is_main:
        export_run(raw, cfg, cfg_dict, state.step, state.epoch, run_dir, reporter, data)
    D.barrier()
    return 0
