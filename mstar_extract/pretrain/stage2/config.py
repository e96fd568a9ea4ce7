"""The stage-2 configuration tree (self-taught training of the patch extractor; docs/pretrain.md, "Stage 2").

Built on the shared machinery of :mod:`mstar_extract.pretrain.config` (documented fields, YAML, ``--set``).
``source="paper"`` marks values known from mSTAR's paper; everything else is this project's documented choice.
"""

from __future__ import annotations

import dataclasses

from mstar_extract.pretrain.config import DistConfig, OptimConfig, RunConfig, TrainConfig, opt, section


@dataclasses.dataclass
class Stage2DataConfig:
    """Manifest, slide reading and the per-step patch mix."""

    manifest: str | None = opt(None, "Manifest CSV: slide_id, slide (WSI path), features (feature bag .h5 with coords). "
                                     "Required. Relative paths are resolved against the manifest's folder.")
    backend: str = opt("auto", "Slide reader backend (as `mstar extract --backend`).",
                       choices=("auto", "openslide", "tiffslide", "image"))
    patch_size_level0: int | None = opt(None, "Patch footprint in level-0 pixels; "
                                              "null = the bag's `patch_size_level0` attribute (20x 256 px → 512 at 40x).")
    patches_per_slide: int | None = opt(None, "Patches of each slide used per epoch (a fresh "
                                              "random subset every epoch); null = all of them.")
    slides_per_batch: int = opt(4, "Each batch mixes patches from this many slides (batch_size / slides_per_batch patches each). "
                                   "More = more diverse batches, more slide opens.")
    prefetch_batches: int = opt(2, "Batches each worker prepares ahead.")
    open_slides_per_worker: int = opt(16, "Slides each worker keeps open (LRU).")


@dataclasses.dataclass
class TeacherConfig:
    """The frozen stage-1 aggregator and the per-patch targets it produces."""

    file: str | None = opt(None, "Stage-1 teacher export (`teacher.pt` of `mstar pretrain --stage 1`). Required.")
    targets_dir: str | None = opt(None, "Where per-slide targets are stored (`<slide_id>.h5`); "
                                        "null = `<run>/targets`. Reused across runs with the same teacher.")
    dtype: str = opt("float16", "Stored target precision (float16 halves the disk use; computed in float32).",
                     choices=("float16", "float32"))
    device: str = opt("auto", "Device for computing targets (auto = the training device).")


@dataclasses.dataclass
class StudentConfig:
    """The student patch extractor and its projection head."""

    init: str = opt("uni", "Initial weights: mstar (released mSTAR, hub), uni (UNI, hub; "
                           "the frozen extractor of stage 1), a state-dict PATH, or random.")
    arch: str = opt("mstar", "Registry architecture for a PATH or random init (mstar | uni | timm:<name>); "
                             "mstar/uni = ViT-L/16 (init_values 1e-5, 1024-d).", source="paper")
    proj_dim: int | None = opt(None, "Output size of `proj`; null = the teacher's embedding size (512).", source="paper")
    grad_checkpointing: bool = opt(False, "timm activation checkpointing of the ViT blocks (less memory, ~30% slower).")


@dataclasses.dataclass
class Stage2LossConfig:
    """L = D(proj(student(x)), target) + lambda · D'(student(x), ema(x))."""

    distance: str = opt("cosine", "D: distance between proj(student(x)) and the teacher target (cosine = 1 − cos).",
                        choices=("cosine", "mse", "normalized_mse", "smooth_l1"))
    ema_distance: str = opt("cosine", "D': distance between student(x) and ema(x).",
                            choices=("cosine", "mse", "normalized_mse", "smooth_l1"))
    ema_weight: float = opt(0.6, "lambda, weight of the EMA (anti-forgetting) term.", source="paper")
    ema_momentum: float = opt(0.999, "EMA momentum (ema = m·ema + (1−m)·student after every step).")
    ema_schedule: str = opt("constant", "constant = fixed momentum; cosine = from ema_momentum to 1.0 over the run.",
                            choices=("constant", "cosine"))


