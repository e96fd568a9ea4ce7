"""The zero-shot checkpoint: one ``.pth`` in the layout of mSTAR's official zero-shot code.

``{"model_state_dict": {...}, "format": "mstar-zeroshot", "version": 1, "text": {...}, "patch_features": {...},
"provenance": {...}}`` where ``model_state_dict`` holds

* ``text_encoder.*`` + ``proj_text.*`` — the stage-1 report encoder (:mod:`mstar_extract.pretrain.textexport`);
* ``proj.weight`` / ``proj.bias`` — stage 2's projection of patch features into the stage-1 joint space.

The official code (``zeroshot_classification`` of github.com/Innse/mSTAR, commit 7608e7f) loads the text side
from the keys containing ``text_encoder``/``proj_text`` with ``strict=False``, and ``proj`` from the keys equal
to ``proj.weight``/``proj.bias`` (``module.`` removed) into ``nn.Linear(1024, 512)``; it reads only
``model_state_dict``. Our ``mstar zeroshot`` reads the same file (``torch.load(weights_only=True)``: tensors and
plain data only) and uses the extra entries: ``text`` (config, tokenizer, pooling, to rebuild the text tower
offline), ``patch_features`` (``{"model", "weights_sha256", "feature_dim"}`` of the stage-2 student, so bags of
another extractor are refused) and ``provenance`` (sha256 of the parts).

Made automatically at the end of stage 2 (:func:`export_after_stage2`) and by ``mstar pretrain export --stage1
RUN --stage2 RUN OUT.pth`` (:func:`export_from_runs`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mstar_extract.errors import MstarError, UsageError

ZEROSHOT_FORMAT = "mstar-zeroshot"
PROJ_KEYS = ("proj.weight", "proj.bias")


def official_proj(weight: torch.Tensor, bias: torch.Tensor) -> dict[str, Any]:
    """``proj.pth`` content: ``{"model_state_dict": {"proj.weight": (T, D), "proj.bias": (T,)}}``."""
    return {"model_state_dict": {"proj.weight": weight.detach().to("cpu", torch.float32).contiguous().clone(),
                                 "proj.bias": bias.detach().to("cpu", torch.float32).contiguous().clone()}}


def proj_state(obj: Any, where: str) -> dict[str, torch.Tensor]:
    """``{"proj.weight", "proj.bias"}`` of a ``proj.pth`` (official layout, or the bare ``{weight, bias}`` that
    earlier versions wrote) or of a zero-shot checkpoint, found as the official code finds them."""
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):
        sd = {k.replace("module.", ""): v for k, v in obj["model_state_dict"].items()}
        found = {k: sd[k] for k in PROJ_KEYS if k in sd}
    elif isinstance(obj, dict) and {"weight", "bias"} <= set(obj):
        found = {"proj.weight": obj["weight"], "proj.bias": obj["bias"]}
    else:
        found = {}
    if set(found) != set(PROJ_KEYS):
        raise MstarError(f"{where}: no proj.weight / proj.bias (not a stage-2 proj.pth or zero-shot checkpoint)")
    w, b = found["proj.weight"], found["proj.bias"]
    if w.ndim != 2 or b.shape != (w.shape[0],):
        raise MstarError(f"{where}: proj.weight {tuple(w.shape)} and proj.bias {tuple(b.shape)} do not form a Linear")
    return found


def assemble(text_obj: dict[str, Any], proj: dict[str, torch.Tensor], patch_features: dict[str, Any] | None,
             provenance: dict[str, Any]) -> dict[str, Any]:
    """The zero-shot checkpoint from a text export and a projection (sizes checked)."""
    sd = dict(text_obj["model_state_dict"])
    text_dim = int(sd["proj_text.weight"].shape[0])
    if int(proj["proj.weight"].shape[0]) != text_dim:
        raise MstarError(f"proj maps to {int(proj['proj.weight'].shape[0])} dimensions but the report encoder to "
                         f"{text_dim}: these runs do not share a joint space")
    sd.update(proj)
    return {"model_state_dict": sd, "format": ZEROSHOT_FORMAT, "version": 1, "text": text_obj["text"],
            "patch_features": patch_features, "provenance": provenance}


def official_code_note(obj: dict[str, Any]) -> str | None:
    """A warning when mSTAR's own code would embed prompts differently from how stage 1 was trained, else None."""
    pooling = (obj.get("text") or {}).get("pooling", "cls")
    if pooling != "cls":
        return (f"the report encoder was trained with text.pooling={pooling}; mSTAR's own zero-shot code embeds "
                "prompts with the CLS token, so only `mstar zeroshot` (which follows the recorded pooling) scores "
                "this checkpoint as trained")
    return None


