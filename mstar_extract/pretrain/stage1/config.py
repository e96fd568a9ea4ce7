"""The stage-1 configuration tree (defaults = what is known of the paper, else documented choices of ours)."""

from __future__ import annotations

import dataclasses

from mstar_extract.pretrain.config import DistConfig, OptimConfig, RunConfig, TrainConfig, opt, section


@dataclasses.dataclass
class DataConfig:
    """Manifest, gene table and sampling."""

    manifest: str | None = opt(None, "Manifest CSV: slide_id, features, report|report_path, "
                                     "sample_id, cancer_type[, split]. Required.")
    gene_table: str | None = opt(None, "Gene expression table (CSV/TSV): first column = sample id, "
                                       "one column per gene (raw counts/TPM). null = no gene modality.")
    gene_list: str | None = opt(None, "Text file, one gene per line: "
                                      "the genes used as tokens (null = every column of the table).")
    gene_embeddings: str | None = opt(None, "Optional Gene2Vec-style text file "
                                            "(`GENE v1 ... vD` per line) initialising gene-id embeddings.")
    n_bins: int = opt(51, "Expression bins: bin 0 = zero expression, bins 1..n_bins-1 = log1p values.")
    binning: str = opt("quantile", "quantile = per-sample quantiles of non-zero log1p values (scGPT-style); "
                                   "uniform = equal-width bins up to the table's max log1p.", choices=("quantile", "uniform"))
    max_patches: int = opt(4096, "Patches sampled per slide per step; bags with fewer are padded by re-sampling.", source="paper")
    val_fraction: float = opt(0.1, "Without a `split` column: fraction of slides (by a hash of slide_id) used for validation.")
    train_split: str = opt("train", "Value of the `split` column for training rows.")
    val_split: str = opt("val", "Value of the `split` column for validation rows (other values are ignored).")


@dataclasses.dataclass
class AggregatorConfig:
    """TransMIL slide aggregator (docs/pretrain.md, "Model")."""

    in_dim: int = opt(1024, "Patch feature dimension (UNI / mSTAR ViT-L = 1024). Must match the bags.", source="paper")
    dim: int = opt(512, "Model width and slide-embedding size.", source="paper")
    heads: int = opt(8, "Nyström attention heads.", source="paper")
    landmarks: int = opt(256, "Nyström landmarks (TransMIL: dim/2).", source="paper")
    pinv_iterations: int = opt(6, "Iterations of the Moore-Penrose pseudo-inverse approximation (Nyströmformer).", source="paper")
    residual_conv_kernel: int = opt(33, "Depth-wise value-residual convolution kernel of Nyström attention (0 = off).",
                                    source="paper")
    dropout: float = opt(0.25, "Dropout after the input Linear+ReLU.", source="paper")
    attn_dropout: float = opt(0.1, "Dropout on the attention output projection (TransMIL).", source="paper")


@dataclasses.dataclass
class TextConfig:
    """Report encoder."""

    model: str = opt("dmis-lab/biobert-base-cased-v1.2", "Hugging Face model id or local folder of a BERT-style encoder.",
                      source="paper")
    max_tokens: int = opt(512, "Reports are cut/padded to this many tokens.", source="paper")
    trainable_layers: int = opt(4, "Trainable final transformer layers of the text encoder (0 = frozen, "
                                   "only the projection trains; -1 = everything incl. embeddings).")
    pooling: str = opt("cls", "Report embedding: the CLS hidden state (paper) or the masked mean of all tokens.",
                       choices=("cls", "mean"), source="paper")
    lr_scale: float = opt(0.1, "Learning-rate multiplier for the text encoder's own weights (not the projection).")
    gradient_checkpointing: bool = opt(False, "Hugging Face gradient checkpointing of the text encoder.")
    local_files_only: bool = opt(False, "Never contact the Hugging Face hub (use a local folder or the cache).")


@dataclasses.dataclass
class GeneConfig:
    """RNA-Seq encoder: a transformer over gene tokens."""

    dim: int = opt(200, "Token width (gene-id + expression-bin embedding).", source="paper")
    depth: int = opt(2, "Transformer blocks (2 blocks at width 200 ≈ 1M parameters, plus the gene table).")
    heads: int = opt(4, "Attention heads (SDPA).")
    ff_mult: int = opt(4, "Feed-forward hidden size = ff_mult × dim.")
    dropout: float = opt(0.1, "Dropout in attention and feed-forward.")


@dataclasses.dataclass
class LossConfig:
    """Contrastive alignment of the three pairs + batch-hard triplet loss."""

    w_slide_report: float = opt(1.0, "Weight of the slide–report InfoNCE.")
    w_slide_gene: float = opt(1.0, "Weight of the slide–gene InfoNCE.")
    w_report_gene: float = opt(1.0, "Weight of the report–gene InfoNCE.")
    w_triplet: float = opt(1.0, "Weight of the batch-hard triplet loss (label = cancer type).")
    temperature: float = opt(0.07, "Initial InfoNCE temperature (one learnable temperature per pair, CLIP-style).")
    learn_temperature: bool = opt(True, "Learn the temperatures.")
    min_temperature: float = opt(0.01, "Temperatures are clamped to >= this (logit scale <= 1/min_temperature).")
    margin: float = opt(0.3, "Triplet margin (L2 distance on concatenated L2-normalised embeddings).", source="paper")


@dataclasses.dataclass
class ExportConfig:
    """Files written at the end of training."""

    teacher: str = opt("teacher.pt", "Stage-2 teacher file (aggregator config + weights), relative to the run folder.")
    mstar: str = opt("aggregator_mstar.pth", "Aggregator in mSTAR's downstream layout ({'model_state_dict': "
                                             "{'vision_encoder.<key>': ...}}).")
    text: str = opt("text_mstar.pth", "Report encoder in mSTAR's zero-shot layout ({'model_state_dict': "
                                      "{'text_encoder.<AutoModelForMaskedLM key>', 'proj_text.*'}}, "
                                      "plus its config and tokenizer).")


@dataclasses.dataclass
class Stage1Config:
    """Root of the stage-1 YAML."""

    data: DataConfig = section(DataConfig, "Data")
    aggregator: AggregatorConfig = section(AggregatorConfig, "Slide aggregator")
    text: TextConfig = section(TextConfig, "Report encoder")
    genes: GeneConfig = section(GeneConfig, "Gene encoder")
    loss: LossConfig = section(LossConfig, "Losses")
    optim: OptimConfig = section(OptimConfig, "Optimiser")
    train: TrainConfig = section(TrainConfig, "Loop")
    dist: DistConfig = section(DistConfig, "Distributed")
    run: RunConfig = section(RunConfig, "Run folder")
    export: ExportConfig = section(ExportConfig, "Exports")
