"""Pure selection rules of the coreset baselines (numpy only, no training).

- :func:`random_select`: ``ipc`` samples per class drawn without replacement.
- :func:`herding_select`: greedy mean matching (Welling 2009): each step adds the sample that
  brings the mean of the chosen features closest to the class mean; the first pick is therefore
  the sample closest to the class mean.
- :func:`count_forgetting_events` / :func:`forgetting_select`: Toneva et al. 2019. A forgetting
  event is a sample classified correctly at presentation t-1 and wrongly at presentation t.
  Samples never classified correctly are "unforgettable in reverse": they count as the most
  forgotten (infinite events). Ties are broken by a seeded random order.
"""

from __future__ import annotations

import numpy as np

from histodd_fed.errors import InputError


def _class_indices(labels: np.ndarray, c: int, ipc: int, class_name: str | None = None) -> np.ndarray:
    idx = np.flatnonzero(labels == c)
    if len(idx) < ipc:
        raise InputError(f"class {class_name or c}: only {len(idx)} samples, cannot pick {ipc} per class")
    return idx


def random_select(labels: np.ndarray, ipc: int, num_classes: int, seed: int) -> np.ndarray:
    """Indices of ``ipc`` random samples of each class (class-major order)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(num_classes):
        idx = _class_indices(labels, c, ipc)
        out.append(np.sort(rng.choice(idx, size=ipc, replace=False)))
    return np.concatenate(out).astype(np.int64)


def herding_order(features: np.ndarray, k: int) -> np.ndarray:
    """Greedy herding on one class's ``features`` (N, D): positions of the first ``k`` picks, in order."""
    f = np.asarray(features, dtype=np.float64)
    n = len(f)
    if k > n:
        raise InputError(f"herding: cannot pick {k} of {n} samples")
    mu = f.mean(axis=0)
    chosen: list[int] = []
    available = np.ones(n, dtype=bool)
    running = np.zeros(f.shape[1], dtype=np.float64)
    for t in range(1, k + 1):
        # mean of chosen + candidate, distance to the class mean, for every candidate at once
        cand_mean = (running[None, :] + f) / t
        dist = np.linalg.norm(cand_mean - mu[None, :], axis=1)
        dist[~available] = np.inf
        i = int(np.argmin(dist))
        chosen.append(i)
        available[i] = False
        running += f[i]
    return np.asarray(chosen, dtype=np.int64)


def herding_select(features: np.ndarray, labels: np.ndarray, ipc: int, num_classes: int) -> np.ndarray:
    """Indices of ``ipc`` herding picks per class, in pick order within each class."""
    out = []
    for c in range(num_classes):
        idx = _class_indices(labels, c, ipc)
        out.append(idx[herding_order(features[idx], ipc)])
    return np.concatenate(out).astype(np.int64)


def count_forgetting_events(correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """From a (T, N) boolean matrix of per-presentation correctness (row t = presentation t),
    return (events per sample, whether the sample was ever correct).

    An event is ``correct[t-1] and not correct[t]``.
    """
    c = np.asarray(correct, dtype=bool)
    if c.ndim != 2:
        raise ValueError(f"correctness must be (T, N), got shape {c.shape}")
    events = (c[:-1] & ~c[1:]).sum(axis=0) if len(c) > 1 else np.zeros(c.shape[1], dtype=np.int64)
    return events.astype(np.int64), c.any(axis=0)


def forgetting_scores(events: np.ndarray, ever_learnt: np.ndarray) -> np.ndarray:
    """Forgetting score: the event count, or +inf for samples never learnt."""
    s = np.asarray(events, dtype=np.float64).copy()
    s[~np.asarray(ever_learnt, dtype=bool)] = np.inf
    return s


def forgetting_select(scores: np.ndarray, labels: np.ndarray, ipc: int, num_classes: int, seed: int) -> np.ndarray:
    """Indices of the ``ipc`` most forgotten samples per class; equal scores ordered by a seeded shuffle."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(num_classes):
        idx = _class_indices(labels, c, ipc)
        shuffled = idx[rng.permutation(len(idx))]
        order = np.argsort(-scores[shuffled], kind="stable")  # stable: ties keep the seeded order
        out.append(shuffled[order[:ipc]])
    return np.concatenate(out).astype(np.int64)
