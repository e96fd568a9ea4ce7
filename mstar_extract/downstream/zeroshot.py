"""``mstar zeroshot BAGS... OUT --checkpoint PATH --prompts FILE.json``: mSTAR's zero-shot slide classification.

The official method (``zeroshot_classification`` of github.com/Innse/mSTAR, commit 7608e7f), step by step:

1. the zero-shot checkpoint (:mod:`mstar_extract.pretrain.zeroshot_export`) gives the report encoder and
   ``proj``; the prompt file's classes become a (D, C) classifier (:func:`~mstar_extract.downstream.text.class_embeddings`);
2. per bag: patch features (from the stage-2 student) → ``proj`` → L2-normalised → logits = features @ classifier
   (N, C) → MI-Zero top-j pooling for every j (:func:`~mstar_extract.downstream.scoring.topj_pooling`);
3. ``OUT/zeroshot.csv``: per slide ``slide_id, bag, n_patches, label`` (with ``--labels``), ``pred_top<j>``
   for every j, ``score_top<j>_<class>`` (the pooled logit of each class at each j) and ``error``; with labels,
   ``OUT/zeroshot_metrics.json``: per j the accuracy and balanced accuracy over the labelled slides, with the
   class list, counts and chance (1 / number of classes). Both files are written atomically.

A bag is checked like a slide: unreadable or incomplete, features of another size than ``proj`` takes, or (when
the checkpoint records its patch extractor) from another extractor or other weights: that slide's row says why,
the others go on, and the exit code is 1. Official accuracy numbers come with 1,000 bootstrap resamples; these
are the plain metrics of the given slides.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mstar_extract.console import Reporter
from mstar_extract.downstream.prompts import Prompts, read_labels, read_prompts
from mstar_extract.downstream.scoring import DEFAULT_TOPJ, accuracy, balanced_accuracy, topj_pooling
from mstar_extract.errors import EXIT_FAILED, EXIT_OK, reason_of
from mstar_extract.store.atomic import write_text_atomic
from mstar_extract.store.layout import make_layout

if TYPE_CHECKING:
    from mstar_extract.inputs import SlideEntry

log = logging.getLogger("mstar")


@dataclass(frozen=True)
class ZeroShotSettings:
    """Options of ``mstar zeroshot``."""

    checkpoint: str
    prompts: str
    labels: str | None = None
    label_column: str = "label"
    topj: tuple[int, ...] = DEFAULT_TOPJ
    device: str = "auto"
    text_model: str | None = None
    debug: bool = False


@dataclass
class Classifier:
    """What scores a bag: ``proj``, the class embeddings, the prompts and the checkpoint's patch extractor."""

    proj: torch.nn.Linear
    weights: torch.Tensor
    prompts: Prompts
    patch_features: dict[str, Any] | None
    device: torch.device


@dataclass
class SlideResult:
    slide_id: str
    bag: str
    n_patches: int | None = None
    preds: dict[int, int] = field(default_factory=dict)
    scores: dict[int, list[float]] = field(default_factory=dict)
    error: str = ""


def build_classifier(settings: ZeroShotSettings) -> Classifier:
    """Checkpoint + prompts → :class:`Classifier` (UsageError/MstarError, one line, when unusable)."""
    from mstar_extract.downstream.text import class_embeddings, load_text_tower
    from mstar_extract.errors import UsageError
    from mstar_extract.models.encoder import resolve_device
    from mstar_extract.pretrain.zeroshot_export import load_zeroshot, proj_state

    prompts = read_prompts(settings.prompts)
    if not Path(settings.checkpoint).is_file():
        raise UsageError(f"{settings.checkpoint}: zero-shot checkpoint not found")
    ckpt = load_zeroshot(settings.checkpoint)
    device = resolve_device(settings.device)
    tower, tokenizer, max_tokens = load_text_tower(ckpt, settings.checkpoint, settings.text_model, device)
    weights = class_embeddings(tower, tokenizer, prompts, max_tokens, device)
    p = proj_state(ckpt, settings.checkpoint)
    proj = torch.nn.Linear(int(p["proj.weight"].shape[1]), int(p["proj.weight"].shape[0]))
    proj.load_state_dict({"weight": p["proj.weight"], "bias": p["proj.bias"]})
    fm = ckpt.get("patch_features")
    return Classifier(proj.eval().to(device), weights, prompts, fm if isinstance(fm, dict) else None, device)


def _bag_problem(attrs: dict[str, Any], dim: int, clf: Classifier) -> str | None:
    if dim != clf.proj.in_features:
        return f"features are {dim}-d, the checkpoint's proj takes {clf.proj.in_features}-d features"
    fm = clf.patch_features
    if fm and (attrs.get("model") != fm.get("model") or attrs.get("weights_sha256") != fm.get("weights_sha256")):
        return (f"features from model {attrs.get('model')} (weights {str(attrs.get('weights_sha256'))[:12]}), but the "
                f"checkpoint's proj belongs to {fm.get('model')} (weights {str(fm.get('weights_sha256'))[:12]})")
    return None


