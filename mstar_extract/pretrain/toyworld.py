"""A toy world for the whole mSTAR pipeline: slides whose pixels carry a class, and reports that name it.

Used by ``examples/zeroshot/run_tiny.sh`` (toy data → stage 1 → stage 2 → export → ``embed-slides`` →
``zeroshot``) and its test. Every part is the real thing at a tiny size:

* **Slides**: pyramidal Aperio SVS files (:func:`mstar_extract.testing.fixtures.make_svs`) of tissue islands
  textured with a real H&E crop. The class shows in the pixels: every island of a class-``c`` slide is stained
  with the class's intensity (:data:`CLASS_TINTS`, a little jitter per island), so a patch shows its slide's class.
* **Reports**: filler words of a pathology report plus two words that name the class (:data:`CLASS_WORDS`,
  the stage-1 toy vocabulary), so report and pixels share the class and nothing else.
* **The frozen patch encoder** of stage 1 (``frozen.pth``): the registry's ``timm:test_vit`` (64-d, 0.3M
  parameters) with seeded random weights, saved as a state dict so bags record its sha256 and stage 2 can
  start its student from it (as the paper's student starts from the stage-1 extractor).
* **Held-apart slides** (``slides/test``) never appear in a training manifest; their labels are in
  ``labels.csv`` and the class prompts in ``prompts.json`` (the official mSTAR zero-shot format).

Layout of ``out``::

    slides/train/<id>.svs  slides/test/<id>.svs
    frozen.pth             tiny_bert/            prompts.json          labels.csv (test slides)
    stage1_manifest.csv    slide_id, features (bags/features/<id>.h5, written by `mstar extract`), report, cancer_type, split
    stage2_manifest.csv    slide_id, slide, features
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mstar_extract.pretrain.stage1.toydata import FILLER, TYPE_WORDS, make_tiny_bert

CLASS_TINTS = (0.55, 0.8, 1.05, 0.68)
"""Stain intensity of each class's tissue (a multiplier of the H&E texture; 1 = the crop as scanned)."""
CLASS_WORDS = TYPE_WORDS
"""Words that name each class in reports and prompts (the stage-1 toy vocabulary)."""
TEMPLATES = ("CLASSNAME", "CLASSNAME .", "the sections show CLASSNAME", "microscopic examination reveals CLASSNAME",
             "CLASSNAME tumor tissue")
"""Prompt templates (official mSTAR format: ``CLASSNAME`` is replaced by each name of a class)."""
ENCODER = "timm:test_vit"


@dataclass
class ToyWorld:
    """Paths of a generated toy world (see the module docstring)."""

    root: Path
    train_slides: list[Path]
    test_slides: list[Path]
    classes: list[str]
    frozen_weights: Path
    text_model: Path
    stage1_manifest: Path
    stage2_manifest: Path
    labels: Path
    prompts: Path


def class_names(n_classes: int) -> list[str]:
    """Label of each class: the first word naming it (``adenocarcinoma``, ``squamous``, ``clear``, ...)."""
    return [CLASS_WORDS[c][0] for c in range(n_classes)]


def toy_report(c: int, rng: np.random.Generator) -> str:
    """A report of class ``c``: 8-15 filler words and two words naming the class, shuffled."""
    words = list(rng.choice(FILLER, size=int(rng.integers(8, 16)))) + list(rng.choice(CLASS_WORDS[c], size=2))
    rng.shuffle(words)
    return " ".join(str(w) for w in words)


SLIDE_UM = (1800.0, 1400.0)
"""Default slide size in µm (about 27 tissue patches of 256 px at 20x)."""


def make_class_slide(path: Path, c: int, seed: int, size_um: tuple[float, float] = SLIDE_UM) -> Path:
    """One SVS slide (20x, 0.5 µm/px) whose tissue islands have class ``c``'s stain intensity."""
    from mstar_extract.testing.fixtures import make_svs
    from mstar_extract.testing.scene import random_scene

    rng = np.random.default_rng(seed)
    scene = random_scene(*size_um, seed=seed, n_blobs=2, holes=False, faint=False, pen=False, dust=False)
    tint = CLASS_TINTS[c]
    scene = replace(scene, blobs=tuple(replace(b, tint=tint * float(rng.uniform(0.95, 1.05))) for b in scene.blobs))
    return make_svs(path, scene, mpp=0.5, magnification=20, levels=(1, 4), associated=False)


