"""Classification metrics written from their definitions: accuracy, balanced accuracy, ROC AUC.

ROC AUC is the rank form (Mann-Whitney U): the probability that a random positive scores higher
than a random negative, ties counting one half. For more than two classes it is the macro average
of one-vs-rest AUCs over the classes present with both positives and negatives.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.stats import rankdata


@dataclass
class Metrics:
    """Patch-level metrics of one evaluation."""

    accuracy: float
    balanced_accuracy: float
    auc: float
    confusion: list[list[int]]
    n: int
    per_class_recall: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Rank-based ROC AUC of ``scores`` for the boolean ``positive``; NaN if one class is absent."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    if scores.shape != positive.shape:
        raise ValueError(f"scores {scores.shape} and labels {positive.shape} differ in shape")
    n_pos = int(positive.sum())
    n_neg = int(positive.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores, method="average")  # ties get their mean rank
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """AUC from (N, C) class probabilities (or (N,) positive-class scores for two classes)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim == 1:
        return binary_auc(probs, labels == 1)
    if probs.shape[1] == 2:
        return binary_auc(probs[:, 1], labels == 1)
    aucs = [binary_auc(probs[:, c], labels == c) for c in range(probs.shape[1])]
    aucs = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(aucs)) if aucs else math.nan


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(pred, dtype=np.int64)), 1)
    return cm


def compute_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> Metrics:
    """All metrics from (N, C) probabilities and true labels."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    c = num_classes or probs.shape[1]
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(pred, labels, c)
    support = cm.sum(axis=1)
    recall = [float(cm[i, i] / support[i]) if support[i] else math.nan for i in range(c)]
    present = [r for r in recall if not math.isnan(r)]
    n = int(labels.size)
    return Metrics(
        accuracy=float((pred == labels).mean()) if n else math.nan,
        balanced_accuracy=float(np.mean(present)) if present else math.nan,
        auc=roc_auc(probs, labels),
        confusion=cm.tolist(),
        n=n,
        per_class_recall=recall,
    )