@dataclasses.dataclass
class AugmentConfig:
    """Augmentation on top of the extraction preprocessing (applied on the training device)."""

    hflip: float = opt(0.5, "Probability of a horizontal flip.")
    vflip: float = opt(0.5, "Probability of a vertical flip.")
    rot90: bool = opt(True, "Random rotation by 0/90/180/270 degrees.")
    color_jitter: float = opt(0.8, "Probability of colour jitter per patch (0 = off).")
    brightness: float = opt(0.1, "Brightness factor range ±brightness.")
    contrast: float = opt(0.1, "Contrast factor range ±contrast.")
    saturation: float = opt(0.1, "Saturation factor range ±saturation.")
    hue: float = opt(0.02, "Hue shift range ±hue (fraction of the colour wheel).")


@dataclasses.dataclass
class Stage2OptimConfig(OptimConfig):
    """AdamW with warm-up + cosine, optional layer-wise lr decay."""

    lr: float = opt(2e-5, "Peak learning rate (after warm-up).")
    warmup_steps: int = opt(500, "Linear warm-up steps from 0 to `lr`.")
    layer_decay: float = opt(1.0, "Layer-wise lr decay of the ViT blocks (block i gets lr·decay^(depth−i)); 1.0 = off.")
    proj_lr_scale: float = opt(1.0, "Learning-rate multiplier of `proj`.")


@dataclasses.dataclass
class Stage2TrainConfig(TrainConfig):
    """Loop length, batch, precision, logging and checkpoint cadence."""

    epochs: int = opt(1, "Passes over every patch of every slide (see data.patches_per_slide).")
    batch_size: int = opt(64, "Patches per process per step (global batch = batch_size × world size).")
    num_workers: int = opt(4, "Patch-reader worker processes per rank (0 = read in the training process).")
    ckpt_every: int = opt(1000, "Write a checkpoint every N steps (and always at the end).")
    val_every: int = opt(0, "Unused in stage 2.")


@dataclasses.dataclass
class Stage2RunConfig(RunConfig):
    out_dir: str = opt("runs/stage2", "Run folder: config.yaml, targets/, metrics.jsonl, "
                                      "checkpoints/, exports (--out overrides).")


@dataclasses.dataclass
class Stage2ExportConfig:
    """Files written at the end of training (relative to the run folder)."""

    student: str = opt("student.pth", "Student patch extractor: plain timm state dict "
                                      "(released mSTAR format; `mstar extract --weights`).")
    proj: str = opt("proj.pth", "The projection head in mSTAR's layout ({'model_state_dict': {'proj.weight', 'proj.bias'}}).")
    card: str = opt("model_card.json", "Model card: config, manifest hash, steps, teacher hash, init.")
    verify: bool = opt(True, "Re-load student.pth strict=True into a freshly built network after writing it.")
    zeroshot: str | None = opt("zeroshot.pth", "Zero-shot checkpoint in mSTAR's layout (stage-1 report encoder + proj; "
                                               "`mstar zeroshot --checkpoint`); null = none.")
    text: str | None = opt(None, "Stage-1 report encoder export for the zero-shot checkpoint; "
                                 "null = the `text_mstar.pth` written beside teacher.file.")


@dataclasses.dataclass
class Stage2Config:
    """Root of the stage-2 YAML."""

    data: Stage2DataConfig = section(Stage2DataConfig, "Data")
    teacher: TeacherConfig = section(TeacherConfig, "Teacher and targets")
    student: StudentConfig = section(StudentConfig, "Student")
    loss: Stage2LossConfig = section(Stage2LossConfig, "Loss")
    augment: AugmentConfig = section(AugmentConfig, "Augmentation")
    optim: Stage2OptimConfig = section(Stage2OptimConfig, "Optimiser")
    train: Stage2TrainConfig = section(Stage2TrainConfig, "Loop")
    dist: DistConfig = section(DistConfig, "Distributed")
    run: Stage2RunConfig = section(Stage2RunConfig, "Run folder")
    export: Stage2ExportConfig = section(Stage2ExportConfig, "Exports")
