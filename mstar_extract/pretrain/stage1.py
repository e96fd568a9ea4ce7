"""Stage 1: slide-level contrastive pretraining of the TransMIL aggregator across WSI × report × RNA-Seq.

Entry point :func:`main` (called by ``mstar pretrain --stage 1``, also under ``torchrun``). The pieces live in
their own modules: data, transmil, text, genes, losses, dist, checkpoint, loop, export.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from mstar_extract.console import Reporter
from mstar_extract.errors import UsageError
from mstar_extract.pretrain import checkpoint as ckpt
from mstar_extract.pretrain import dist as D
from mstar_extract.pretrain.config import config_to_dict, save_config
from mstar_extract.pretrain.data import (
    Collate,
    GeneTable,
    Stage1Dataset,
    attach_genes,
    load_gene_table,
    read_manifest,
    split_records,
)
from mstar_extract.pretrain.export import export_mstar, export_teacher
from mstar_extract.pretrain.genes import GeneEncoder, load_gene_embeddings
from mstar_extract.pretrain.loop import TrainLoop, build_optimizer, param_groups, total_steps, warmup_cosine
from mstar_extract.pretrain.losses import Temperatures, stage1_losses
from mstar_extract.pretrain.sampler import GlobalBatchSampler
from mstar_extract.pretrain.stage1_config import Stage1Config
from mstar_extract.pretrain.text import TextEncoder, load_tokenizer
from mstar_extract.pretrain.transmil import build_transmil

CONFIG_CLASS = Stage1Config
MODALITIES = ("slide", "report", "gene")
# config sections whose change makes a checkpoint unusable
_MODEL_KEYS = ("aggregator", "text", "genes")


class Stage1Model(nn.Module):
    """Aggregator + text encoder + gene encoder + temperatures; ``forward(batch)`` → embeddings per modality."""

    def __init__(self, cfg: Stage1Config, n_genes: int, gene_init: torch.Tensor | None = None) -> None:
        super().__init__()
        dim = cfg.aggregator.dim
        self.aggregator = build_transmil(cfg.aggregator)
        t = cfg.text
        self.text = TextEncoder(t.model, dim, t.trainable_layers, t.gradient_checkpointing, t.local_files_only, t.pooling)
        g = cfg.genes
        self.genes = (
            GeneEncoder(n_genes, cfg.data.n_bins, g.dim, g.depth, g.heads, g.ff_mult, g.dropout, dim, gene_init) if n_genes else None
        )
        lc = cfg.loss
        self.temps = Temperatures(lc.temperature, lc.learn_temperature, lc.min_temperature)
        self.dim = dim

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {
            "slide": self.aggregator(batch["features"]),
            "report": self.text(batch["input_ids"], batch["attention_mask"]),
        }
        if self.genes is not None:
            out["gene"] = self.genes(batch["genes"])
        else:
            out["gene"] = out["slide"].new_zeros(out["slide"].shape)
        return {k: v.float() for k, v in out.items()}


def loss_weights(cfg: Stage1Config) -> dict[str, float]:
    lc = cfg.loss
    return {"slide_report": lc.w_slide_report, "slide_gene": lc.w_slide_gene, "report_gene": lc.w_report_gene, "triplet": lc.w_triplet}


def masks_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"slide": batch["has_slide"], "report": batch["has_report"], "gene": batch["has_gene"]}


def recall_at_k(query: torch.Tensor, gallery: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Cross-modal retrieval: row i of ``query`` should find row i of ``gallery`` (cosine similarity)."""
    with torch.autocast(device_type=query.device.type, enabled=False):  # bf16 similarities would tie (and count as hits)
        sims = F.normalize(query.float(), dim=-1) @ F.normalize(gallery.float(), dim=-1).t()
    rank = (sims > sims.diagonal()[:, None]).sum(1)
    return {k: float((rank < k).float().mean()) for k in ks}


def _move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# settings that may change between a checkpoint and its continuation
_FREE = {"text": ("lr_scale", "gradient_checkpointing", "local_files_only"), "aggregator": ("dropout", "attn_dropout"), "genes": ("dropout",)}


