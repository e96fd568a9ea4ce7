"""Stage-2 exports (rank 0, at the end of a run): ``student.pth``, ``proj.pth`` and ``model_card.json``.

* ``student.pth`` — a plain state dict of the student's timm network (no ``module.``/``student.`` prefixes,
  float32), verified by a ``strict=True`` load into a freshly built network of the same registry spec (for
  ``mstar``/``uni``: ``vit_large_patch16_224(init_values=1e-5, num_classes=0, dynamic_img_size=True)``, the
  released mSTAR format), so ``mstar extract --weights student.pth`` uses it.
* ``proj.pth`` — ``{"model_state_dict": {"proj.weight": (T, D), "proj.bias": (T,)}}``, the layout mSTAR's
  zero-shot code reads its ``proj`` from.
* ``model_card.json`` — format :data:`CARD_FORMAT`: architecture, preprocessing, how the student was
  initialised, teacher and manifest hashes, sizes, steps, sha256 of both exports, final metrics, the config.
* ``zeroshot.pth`` — the zero-shot checkpoint (:mod:`mstar_extract.pretrain.zeroshot_export`): the stage-1
  report encoder beside the teacher file + ``proj``, when that stage-1 export exists.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mstar_extract import __version__
from mstar_extract.pretrain.config import config_to_dict
from mstar_extract.pretrain.stage2.student import StudentInit, StudentWithProj
from mstar_extract.store.atomic import atomic_path, write_text_atomic

if TYPE_CHECKING:  # pragma: no cover
    from mstar_extract.models.registry import EncoderSpec
    from mstar_extract.pretrain.stage2.config import Stage2Config

CARD_FORMAT = "mstar-stage2-student/1"


@dataclass
class Provenance:
    """Where a trained student came from (recorded in the model card)."""

    teacher_file: Path
    teacher_sha256: str
    manifest: Path
    n_slides: int
    n_patches: int
    steps: int
    world_size: int


@dataclass
class ExportedFiles:
    student: Path
    proj: Path
    card: Path
    zeroshot: Path | None = None
    zeroshot_note: str = "no zero-shot checkpoint (export.zeroshot: null)"


def student_state_dict(model: StudentWithProj) -> dict[str, torch.Tensor]:
    """The student's plain timm state dict (no ``module.``/``student.`` prefixes), contiguous CPU fp32 tensors."""
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.student.state_dict().items()}


def verify_student_file(path: str | os.PathLike[str], spec: EncoderSpec) -> None:
    """Load ``path`` with ``strict=True`` into a fresh ``spec`` network (raises WeightsError on any mismatch)."""
    from mstar_extract.models.weights import load_into, load_state_dict_file

    load_into(spec.build(), load_state_dict_file(path), spec, path)


def export_student(model: StudentWithProj, spec: EncoderSpec, student_path: str | os.PathLike[str],
                   proj_path: str | os.PathLike[str], verify: bool = True) -> None:
    """Write ``student.pth`` (plain timm state dict) and ``proj.pth`` (``weight``, ``bias``), atomically.

    With ``verify`` the student file is re-read and loaded ``strict=True`` into a newly built network.
    """
    with atomic_path(student_path) as tmp:
        torch.save(student_state_dict(model), tmp)
    from mstar_extract.pretrain.zeroshot_export import official_proj

    with atomic_path(proj_path) as tmp:
        torch.save(official_proj(model.proj.weight, model.proj.bias), tmp)
    if verify:
        verify_student_file(student_path, spec)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, computed now (never from a cache: these files were just written)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_card(cfg: Stage2Config, model: StudentWithProj, spec: EncoderSpec, init: StudentInit, prov: Provenance,
               files: ExportedFiles, final_metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The model card's content (see the module docstring)."""
    return {
        "format": CARD_FORMAT,
        "model": spec.name,
        "architecture": spec.architecture,
        "timm_kwargs": spec.kwargs,
        "feature_dim": spec.feature_dim,
        "proj_dim": model.target_dim,
        "input_size": spec.input_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "init": asdict(init),
        "teacher_file": str(prov.teacher_file),
        "teacher_sha256": prov.teacher_sha256,
        "manifest": str(prov.manifest),
        "manifest_sha256": file_sha256(prov.manifest),
        "n_slides": prov.n_slides,
        "n_patches": prov.n_patches,
        "steps": prov.steps,
        "global_batch": cfg.train.batch_size * prov.world_size,
        "world_size": prov.world_size,
        "student_file": cfg.export.student,
        "student_sha256": file_sha256(files.student),
        "proj_file": cfg.export.proj,
        "proj_sha256": file_sha256(files.proj),
        "final_metrics": final_metrics,
        "usage": f"mstar extract SLIDES OUT --model {spec.name} --weights {files.student}",
        "config": config_to_dict(cfg),
        "mstar_extract_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def export_run(cfg: Stage2Config, model: StudentWithProj, spec: EncoderSpec, init: StudentInit, prov: Provenance,
               run_dir: Path, final_metrics: dict[str, Any] | None) -> ExportedFiles:
    """Write the three exports into ``run_dir`` (names from ``cfg.export``)."""
    files = ExportedFiles(run_dir / cfg.export.student, run_dir / cfg.export.proj, run_dir / cfg.export.card)
    export_student(model, spec, files.student, files.proj, verify=cfg.export.verify)
    card = model_card(cfg, model, spec, init, prov, files, final_metrics)
    if cfg.export.zeroshot:
        export_zeroshot(cfg, model, card, prov, run_dir, files)
    card["zeroshot_file"] = cfg.export.zeroshot if files.zeroshot else None
    write_text_atomic(files.card, json.dumps(card, indent=2, default=str) + "\n")
    return files


def export_zeroshot(cfg: Stage2Config, model: StudentWithProj, card: dict[str, Any], prov: Provenance, run_dir: Path,
                    files: ExportedFiles) -> None:
    """The zero-shot checkpoint (stage-1 report encoder + this run's ``proj``) into ``files``, or the reason why not."""
    from mstar_extract.pretrain.zeroshot_export import export_after_stage2, official_proj

    assert cfg.export.zeroshot
    proj = official_proj(model.proj.weight, model.proj.bias)["model_state_dict"]
    feats = {"model": card["model"], "weights_sha256": card["student_sha256"], "feature_dim": card["feature_dim"]}
    provenance = {"teacher_sha256": prov.teacher_sha256, "student_sha256": card["student_sha256"],
                  "proj_sha256": card["proj_sha256"]}
    files.zeroshot, files.zeroshot_note = export_after_stage2(prov.teacher_file, cfg.export.text, proj, feats,
                                                              provenance, run_dir / cfg.export.zeroshot)
