"""The model pool S: classifiers pre-trained on the local real patches, cached on disk.

Each model is trained from a different initialisation (seed ``seed + 1000 * i``). The cache key is
a SHA-256 over the source data hash and the pool-relevant config, so a re-run with the same data
and settings loads the models (safetensors) instead of training them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from histodd_fed.atomic import atomic_write_bytes, atomic_write_json
from histodd_fed.augment import Augmentation
from histodd_fed.errors import InputError
from histodd_fed.logging_setup import progress as progress_bar
from histodd_fed.models import create_model
from histodd_fed.stain.normalize import ImageStains

log = logging.getLogger(__name__)

POOL_FIELDS = ("model", "model_kwargs", "image_size", "pool_size", "pool_epochs", "pool_lr", "pool_batch",
               "augmentation", "seed")
#: pool fields added later: in the key only when not at their default (earlier caches stay valid)
LATER_POOL_FIELDS = {"input_norm": "none"}


class InputNormalised(torch.nn.Module):
    """``net((x - mean) / std)``: a distillation network with its input normalisation inside, so real and
    synthetic images (kept in [0, 1], augmented in RGB) enter it alike. ``features`` is normalised too."""

    def __init__(self, net: torch.nn.Module, mean, std) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("input_mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("input_std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        if hasattr(net, "feature_dim"):
            self.feature_dim = net.feature_dim

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) / self.input_std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(self.normalise(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalise(x))


def input_stats(config, x: torch.Tensor | None) -> tuple[list[float], list[float]] | None:
    """(mean, std) per channel for ``config.input_norm``: None (none), ImageNet's, or those of the real
    images ``x`` (N, C, H, W) in [0, 1] (dataset)."""
    if config.input_norm == "none":
        return None
    if config.input_norm == "imagenet":
        from histodd_fed.models.torchvision_models import INPUT_MEAN, INPUT_STD

        return list(INPUT_MEAN), list(INPUT_STD)
    if x is None:
        raise InputError("input_norm 'dataset' needs the real images to take their statistics from")
    xf = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1)
    mean = xf.mean(1)
    std = xf.std(1).clamp_min(1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


@dataclass
class ModelPool:
    """Pre-trained state dicts (CPU tensors) and whether they came from the cache."""

    states: list[dict[str, torch.Tensor]]
    key: str
    reused: bool
    seconds: float


def pool_key(data_hash: str, config) -> str:
    cfg = {k: getattr(config, k) for k in POOL_FIELDS}
    cfg.update({k: getattr(config, k) for k, d in LATER_POOL_FIELDS.items() if getattr(config, k, d) != d})
    blob = json.dumps({"data": data_hash, "pool": cfg}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def build_model(config, num_classes: int, norm: tuple[list[float], list[float]] | None = None) -> torch.nn.Module:
    """The distillation network of ``config``; wrapped in :class:`InputNormalised` when ``norm`` (mean, std)
    is given (:func:`input_stats`)."""
    net = create_model(config.model, num_classes=num_classes, image_size=config.image_size, **config.model_kwargs)
    if norm is not None:
        net = InputNormalised(net, *norm)
    return net


def train_classifier(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch: int,
                     aug: Augmentation | None, stains: ImageStains | None, generator: torch.Generator,
                     desc: str | None = None, show_progress: bool = False) -> torch.nn.Module:
    """Plain SGD (momentum 0.9, weight decay 5e-4) on ``(x, y)`` with per-image augmentation."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    n = x.shape[0]
    model.train()
    for _ in progress_bar(range(epochs), desc=desc, leave=False, disable=not show_progress):
        perm = torch.randperm(n, generator=generator).to(x.device)
        for s in range(0, n, batch):
            idx = perm[s:s + batch]
            xb = x[idx]
            if aug is not None:
                xb = aug(xb, generator, stains=None if stains is None else stains.index(idx))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model


def _save_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in state.items()}))


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(path.read_bytes())
    except (OSError, SafetensorError) as exc:
        raise InputError(f"{path}: unreadable pool model ({exc})") from exc


def get_pool(config, num_classes: int, x: torch.Tensor, y: torch.Tensor, aug: Augmentation | None,
             stains: ImageStains | None, data_hash: str, cache_dir: Path | None, show_progress: bool = True,
             norm: tuple[list[float], list[float]] | None = None) -> ModelPool:
    """Load the pool from ``cache_dir`` if present for this data + config, else train and cache it."""
    import time

    key = pool_key(data_hash, config)
    folder = None if cache_dir is None else Path(cache_dir) / key[:24]
    files = [] if folder is None else [folder / f"model_{i}.safetensors" for i in range(config.pool_size)]
    if folder is not None and (folder / "pool.json").exists() and all(f.exists() for f in files):
        try:
            stored = json.loads((folder / "pool.json").read_text())
        except (OSError, json.JSONDecodeError):
            stored = {}
        if stored.get("key") == key:
            log.info("model pool: reusing %d cached models from %s", len(files), folder)
            return ModelPool([_load_state(f) for f in files], key, True, 0.0)
    t0 = time.perf_counter()
    states = []
    for i in progress_bar(range(config.pool_size), desc="model pool", disable=not show_progress):
        gen = torch.Generator().manual_seed(int(config.seed) * 7919 + 1000 * i + 17)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(gen.initial_seed()))
            model = build_model(config, num_classes, norm).to(x.device)
        train_classifier(model, x, y, config.pool_epochs, config.pool_lr, config.pool_batch, aug, stains, gen)
        states.append({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    seconds = time.perf_counter() - t0
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for f, st in zip(files, states):
            _save_state(f, st)
        atomic_write_json(folder / "pool.json", {"key": key, "pool_size": config.pool_size, "seconds": seconds,
                                                 "config": {k: getattr(config, k) for k in POOL_FIELDS}})
    return ModelPool(states, key, False, seconds)
