"""Decision-threshold calibration for two-class scores.

A model fine-tuned on a received set can rank the target's cases perfectly (AUC 1) and still call
them all one class: the received images (synthetic patches, tiny synthetic bags) shift the logits.
The target centre holds labelled data of its own, so it can re-choose the decision threshold on
them. :func:`fit_threshold` picks the threshold on the positive-class score that maximises balanced
accuracy on calibration cases (ties: the one closest to 0.5, the argmax rule);
:func:`metrics_at_threshold` scores cases with it. Every transfer row of a study is calibrated the
same way, on the same own data, so the comparison stays fair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class ThresholdMetrics:
    """Accuracy and balanced accuracy of ``score >= threshold`` as the positive call."""

    threshold: float
    accuracy: float
    balanced_accuracy: float
    n: int


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=np.int64).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} differ in shape")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("threshold calibration is for two classes: labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite")
    return s, y


def _balanced_accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    recalls = [float((pred[y == c] == c).mean()) for c in (0, 1) if (y == c).any()]
    return float(np.mean(recalls)) if recalls else math.nan


def metrics_at_threshold(scores: np.ndarray, labels: np.ndarray, threshold: float) -> ThresholdMetrics:
    """Accuracy / balanced accuracy of calling ``scores >= threshold`` class 1."""
    s, y = _check(scores, labels)
    pred = (s >= threshold).astype(np.int64)
    acc = float((pred == y).mean()) if y.size else math.nan
    return ThresholdMetrics(float(threshold), acc, _balanced_accuracy(pred, y), int(y.size))


def fit_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold on positive-class ``scores`` with the best balanced accuracy on ``labels``.

    Candidates are 0.5 and the midpoints between consecutive distinct scores (plus one below the
    lowest and one above the highest). Ties go to the candidate closest to 0.5, so a calibration set
    that the argmax rule already separates keeps 0.5. With only one class present there is nothing
    to calibrate and 0.5 is returned.
    """
    s, y = _check(scores, labels)
    if y.size == 0 or y.min() == y.max():
        return DEFAULT_THRESHOLD
    u = np.unique(s)
    cands = np.concatenate([[DEFAULT_THRESHOLD, u[0] - 1e-6, u[-1] + 1e-6], (u[:-1] + u[1:]) / 2.0])
    best, best_key = DEFAULT_THRESHOLD, None
    for t in cands:
        key = (_balanced_accuracy((s >= t).astype(np.int64), y), -abs(float(t) - DEFAULT_THRESHOLD))
        if best_key is None or key > best_key:
            best, best_key = float(t), key
    return best


__all__ = ["DEFAULT_THRESHOLD", "ThresholdMetrics", "fit_threshold", "metrics_at_threshold"]
