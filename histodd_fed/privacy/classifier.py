"""Small classifiers the audit trains for itself: a feature encoder and the attack's target model.

The audit uses the project's training loop (:func:`histodd_fed.training.train_classifier`, with a
DSA augmentation strategy name) so that the attacked model is trained the way the centre trains its
evaluation classifier. :func:`fit_classifier` is a plain seeded SGD loop with random flips and
90-degree rotations, used when ``use_project_trainer`` is off or that module is not importable.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from histodd_fed.logging_setup import progress
from histodd_fed.patchset import PatchSet

log = logging.getLogger(__name__)


@dataclass
class TrainSpec:
    """How to train one classifier."""

    model: str = "convnet"
    model_kwargs: dict = field(default_factory=dict)  #: extra constructor options, e.g. {"width": 32}
    epochs: int = 3
    lr: float = 0.01
    batch_size: int = 64
    weight_decay: float = 5e-4
    augmentation: str | None = "flip_rotate"
    use_project_trainer: bool = True


def _flip_rotate(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and 90-degree rotation per batch (dihedral, label-preserving)."""
    if torch.rand((), generator=gen) < 0.5:
        x = x.flip(3)
    k = int(torch.randint(0, 4, (), generator=gen))
    return torch.rot90(x, k, dims=(2, 3)) if k else x


def fit_classifier(model: nn.Module, data: PatchSet, *, epochs: int, lr: float, batch_size: int,
                   seed: int, weight_decay: float = 5e-4, augment: bool = True,
                   desc: str = "train") -> nn.Module:
    """Train ``model`` on ``data`` with SGD (momentum 0.9, cosine LR); returns it in eval mode."""
    gen = torch.Generator().manual_seed(int(seed))
    x, y = data.to_tensors()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, -(-len(x) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in progress(range(epochs), desc=desc, leave=False):
        order = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), batch_size):
            idx = order[s:s + batch_size]
            xb = x[idx]
            if augment:
                xb = _flip_rotate(xb, gen)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), y[idx])
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return model


def train_model(spec: TrainSpec, data: PatchSet, seed: int, desc: str = "train") -> nn.Module:
    """Build ``spec.model`` from the registry (seeded init) and train it on ``data``."""
    from histodd_fed.models import create_model

    with torch.random.fork_rng(devices=[]):  # constructors draw initial weights from the global RNG
        torch.manual_seed(int(seed))
        model = create_model(spec.model, num_classes=data.num_classes, image_size=data.image_size,
                             **spec.model_kwargs)
    if spec.use_project_trainer:
        trained = _try_project_trainer(model, data, spec, seed, desc)
        if trained is not None:
            return trained
    return fit_classifier(model, data, epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
                          seed=seed, weight_decay=spec.weight_decay, augment=bool(spec.augmentation), desc=desc)


def _try_project_trainer(model: nn.Module, data: PatchSet, spec: TrainSpec, seed: int, desc: str) -> nn.Module | None:
    try:
        from histodd_fed.training import train_classifier
    except ImportError:
        return None
    try:
        result = train_classifier(model, data, epochs=spec.epochs, lr=spec.lr, batch_size=spec.batch_size,
                                  augmentation=spec.augmentation, seed=seed, device="cpu",
                                  weight_decay=spec.weight_decay, desc=desc)
    except TypeError as exc:  # a signature we do not know: use our own loop
        log.warning("histodd_fed.training.train_classifier rejected our call (%s); using the audit's own loop", exc)
        return None
    out = getattr(result, "model", result)
    out.eval()
    return out


@torch.no_grad()
def extract_features(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """``model.features`` (or the logits when absent) of ``x`` in eval mode, batched."""
    model.eval()
    fn = getattr(model, "features", model)
    return torch.cat([fn(x[s:s + batch_size]).float() for s in range(0, len(x), batch_size)]) if len(x) else torch.zeros(0)


@torch.no_grad()
def per_sample_outputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per-sample cross-entropy loss, true-class probability and max probability."""
    model.eval()
    losses, p_true, p_max = [], [], []
    for s in range(0, len(x), batch_size):
        logits = model(x[s:s + batch_size]).float()
        logp = torch.log_softmax(logits, dim=1)
        yb = y[s:s + batch_size]
        lt = logp.gather(1, yb.view(-1, 1)).squeeze(1)
        losses.append(-lt)
        p_true.append(lt.exp())
        p_max.append(logp.max(1).values.exp())
    cat = lambda v: torch.cat(v).numpy().astype(np.float64) if v else np.zeros(0)  # noqa: E731
    return {"loss": cat(losses), "p_true": cat(p_true), "p_max": cat(p_max)}
