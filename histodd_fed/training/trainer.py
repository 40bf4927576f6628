"""Patch-classifier training: one loop for real, coreset and synthetic sets.

Inputs are uint8 patches scaled to [0, 1]; the model normalises them itself (see
``histodd_fed.models.torchvision_models.PatchClassifier``), so a synthetic set from the distiller
and a real store train the same way. Optimiser: SGD (momentum 0.9, weight decay 5e-4) with the
learning rate divided by 10 at half the epochs, as in the dataset-distillation evaluation protocol.
Shuffling and augmentation draw from local generators seeded by ``seed``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from histodd_fed.errors import ConfigError, InputError
from histodd_fed.logging_setup import progress as progress_bar
from histodd_fed.patchset import PatchSet
from histodd_fed.training.device import resolve_device
from histodd_fed.training.metrics import Metrics

log = logging.getLogger(__name__)

# Called after each training step with (sample indices, logits (detached), labels).
BatchHook = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], None]  # noqa: F821


@dataclass
class TrainResult:
    """A trained model plus what the loop measured."""

    model: "torch.nn.Module"  # noqa: F821
    epoch_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)
    val_metrics: Metrics | None = None


def resolve_augmentation(augmentation, images: np.ndarray | None = None):
    """None/"none" -> None; a strategy name -> ``histodd_fed.augment.build_augmentation(name)``;
    a callable ``(x, generator) -> x`` is used as is.

    A ``stain`` / ``stainmatrix`` op normalises toward the template of ``images`` (the training
    data, uint8 NHWC: the patch whose colour statistics are closest to the set's) when given, not
    the reference H&E template.
    """
    if augmentation is None or (isinstance(augmentation, str) and augmentation.lower() in ("", "none")):
        return None
    if callable(augmentation):
        return augmentation
    try:
        from histodd_fed.augment import build_augmentation, parse_strategy
    except ImportError as exc:
        raise ConfigError(f"augmentation {augmentation!r} needs histodd_fed.augment, which is not available ({exc})") from exc
    stain = None
    ops = parse_strategy(str(augmentation))
    if images is not None and len(images) and ("stain" in ops or "stainmatrix" in ops):
        from histodd_fed.stain.normalize import StainContext

        stain = StainContext.from_images(np.asarray(images))
    return build_augmentation(str(augmentation), stain=stain)


class StainInputs:
    """The deterministic stain normalisation a classifier was trained with, applied to every image it
    predicts on (``histodd_fed.training.evaluation.map_batches``): train and test see the same inputs."""

    def __init__(self, stain, rescale: bool) -> None:
        self.stain, self.rescale = stain, bool(rescale)

    def __call__(self, x):
        from histodd_fed.stain.normalize import ImageStains, normalize_stain

        return normalize_stain(x, ImageStains.from_tensor(x), self.stain, rescale=self.rescale)

    def to_dict(self) -> dict:
        return {"kind": "stain", "rescale": self.rescale, **self.stain.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "StainInputs":
        import torch

        from histodd_fed.stain.normalize import StainContext

        ctx = StainContext(torch.tensor(d["template_matrix"], dtype=torch.float32),
                           torch.tensor(d["template_max_conc"], dtype=torch.float32), int(d.get("template_index", -1)))
        return cls(ctx, bool(d.get("rescale", True)))


INPUT_TRANSFORM_ATTR = "histodd_input_transform"


def input_transform_of(aug) -> StainInputs | None:
    """The test-time counterpart of ``aug``: its deterministic stain normalisation, if any."""
    from histodd_fed.augment import Augmentation

    if isinstance(aug, Augmentation) and aug.stain is not None:
        for op in ("stain", "stainmatrix"):
            if op in aug.ops:
                return StainInputs(aug.stain, rescale=op == "stain")
    return None


def set_input_transform(model, transform) -> None:
    """Attach (or clear, with None) the input transform every prediction of ``model`` applies first."""
    model.__dict__[INPUT_TRANSFORM_ATTR] = transform


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps of one epoch over ``n`` images with :func:`_batches`' batching (a last
    single-image batch is merged into the one before)."""
    if n <= 0:
        return 0
    k = -(-n // max(1, min(batch_size, n)))
    return k - 1 if k > 1 and n % max(1, min(batch_size, n)) == 1 else k


def _batches(n: int, batch_size: int, gen) -> list:
    import torch

    perm = torch.randperm(n, generator=gen)
    chunks = list(torch.split(perm, max(1, min(batch_size, n))))
    if len(chunks) > 1 and len(chunks[-1]) == 1:  # a single-sample batch breaks BatchNorm
        chunks[-2] = torch.cat([chunks[-2], chunks[-1]])
        chunks.pop()
    return chunks


def images_to_tensor(ps: PatchSet, device) -> "torch.Tensor":  # noqa: F821
    """uint8 NCHW tensor of the patch set's images on ``device`` (scaled to float per batch)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(ps.images)).permute(0, 3, 1, 2).contiguous().to(device)


def train_classifier(model, train: PatchSet, *, epochs: int, lr: float = 0.01, batch_size: int = 256,
                     augmentation: str | Callable | None = None, seed: int = 0, device: str = "auto",
                     val: PatchSet | None = None, progress: bool = True, momentum: float = 0.9,
                     weight_decay: float = 5e-4, lr_step: bool = True, on_batch: BatchHook | None = None,
                     desc: str = "train") -> TrainResult:
    """Train ``model`` on ``train`` with cross-entropy; returns the model (in eval mode) and timings.

    ``on_batch`` is called after each step with the batch's sample indices, logits and labels
    (used by the forgetting coreset). ``val`` is evaluated once at the end.
    """
    import torch
    from torch.nn import functional as F

    if len(train) == 0:
        raise InputError("training set is empty")
    if epochs < 0:
        raise ConfigError(f"epochs must be >= 0, got {epochs}")
    dev = resolve_device(device)
    aug = resolve_augmentation(augmentation, train.images)
    # normalise both or neither: the stain op the model trains with also applies when it predicts
    set_input_transform(model, input_transform_of(aug))
    shuffle_gen = torch.Generator().manual_seed(int(seed))
    aug_gen = torch.Generator(device=dev).manual_seed(int(seed) + 1)
    model = model.to(dev)
    x_all = images_to_tensor(train, dev)
    y_all = torch.from_numpy(train.labels.copy()).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, epochs // 2)], 0.1) if lr_step and epochs > 1 else None
    result = TrainResult(model=model)
    bar = progress_bar(range(epochs), desc=desc, leave=False) if progress else range(epochs)
    for _ in bar:
        model.train()
        t0 = time.perf_counter()
        loss_sum, correct, seen = 0.0, 0, 0
        for idx in _batches(len(train), batch_size, shuffle_gen):
            idx_dev = idx.to(dev)
            x = x_all[idx_dev].float().div_(255.0)
            y = y_all[idx_dev]
            if aug is not None:
                x = aug(x, aug_gen)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                loss_sum += float(loss) * len(idx)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(idx)
            if on_batch is not None:
                on_batch(idx, logits.detach(), y)
        if sched is not None:
            sched.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        result.epoch_seconds.append(time.perf_counter() - t0)
        result.losses.append(loss_sum / seen)
        result.train_accuracy.append(correct / seen)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}", acc=f"{result.train_accuracy[-1]:.3f}")
    model.eval()
    if val is not None:
        from histodd_fed.training.evaluation import evaluate_classifier

        result.val_metrics = evaluate_classifier(model, val, device=str(dev))
    return result


def fine_tune(model, train: PatchSet, *, epochs: int = 5, lr: float = 0.001, batch_size: int = 64,
              augmentation: str | Callable | None = None, seed: int = 0, device: str = "auto",
              val: PatchSet | None = None, progress: bool = True, freeze_backbone: bool = False,
              desc: str = "fine-tune") -> TrainResult:
    """Continue training a pre-trained ``model`` on ``train`` (lower lr, constant schedule).

    ``freeze_backbone`` trains only the linear ``head`` (the model must have one).
    """
    frozen: list = []
    if freeze_backbone:
        if not hasattr(model, "head"):
            raise ConfigError("freeze_backbone needs a model with a .head layer")
        head_params = {id(p) for p in model.head.parameters()}
        for p in model.parameters():
            if id(p) not in head_params and p.requires_grad:
                p.requires_grad_(False)
                frozen.append(p)
    try:
        return train_classifier(model, train, epochs=epochs, lr=lr, batch_size=batch_size,
                                augmentation=augmentation, seed=seed, device=device, val=val,
                                progress=progress, lr_step=False, desc=desc)
    finally:
        for p in frozen:
            p.requires_grad_(True)