def _check_resume_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    for key in _MODEL_KEYS:
        strip = lambda d: {k: v for k, v in (d or {}).items() if k not in _FREE.get(key, ())}  # noqa: E731
        if strip(saved.get(key)) != strip(current.get(key)):
            raise UsageError(f"{path}: checkpoint was trained with a different '{key}' config section; use a new --out or the same config")
    for key in ("n_bins", "binning", "gene_list", "max_patches"):
        if saved.get("data", {}).get(key) != current["data"].get(key):
            raise UsageError(f"{path}: checkpoint was trained with data.{key}={saved.get('data', {}).get(key)!r}")


def prepare_data(cfg: Stage1Config, reporter: Reporter, is_main: bool = True) -> tuple[list, list, GeneTable | None]:
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


def _run(cfg: Stage1Config, resume: str | None, reporter: Reporter, info: D.DistInfo) -> int:
    run_dir = Path(cfg.run.out_dir)
    tc = cfg.train
    if tc.cpu_threads and info.device.type == "cpu":
        torch.set_num_threads(tc.cpu_threads)
    train_recs, val_recs, table = prepare_data(cfg, reporter, info.is_main)
    cfg_dict = config_to_dict(cfg)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    resume_path = ckpt.resolve_resume(resume, run_dir)

    torch.manual_seed(tc.seed)
    gene_init = None
    if table is not None and cfg.data.gene_embeddings:
        gene_init, found = load_gene_embeddings(cfg.data.gene_embeddings, table.genes, cfg.genes.dim)
        if info.is_main:
            reporter.info(f"gene embeddings: {found} of {len(table.genes)} genes initialised from {cfg.data.gene_embeddings}")
    tokenizer = load_tokenizer(cfg.text.model, cfg.text.local_files_only)
    model = Stage1Model(cfg, len(table.genes) if table else 0, gene_init).to(info.device)
    raw = model
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=cfg.dist.find_unused_parameters)

    collate = Collate(tokenizer, cfg.text.max_tokens)
    d = cfg.data
    train_ds = Stage1Dataset(train_recs, table, d.max_patches, cfg.aggregator.in_dim, tc.seed, train=True)
    val_ds = Stage1Dataset(val_recs, table, d.max_patches, cfg.aggregator.in_dim, tc.seed, train=False)
    sampler = GlobalBatchSampler(len(train_ds), tc.batch_size, info.rank, info.world_size, tc.seed, shuffle=True, drop_last=True)
    if sampler.batches_per_epoch() == 0:
        raise UsageError(f"training split has {len(train_ds)} slides, fewer than one global batch ({sampler.global_batch}); lower train.batch_size")

    def make_loader(epoch: int, start: int) -> Iterable[dict[str, torch.Tensor]]:
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch, start)
        g = torch.Generator()
        g.manual_seed(tc.seed * 1000003 + epoch)
        return DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate, num_workers=tc.num_workers,
                          pin_memory=info.device.type == "cuda", generator=g)

    weights = loss_weights(cfg)

    def step_fn(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        batch = _move(batch, info.device)
        emb = model(batch)
        g_emb = {k: D.all_gather_with_grad(v) for k, v in emb.items()}
        g_mask = {k: D.all_gather_nograd(v) for k, v in masks_of(batch).items()}
        labels = D.all_gather_nograd(batch["label"])
        out: dict[str, Any] = stage1_losses(g_emb, g_mask, labels, raw.temps, weights, cfg.loss.margin)
        out.update({f"temp_{k}": v for k, v in raw.temps.values().items()})
        return out

    def val_fn(epoch: int) -> dict[str, float]:
        return validate(raw, val_ds, collate, cfg, info)

    groups = param_groups(
        [(n, p) for n, p in raw.named_parameters() if not n.startswith("text.encoder.")], cfg.optim.lr, cfg.optim.weight_decay
    )
    groups += param_groups(
        [(n, p) for n, p in raw.named_parameters() if n.startswith("text.encoder.")], cfg.optim.lr, cfg.optim.weight_decay, cfg.text.lr_scale
    )
    optimizer = build_optimizer(groups, cfg.optim)
    n_total = total_steps(tc, sampler.batches_per_epoch())
    scheduler = warmup_cosine(optimizer, cfg.optim.warmup_steps, n_total, cfg.optim.min_lr_ratio)
    loop = TrainLoop(
        model=model, raw_model=raw, optimizer=optimizer, scheduler=scheduler, train_cfg=tc, grad_clip=cfg.optim.grad_clip,
        info=info, run_dir=run_dir, reporter=reporter, config_dict=cfg_dict, step_fn=step_fn, make_loader=make_loader,
        batches_per_epoch=sampler.batches_per_epoch(), val_fn=val_fn if len(val_ds) else None, desc="stage 1",
    )
    if resume_path is not None:
        state = ckpt.load_checkpoint(resume_path, map_location=info.device)
        _check_resume_compatible(state.get("config", {}), cfg_dict, resume_path)
        loop.load(state)
        if info.is_main:
            reporter.info(f"resumed from {resume_path} at step {loop.state.step}")
    elif resume == "auto" and info.is_main:
        reporter.info(f"no checkpoint in {ckpt.checkpoint_dir(run_dir)}: starting a new run")
    if info.is_main:
        n_params = sum(p.numel() for p in raw.parameters() if p.requires_grad)
        reporter.info(
            f"stage 1: {len(train_ds)} train / {len(val_ds)} val slides, {info.world_size} process(es) on {info.device}, "
            f"{n_params / 1e6:.2f}M trainable parameters, {n_total} steps"
        )
    state = loop.run()
    if info.is_main:
        meta = {"step": state.step, "epoch": state.epoch, "config": cfg_dict}
        teacher = export_teacher(raw.aggregator, dataclasses.asdict(cfg.aggregator), run_dir / cfg.export.teacher, meta)
        mst = export_mstar(raw.aggregator, run_dir / cfg.export.mstar)
        reporter.info(f"stage 1 done at step {state.step}: teacher {teacher}, mSTAR layout {mst}")
        reporter.event("done", step=state.step, teacher=str(teacher), mstar=str(mst))
    D.barrier()
    return 0


@torch.no_grad()
def embed_dataset(model: Stage1Model, ds: Stage1Dataset, collate: Collate, batch_size: int, info: D.DistInfo) -> dict[str, torch.Tensor]:
    """Embeddings, masks and labels of this rank's shard (rows rank::world) gathered over all ranks."""
    mine = list(range(info.rank, len(ds), info.world_size))
    dim = model.dim
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in (*MODALITIES, "m_slide", "m_report", "m_gene", "label")}
    for s in range(0, len(mine), batch_size):
        batch = _move(collate([ds[i] for i in mine[s : s + batch_size]]), info.device)
        emb = model(batch)
        for k in MODALITIES:
            parts[k].append(emb[k].float())
        for k, v in masks_of(batch).items():
            parts["m_" + k].append(v)
        parts["label"].append(batch["label"])
    empty = {k: torch.zeros(0, dim, device=info.device) for k in MODALITIES}
    empty.update({f"m_{k}": torch.zeros(0, dtype=torch.bool, device=info.device) for k in MODALITIES})
    empty["label"] = torch.zeros(0, dtype=torch.long, device=info.device)
    return {k: D.all_gather_nograd(torch.cat(v) if v else empty[k]) for k, v in parts.items()}