@torch.inference_mode()
def score_bag(entry: SlideEntry, clf: Classifier, topj: Sequence[int]) -> SlideResult:
    """One slide's predictions and pooled scores for every j (``error`` set instead when it cannot be scored)."""
    import h5py

    from mstar_extract.downstream.slide_store import plain_attr
    from mstar_extract.store.bags import validate_bag

    res = SlideResult(entry.slide_id, str(entry.path))
    if entry.error:
        res.error = f"{entry.path}: {entry.error}"
        return res
    problem = validate_bag(entry.path)
    if problem is None:
        with h5py.File(entry.path, "r") as f:
            attrs = {k: plain_attr(v) for k, v in f.attrs.items()}
            feats = f["features"][()]
        problem = _bag_problem(attrs, int(feats.shape[1]), clf) or ("no patches" if len(feats) == 0 else None)
    if problem is not None:
        res.error = f"{entry.path}: {problem}"
        return res
    x = torch.as_tensor(feats, dtype=torch.float32, device=clf.device)
    logits = F.normalize(clf.proj(x), dim=-1) @ clf.weights
    res.n_patches = int(x.shape[0])
    for j, (pred, pooled) in topj_pooling(logits, topj).items():
        res.preds[j], res.scores[j] = pred, [float(v) for v in pooled.cpu()]
    return res


def _csv_text(results: list[SlideResult], clf: Classifier, topj: Sequence[int], labels: dict[str, str] | None) -> str:
    classes = clf.prompts.classes
    cols = ["slide_id", "bag", "n_patches"] + (["label"] if labels is not None else [])
    cols += [f"pred_top{j}" for j in topj] + [f"score_top{j}_{c}" for j in topj for c in classes] + ["error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in results:
        row: dict[str, Any] = {"slide_id": r.slide_id, "bag": r.bag, "n_patches": r.n_patches, "error": r.error}
        if labels is not None:
            row["label"] = labels.get(r.slide_id, "")
        for j in r.preds:
            row[f"pred_top{j}"] = classes[r.preds[j]]
            row.update({f"score_top{j}_{c}": f"{s:.6g}" for c, s in zip(classes, r.scores[j], strict=True)})
        w.writerow(row)
    return buf.getvalue()


def metrics(results: list[SlideResult], classes: list[str], labels: dict[str, str], topj: Sequence[int]) -> dict[str, Any]:
    """Accuracy and balanced accuracy per j over the scored slides whose label is one of ``classes``."""
    scored = [r for r in results if not r.error and labels.get(r.slide_id) in classes]
    y = [classes.index(labels[r.slide_id]) for r in scored]
    by_j = {str(j): {"accuracy": accuracy(y, [r.preds[j] for r in scored]),
                     "balanced_accuracy": balanced_accuracy(y, [r.preds[j] for r in scored])} for j in topj}
    return {"classes": classes, "n_slides": len(results), "n_labelled": len(scored), "chance": 1.0 / len(classes),
            "by_j": by_j}


def run_zeroshot(entries: Sequence[SlideEntry], out_dir: str | Path, settings: ZeroShotSettings,
                 reporter: Reporter | None = None) -> int:
    """Score every bag, write ``zeroshot.csv`` (and ``zeroshot_metrics.json`` with labels); the exit code."""
    reporter = reporter or Reporter()
    layout = make_layout(out_dir)
    labels = read_labels(settings.labels, settings.label_column) if settings.labels else None
    clf = build_classifier(settings)
    if clf.patch_features is None:
        reporter.warn(f"{settings.checkpoint} does not record its patch extractor: bags are checked for their size only")
    results = []
    with reporter.progress(len(entries), "zeroshot: slides", unit="slide") as bar:
        for entry in entries:
            try:
                r = score_bag(entry, clf, settings.topj)
            except Exception as exc:  # a per-slide failure, one line
                if settings.debug:
                    log.exception("scoring %s failed", entry.path)
                r = SlideResult(entry.slide_id, str(entry.path), error=f"{entry.path}: {reason_of(exc)}")
            if r.error:
                reporter.error(r.error)
            results.append(r)
            bar.update(1)
    layout.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(layout.zeroshot_predictions, _csv_text(results, clf, settings.topj, labels))
    summary: dict[str, Any] = {"predictions": str(layout.zeroshot_predictions), "n_slides": len(results),
                               "failed": sum(bool(r.error) for r in results), "classes": clf.prompts.classes}
    if labels is not None:
        unknown = sorted({v for v in labels.values() if v not in clf.prompts.classes})
        if unknown:
            reporter.warn(f"{settings.labels}: labels not in the prompt file are left out: {', '.join(unknown[:5])}")
        m = {**metrics(results, clf.prompts.classes, labels, settings.topj), "checkpoint": settings.checkpoint,
             "prompts": settings.prompts, "labels": settings.labels}
        write_text_atomic(layout.zeroshot_metrics, json.dumps(m, indent=2) + "\n")
        summary.update(metrics=str(layout.zeroshot_metrics), n_labelled=m["n_labelled"], chance=m["chance"], by_j=m["by_j"])
    reporter.event("zeroshot", **summary)
    reporter.info(_summary_line(summary))
    return EXIT_FAILED if summary["failed"] else EXIT_OK


def _summary_line(s: dict[str, Any]) -> str:
    line = f"zeroshot: {s['n_slides']} slides ({s['failed']} failed) -> {s['predictions']}"
    if "by_j" in s:
        accs = ", ".join(f"top-{j} {v['accuracy']:.3f}/{v['balanced_accuracy']:.3f}" for j, v in s["by_j"].items())
        line += f"; accuracy/balanced on {s['n_labelled']} labelled (chance {s['chance']:.3f}): {accs}"
    return line