def save_frozen_encoder(path: Path, seed: int = 0) -> Path:
    """The stage-1 patch encoder (:data:`ENCODER`, seeded random weights) as a plain state dict file."""
    import torch

    from mstar_extract.models.registry import get_spec
    from mstar_extract.store.atomic import atomic_path

    torch.manual_seed(seed)
    net = get_spec(ENCODER).build()
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().clone() for k, v in net.state_dict().items()}, tmp)
    return path


def write_prompts(path: Path, n_classes: int) -> Path:
    """``prompts.json`` in the official format: ``{"0": {"classnames": {label: [names]}, "templates": [...]}}``."""
    doc = {"0": {"classnames": {class_names(n_classes)[c]: list(CLASS_WORDS[c]) for c in range(n_classes)},
                 "templates": list(TEMPLATES)}}
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def make_toy_world(out: str | Path, n_train: int = 10, n_test: int = 4, n_classes: int = 3, seed: int = 0,
                   size_um: tuple[float, float] = SLIDE_UM) -> ToyWorld:
    """Write ``n_train`` training and ``n_test`` held-apart slides per class (``size_um`` each) and everything else
    under ``out``.

    Bags are not written here: ``mstar extract slides/train bags --model timm:test_vit --weights frozen.pth``
    writes them where ``stage1_manifest.csv`` and ``stage2_manifest.csv`` expect them (``bags/features``)."""
    if not 2 <= n_classes <= len(CLASS_TINTS):
        raise ValueError(f"n_classes must be 2..{len(CLASS_TINTS)}")
    root = Path(out)
    rng = np.random.default_rng(seed)
    labels = class_names(n_classes)
    train, test, s1, s2, lab = [], [], [], [], []
    for split, n_per in (("train", n_train), ("test", n_test)):
        (root / "slides" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n_per * n_classes):
            c = i % n_classes
            sid = f"{split[:2]}{i:03d}"
            path = root / "slides" / split / f"{sid}.svs"
            make_class_slide(path, c, seed * 10007 + (0 if split == "train" else 5003) + i, size_um)
            if split == "train":
                train.append(path)
                s1.append([sid, f"bags/features/{sid}.h5", toy_report(c, rng), labels[c], "train"])
                s2.append([sid, f"slides/train/{sid}.svs", f"bags/features/{sid}.h5"])
            else:
                test.append(path)
                lab.append([sid, labels[c]])
    world = ToyWorld(
        root=root, train_slides=train, test_slides=test, classes=labels,
        frozen_weights=save_frozen_encoder(root / "frozen.pth", seed), text_model=make_tiny_bert(root / "tiny_bert"),
        stage1_manifest=_write_csv(root / "stage1_manifest.csv", ["slide_id", "features", "report", "cancer_type", "split"], s1),
        stage2_manifest=_write_csv(root / "stage2_manifest.csv", ["slide_id", "slide", "features"], s2),
        labels=_write_csv(root / "labels.csv", ["slide_id", "label"], lab),
        prompts=write_prompts(root / "prompts.json", n_classes),
    )
    return world


def main(argv: list[str] | None = None) -> int:
    """``python -m mstar_extract.pretrain.toyworld OUT [--train N] [--test N] [--classes C] [--seed S]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mstar_extract.pretrain.toyworld", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--train", type=int, default=10, help="training slides per class (default 10)")
    ap.add_argument("--test", type=int, default=4, help="held-apart slides per class (default 4)")
    ap.add_argument("--classes", type=int, default=3, help="number of classes (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    w = make_toy_world(a.out, a.train, a.test, a.classes, a.seed)
    print(f"{len(w.train_slides)} training and {len(w.test_slides)} held-apart slides of {len(w.classes)} classes "
          f"({', '.join(w.classes)}) in {w.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