@torch.no_grad()
def validate(model: Stage1Model, ds: Stage1Dataset, collate: Collate, cfg: Stage1Config, info: D.DistInfo) -> dict[str, float]:
    """Validation losses (in global-batch-sized chunks) and Recall@1/5 slide→report, slide→gene."""
    was = model.training
    model.eval()
    e = embed_dataset(model, ds, collate, cfg.train.batch_size, info)
    model.train(was)
    res: dict[str, float] = {}
    n = e["slide"].shape[0]
    chunk = cfg.train.batch_size * info.world_size
    sums: dict[str, float] = {}
    for s in range(0, n, chunk):
        sl = slice(s, min(s + chunk, n))
        out = stage1_losses({k: e[k][sl] for k in MODALITIES}, {k: e["m_" + k][sl] for k in MODALITIES}, e["label"][sl],
                            model.temps, loss_weights(cfg), cfg.loss.margin)
        w = (sl.stop - sl.start) / n
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + w * float(v)
    res.update({f"val_{k}": v for k, v in sums.items()})
    for other in ("report", "gene"):
        keep = e["m_slide"] & e["m_" + other]
        if int(keep.sum()) >= 2:
            r = recall_at_k(e["slide"][keep], e[other][keep])
            res[f"val_R@1_slide_{other}"], res[f"val_R@5_slide_{other}"] = r[1], r[5]
            res[f"val_n_slide_{other}"] = float(keep.sum())
    return res
