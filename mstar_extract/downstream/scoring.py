"""MI-Zero top-j pooling of patch logits (the official mSTAR zero-shot method) and the metrics of its predictions.

For a slide with patch logits ``L`` (N patches × C classes; cosine similarities of the L2-normalised projected
patch features with the L2-normalised class embeddings), the score of class c at top-j is the mean of the j
largest values of column c (each class picks its own patches; all N when j ≥ N), and the prediction is the class
with the largest score: ``topj_pooling`` of ``zeroshot_classification/utils/zeroshot_path.py`` in
github.com/Innse/mSTAR (commit 7608e7f).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_TOPJ = (1, 5, 10, 50, 100)


def topj_pooling(logits: torch.Tensor, topj: Sequence[int] = DEFAULT_TOPJ) -> dict[int, tuple[int, torch.Tensor]]:
    """``{j: (predicted class, pooled scores (C,))}`` of patch logits (N, C), N ≥ 1."""
    maxj = min(max(topj), int(logits.shape[0]))
    values = logits.topk(maxj, dim=0, largest=True, sorted=True).values  # (maxj, C)
    out = {}
    for j in topj:
        pooled = values[: min(j, maxj)].mean(dim=0)
        out[int(j)] = (int(pooled.argmax()), pooled)
    return out


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of correct predictions."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return float((t == p).mean()) if t.size else float("nan")


def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Mean recall over the classes present in ``y_true`` (scikit-learn's ``balanced_accuracy_score``)."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if not t.size:
        return float("nan")
    return float(np.mean([(p[t == c] == c).mean() for c in np.unique(t)]))
