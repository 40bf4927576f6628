"""Training and evaluation of MIL heads on bags (one bag per step, Adam, cross-entropy + head terms).

Model initialisation, shuffling and dropout draw from torch's RNG inside ``torch.random.fork_rng``
seeded by ``seed``, so runs are reproducible and the caller's global RNG state is left untouched.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from histodd_fed.errors import ConfigError, InputError
from histodd_fed.logging_setup import progress as progress_bar
from histodd_fed.mil.bags import Bag
from histodd_fed.mil.registry import canonical_name, create_mil

log = logging.getLogger(__name__)


@dataclass
class MilMetrics:
    """Slide-level metrics: accuracy, ROC AUC (NaN when one class is absent), mean loss, count."""

    accuracy: float
    auc: float
    n: int
    loss: float = math.nan
    balanced_accuracy: float = math.nan

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MilTrainResult:
    """A trained MIL head and what training measured."""

    model: nn.Module
    epoch_seconds: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    val_metrics: list[MilMetrics] = field(default_factory=list)
    best_epoch: int | None = None

    @property
    def mean_epoch_seconds(self) -> float:
        return float(np.mean(self.epoch_seconds)) if self.epoch_seconds else math.nan


def _check_bags(bags: Sequence[Bag], what: str) -> int:
    if not bags:
        raise InputError(f"{what}: no bags")
    dims = {b.dim for b in bags}
    if len(dims) != 1:
        raise InputError(f"{what}: bags have different feature sizes {sorted(dims)}")
    return dims.pop()


def train_mil(bags: Sequence[Bag], arch: str = "abmil", *, epochs: int = 20, lr: float = 2e-4, seed: int = 0,
              val_bags: Sequence[Bag] | None = None, model: nn.Module | None = None, progress: bool = True,
              weight_decay: float = 1e-5, num_classes: int | None = None, model_kwargs: dict | None = None,
              device: str = "cpu") -> MilTrainResult:
    """Train MIL head ``arch`` (or fine-tune ``model``) on ``bags``.

    With ``val_bags`` the weights of the epoch with the best validation AUC (then accuracy, then
    lower loss) are kept; otherwise the last epoch's.
    """
    if epochs < 0:
        raise ConfigError(f"epochs must be >= 0, got {epochs}")
    dim = _check_bags(bags, "training set")
    labels = np.array([b.label for b in bags])
    n_cls = int(num_classes or max(2, int(labels.max()) + 1))
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        if model is None:
            model = create_mil(arch, in_dim=dim, num_classes=n_cls, **(model_kwargs or {}))
        model = model.to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(int(seed) + 1)
        result = MilTrainResult(model=model)
        best_key, best_state = None, None
        bar = progress_bar(range(epochs), desc=f"mil {canonical_name(arch)}", leave=False) if progress else range(epochs)
        for epoch in bar:
            model.train()
            t0 = time.perf_counter()
            total = 0.0
            for i in torch.randperm(len(bags), generator=gen).tolist():
                b = bags[i]
                out = model(b.features.to(dev))
                loss = model.loss(out, torch.tensor(b.label, device=dev))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
            result.epoch_seconds.append(time.perf_counter() - t0)
            result.losses.append(total / len(bags))
            if val_bags:
                m = evaluate_mil(model, val_bags, device=device)
                result.val_metrics.append(m)
                key = (-1.0 if math.isnan(m.auc) else m.auc, m.accuracy, -m.loss)
                if best_key is None or key > best_key:
                    best_key, result.best_epoch = key, epoch
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{result.losses[-1]:.3f}")
        if best_state is not None:
            model.load_state_dict(best_state)
    model.eval()
    return result


@torch.no_grad()
def predict_mil(model: nn.Module, bags: Sequence[Bag], device: str = "cpu") -> np.ndarray:
    """(n_bags, C) class probabilities."""
    model.eval()
    probs = [torch.softmax(model(b.features.to(device))["logits"], dim=-1)[0].cpu() for b in bags]
    return torch.stack(probs).numpy() if probs else np.zeros((0, 2))


@torch.no_grad()
def evaluate_mil(model: nn.Module, bags: Sequence[Bag], device: str = "cpu") -> MilMetrics:
    """Slide-level accuracy, AUC (rank form), balanced accuracy and mean cross-entropy."""
    from histodd_fed.training.metrics import compute_metrics

    if not bags:
        raise InputError("evaluation set: no bags")
    probs = predict_mil(model, bags, device)
    labels = np.array([b.label for b in bags], dtype=np.int64)
    m = compute_metrics(probs, labels, num_classes=probs.shape[1])
    nll = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0))))
    return MilMetrics(accuracy=m.accuracy, auc=m.auc, n=m.n, loss=nll, balanced_accuracy=m.balanced_accuracy)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) ignoring NaNs."""
    v = np.asarray([x for x in values if not (isinstance(x, float) and math.isnan(x))], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def format_mean_std(values: Sequence[float], scale: float = 1.0, digits: int = 1) -> str:
    """``"mean ± std"`` of ``values * scale``."""
    m, s = mean_std([x * scale for x in values])
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def save_mil(model: nn.Module, out_dir: str | Path, extra: dict | None = None) -> Path:
    """Write ``mil_model.safetensors`` + ``mil_model.json`` (arch and constructor args) atomically."""
    from safetensors.torch import save

    from histodd_fed.atomic import atomic_write_bytes, atomic_write_json

    cfg = getattr(model, "mil_config", None)
    if not cfg:
        raise ConfigError("model has no mil_config; build it with histodd_fed.mil.create_mil")
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out_dir / "mil_model.safetensors", save(state))
    atomic_write_json(out_dir / "mil_model.json", {"format": "histodd-mil-model", **cfg, "extra": extra or {}})
    return out_dir


def load_mil(path: str | Path) -> tuple[nn.Module, dict]:
    """Load a head saved by :func:`save_mil`; returns (model in eval mode, its json header)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta_f, w_f = path / "mil_model.json", path / "mil_model.safetensors"
    try:
        meta = json.loads(meta_f.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{meta_f}: unreadable MIL model header ({exc})") from exc
    if meta.get("format") != "histodd-mil-model":
        raise InputError(f"{meta_f}: not a histodd MIL model header")
    kw = {k: v for k, v in meta.items() if k not in ("format", "arch", "in_dim", "num_classes", "extra")}
    model = create_mil(meta["arch"], in_dim=meta["in_dim"], num_classes=meta["num_classes"], **kw)
    try:
        state = load_file(str(w_f))
        model.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - any decode / mismatch is bad input
        raise InputError(f"{w_f}: weights do not load into {meta['arch']} ({type(exc).__name__}: {exc})") from exc
    model.eval()
    return model, meta
