"""Coreset builders: train what the rule needs, select, and return a ``kind="coreset"`` PatchSet.

Herding needs features: a ResNet18 trained briefly on the data (``feature_epochs``). Forgetting
records each sample's correctness every time it is presented in a mini-batch while a ResNet18
trains for ``forgetting_epochs`` epochs (Toneva et al.).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np

from histodd_fed.coreset.selection import (count_forgetting_events, forgetting_scores, forgetting_select,
                                           herding_select, random_select)
from histodd_fed.errors import ConfigError, InputError
from histodd_fed.patchset import PatchSet

log = logging.getLogger(__name__)

METHODS = ("random", "herding", "forgetting")


@dataclass
class CoresetConfig:
    """Options of the coreset builders (only those of the chosen method are used)."""

    method: str = "random"
    ipc: int = 10
    seed: int = 0
    arch: str = "resnet18"
    arch_kwargs: dict = field(default_factory=dict)
    feature_epochs: int = 5       # herding: epochs of the feature network
    forgetting_epochs: int = 10   # forgetting: epochs over which events are counted
    lr: float = 0.01
    batch_size: int = 128
    device: str = "auto"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown coreset method {self.method!r}; known: {', '.join(METHODS)}")
        if self.ipc < 1:
            raise ConfigError(f"ipc must be >= 1, got {self.ipc}")


def extract_features(model, images: np.ndarray, *, batch_size: int = 512, device: str = "auto") -> np.ndarray:
    """``model.features`` of uint8 NHWC ``images`` as a float32 (N, D) array."""
    from histodd_fed.training.evaluation import map_batches

    return map_batches(model, images, lambda m, x: m.features(x), batch_size=batch_size, device=device)


def _train_net(real: PatchSet, cfg: CoresetConfig, epochs: int, on_batch=None, progress: bool = True, desc: str = ""):
    from histodd_fed.training.evaluation import build_seeded_model
    from histodd_fed.training.trainer import train_classifier

    model = build_seeded_model(cfg.arch, seed=cfg.seed, num_classes=real.num_classes, image_size=real.image_size,
                               **cfg.arch_kwargs)
    return train_classifier(model, real, epochs=epochs, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed,
                            device=cfg.device, progress=progress, on_batch=on_batch, desc=desc).model


def herding_indices(real: PatchSet, cfg: CoresetConfig, progress: bool = True) -> np.ndarray:
    model = _train_net(real, cfg, cfg.feature_epochs, progress=progress, desc="herding features")
    feats = extract_features(model, real.images, device=cfg.device)
    return herding_select(feats, real.labels, cfg.ipc, real.num_classes)


def forgetting_correctness(real: PatchSet, cfg: CoresetConfig, progress: bool = True) -> np.ndarray:
    """(epochs, N) boolean: was sample i classified correctly when presented in epoch t."""
    correct = np.zeros((cfg.forgetting_epochs, len(real)), dtype=bool)
    epoch = {"t": 0, "seen": 0}

    def hook(idx, logits, y):
        t = epoch["t"]
        correct[t, idx.cpu().numpy()] = (logits.argmax(1) == y).cpu().numpy()
        epoch["seen"] += len(idx)
        if epoch["seen"] >= len(real):
            epoch["t"], epoch["seen"] = t + 1, 0

    _train_net(real, cfg, cfg.forgetting_epochs, on_batch=hook, progress=progress, desc="forgetting")
    return correct


def forgetting_indices(real: PatchSet, cfg: CoresetConfig, progress: bool = True) -> np.ndarray:
    events, learnt = count_forgetting_events(forgetting_correctness(real, cfg, progress))
    log.info("forgetting: %d samples never learnt, max events %d", int((~learnt).sum()), int(events.max(initial=0)))
    return forgetting_select(forgetting_scores(events, learnt), real.labels, cfg.ipc, real.num_classes, cfg.seed)


def build_coreset(real: PatchSet, config: CoresetConfig | None = None, progress: bool = True, **overrides) -> PatchSet:
    """Select ``ipc`` real patches per class with ``config.method``; returns a ``kind="coreset"`` set
    whose meta records method, ipc, seed, the chosen source indices and the source's size."""
    cfg = config or CoresetConfig()
    if overrides:
        cfg = CoresetConfig(**{**asdict(cfg), **overrides})
    cfg.validate()
    if len(real) == 0:
        raise InputError("coreset: the patch set is empty")
    counts = np.bincount(real.labels, minlength=real.num_classes)
    short = [real.class_names[c] for c in range(real.num_classes) if counts[c] < cfg.ipc]
    if short:
        raise InputError(f"coreset: classes {short} have fewer than ipc={cfg.ipc} patches ({counts.tolist()})")
    if cfg.method == "random":
        idx = random_select(real.labels, cfg.ipc, real.num_classes, cfg.seed)
    elif cfg.method == "herding":
        idx = herding_indices(real, cfg, progress)
    else:
        idx = forgetting_indices(real, cfg, progress)
    meta = {"method": cfg.method, "ipc": cfg.ipc, "seed": cfg.seed, "source_indices": idx.tolist(),
            "source_size": len(real), "source": real.meta.get("source"), "config": asdict(cfg)}
    if real.meta.get("view") is not None:  # the preprocessing the patches went through (histodd_fed.preprocess)
        meta["view"] = real.meta["view"]
    return real.subset(idx, kind="coreset", meta=meta)