def write_zeroshot(path: str | Path, obj: dict[str, Any]) -> Path:
    from mstar_extract.store.atomic import atomic_path

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_zeroshot(path: str | Path) -> dict[str, Any]:
    """Read a zero-shot checkpoint (``weights_only=True``); ours, or an official one (then without ``text``)."""
    from mstar_extract.pretrain.checkpoint import load_torch_file

    obj = load_torch_file(path, "zero-shot checkpoint")
    proj_state(obj, str(path))
    sd = obj["model_state_dict"]
    if not any("text_encoder" in k for k in sd) or not any("proj_text" in k for k in sd):
        raise MstarError(f"{path}: model_state_dict has no text_encoder.* / proj_text.* keys")
    return obj


def _sha(path: Path) -> str:
    from mstar_extract.models.weights import sha256_file

    return sha256_file(path, use_cache=False)


def _stage2_parts(stage2: Path) -> tuple[Path, dict[str, Any] | None, dict[str, Any]]:
    """(proj file, patch_features record or None, provenance) of a stage-2 run folder or ``proj.pth``."""
    if stage2.is_dir():
        card_path = stage2 / "model_card.json"
        if not card_path.is_file():
            raise UsageError(f"{stage2}: no model_card.json (not a finished stage-2 run folder)")
        card = json.loads(card_path.read_text(encoding="utf-8"))
        proj = stage2 / card.get("proj_file", "proj.pth")
        feats = {"model": card["model"], "weights_sha256": card["student_sha256"], "feature_dim": card["feature_dim"]}
        prov = {"teacher_sha256": card.get("teacher_sha256"), "student_sha256": card["student_sha256"]}
        return proj, feats, prov
    if stage2.is_file():
        return stage2, None, {}
    raise UsageError(f"{stage2}: no such stage-2 run folder or proj.pth")


def export_from_runs(stage1: str | Path, stage2: str | Path, out: str | Path) -> Path:
    """``mstar pretrain export``: the zero-shot checkpoint of a stage-1 run (folder or ``text_mstar.pth``) and a
    stage-2 run (folder or ``proj.pth``), written atomically to ``out``."""
    from mstar_extract.pretrain.checkpoint import load_torch_file
    from mstar_extract.pretrain.textexport import load_text_export, text_export_from_run

    s1, s2 = Path(stage1), Path(stage2)
    if s1.is_dir():
        text_obj = text_export_from_run(s1)
    elif s1.is_file():
        text_obj = load_text_export(s1)
    else:
        raise UsageError(f"{s1}: no such stage-1 run folder or text export")
    proj_file, feats, prov = _stage2_parts(s2)
    proj = proj_state(load_torch_file(proj_file, "stage-2 projection"), str(proj_file))
    prov.update(stage1=str(s1), stage2=str(s2), proj_sha256=_sha(proj_file))
    return write_zeroshot(out, assemble(text_obj, proj, feats, prov))


def text_export_for_teacher(teacher_file: Path, explicit: str | None) -> Path | None:
    """The stage-1 text export that belongs to ``teacher_file``: ``explicit`` when given, else the file its run
    wrote beside it (name from the teacher's recorded config; ``text_mstar.pth`` by default), if it exists."""
    from mstar_extract.pretrain.checkpoint import load_torch_file

    if explicit:
        return Path(explicit)
    meta = load_torch_file(teacher_file, "teacher file").get("meta", {})
    name = ((meta.get("config") or {}).get("export") or {}).get("text") or "text_mstar.pth"
    found = teacher_file.parent / name
    return found if found.is_file() else None


def export_after_stage2(teacher_file: Path, text_file: str | None, proj: dict[str, torch.Tensor],
                        patch_features: dict[str, Any], provenance: dict[str, Any], out: Path) -> tuple[Path | None, str]:
    """Stage 2's zero-shot checkpoint: (path, message); path None (and the reason) when the stage-1 text export is
    not there (e.g. a teacher from an older stage-1 run: use ``mstar pretrain export`` with its run folder)."""
    from mstar_extract.pretrain.textexport import load_text_export

    found = text_export_for_teacher(teacher_file, text_file)
    if found is None or not found.is_file():
        where = found or teacher_file.parent
        return None, (f"no zero-shot checkpoint: no stage-1 report encoder export at {where}; make one with "
                      f"`mstar pretrain export --stage1 <stage-1 run> --stage2 <this run> {out.name}`")
    provenance = {**provenance, "text_file": str(found), "text_sha256": _sha(found)}
    obj = assemble(load_text_export(found), proj, patch_features, provenance)
    path = write_zeroshot(out, obj)
    note = official_code_note(obj)
    return path, f"zero-shot checkpoint {path}" + (f" (note: {note})" if note else "")
