"""Evaluating classifiers: one model on a test set, and training sets compared over seeds."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from histodd_fed.errors import InputError
from histodd_fed.formation import decode_set
from histodd_fed.patchset import PatchSet
from histodd_fed.training.device import resolve_device
from histodd_fed.training.metrics import Metrics, compute_metrics

log = logging.getLogger(__name__)


def map_batches(model, images: np.ndarray, fn: Callable, *, batch_size: int = 512, device: str = "auto") -> np.ndarray:
    """``fn(model, x)`` over uint8 NHWC ``images`` in batches (x: float NCHW in [0, 1], after the input
    transform the model was trained with, e.g. its stain normalisation), eval mode, no gradient; the
    outputs concatenated as a float32 numpy array (empty input: shape (0, 0))."""
    import torch

    from histodd_fed.training.trainer import INPUT_TRANSFORM_ATTR

    dev = resolve_device(device)
    model = model.to(dev).eval()
    transform = getattr(model, INPUT_TRANSFORM_ATTR, None)  # e.g. the stain normalisation it trained with
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).to(dev)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            out.append(fn(model, x if transform is None else transform(x)).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), dtype=np.float32)


def predict_probs(model, images: np.ndarray, *, batch_size: int = 512, device: str = "auto") -> np.ndarray:
    """Softmax probabilities (N, C) of ``model`` on uint8 NHWC ``images``."""
    import torch

    return map_batches(model, images, lambda m, x: torch.softmax(m(x).float(), dim=1), batch_size=batch_size,
                       device=device)


def evaluate_classifier(model, test: PatchSet, *, batch_size: int = 512, device: str = "auto") -> Metrics:
    """Accuracy, balanced accuracy, ROC AUC and confusion matrix of ``model`` on ``test``."""
    if len(test) == 0:
        raise InputError("test set is empty")
    probs = predict_probs(model, test.images, batch_size=batch_size, device=device)
    return compute_metrics(probs, test.labels, test.num_classes)


def build_seeded_model(arch: str, *, seed: int, num_classes: int, image_size: int, **arch_kwargs):
    """``create_model`` with its initial weights drawn from ``seed`` (global RNG state restored)."""
    import torch

    from histodd_fed.models.registry import create_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return create_model(arch, num_classes=num_classes, image_size=image_size, **arch_kwargs)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std())


@dataclass
class SetEvaluation:
    """One training set trained with several seeds and tested on the same test set."""

    name: str
    n_train: int
    arch: str
    seeds: list[int]
    runs: list[Metrics] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)  # per run: mean seconds per epoch

    def stat(self, metric: str) -> tuple[float, float]:
        """(mean, std over seeds) of ``accuracy``, ``balanced_accuracy`` or ``auc``."""
        return _mean_std([getattr(m, metric) for m in self.runs])

    def summary(self) -> dict:
        """Flat JSON-able summary: ``<metric>_mean``/``_std``, epoch time, sizes, per-seed values."""
        d: dict = {"name": self.name, "arch": self.arch, "n_train": self.n_train, "seeds": list(self.seeds)}
        for m in ("accuracy", "balanced_accuracy", "auc"):
            d[f"{m}_mean"], d[f"{m}_std"] = self.stat(m)
            d[f"{m}_per_seed"] = [getattr(r, m) for r in self.runs]
        d["epoch_seconds_mean"], d["epoch_seconds_std"] = _mean_std(self.epoch_seconds)
        d["n_test"] = self.runs[0].n if self.runs else 0
        d["confusion_sum"] = np.sum([r.confusion for r in self.runs], axis=0).tolist() if self.runs else []
        return d


def seed_list(seeds: int | Sequence[int]) -> list[int]:
    """An int ``k`` means seeds 0..k-1; a sequence is used as is."""
    if isinstance(seeds, int):
        return list(range(seeds))
    return [int(s) for s in seeds]


def evaluate_sets(train_sets: Mapping[str, PatchSet] | PatchSet, test: PatchSet, arch: str,
                  seeds: int | Sequence[int] = 5, epochs: int = 50, *, lr: float = 0.01, batch_size: int = 256,
                  augmentation: str | Callable | None = None, arch_kwargs: dict | None = None,
                  device: str = "auto", progress: bool = True) -> dict[str, SetEvaluation]:
    """Train a fresh ``arch`` on each training set once per seed and test it on ``test``.

    Returns ``{name: SetEvaluation}`` (a single PatchSet is named ``"train"``). Seed ``s`` fixes
    the model's initial weights, the batch order and the augmentation draws.
    """
    from histodd_fed.training.trainer import train_classifier

    sets = {"train": train_sets} if isinstance(train_sets, PatchSet) else dict(train_sets)
    out: dict[str, SetEvaluation] = {}
    for name, ps in sets.items():
        ps = decode_set(ps)   # a multi-formation set trains on its decoded images
        if ps.images.shape[1:] != test.images.shape[1:]:
            raise InputError(f"{name}: patch shape {ps.images.shape[1:]} differs from the test set's "
                             f"{test.images.shape[1:]}; resize one of them")
        if list(ps.class_names) != list(test.class_names):
            raise InputError(f"{name}: classes {ps.class_names} differ from the test set's {test.class_names}")
        ev = SetEvaluation(name=name, n_train=len(ps), arch=arch, seeds=seed_list(seeds))
        for s in ev.seeds:
            model = build_seeded_model(arch, seed=s, num_classes=ps.num_classes, image_size=ps.image_size,
                                       **(arch_kwargs or {}))
            res = train_classifier(model, ps, epochs=epochs, lr=lr, batch_size=batch_size, augmentation=augmentation,
                                   seed=s, device=device, progress=progress, desc=f"{name} seed {s}")
            m = evaluate_classifier(res.model, test, device=device)
            ev.runs.append(m)
            ev.epoch_seconds.append(float(np.mean(res.epoch_seconds)) if res.epoch_seconds else math.nan)
            log.info("%s seed %d (%s, %d train): acc %.4f auc %.4f", name, s, arch, len(ps), m.accuracy, m.auc)
        out[name] = ev
    return out
