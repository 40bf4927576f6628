"""Model registry: one constructor per model, a registry mapping names to constructors.

Constructors take ``num_classes``, ``image_size`` and ``in_channels`` (keyword) plus their own
options, and return an ``nn.Module`` mapping (B, 3, H, W) float images in [0, 1] to logits.
Models that can serve as a patch encoder expose ``features(x) -> (B, D)`` and ``feature_dim``.
"""

from __future__ import annotations

from typing import Callable

from histodd_fed.errors import ConfigError

_REGISTRY: dict[str, Callable[..., "torch.nn.Module"]] = {}  # noqa: F821


def register_model(name: str):
    """Decorator: register a model constructor under ``name``."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _load_builtin() -> None:
    # Importing the modules registers their constructors.
    from histodd_fed.models import convnet, resnetap, torchvision_models  # noqa: F401


def list_models() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def create_model(name: str, *, num_classes: int, image_size: int, in_channels: int = 3, **kwargs):
    """Build the registered model ``name``; raises ConfigError for an unknown name."""
    _load_builtin()
    try:
        ctor = _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    return ctor(num_classes=num_classes, image_size=image_size, in_channels=in_channels, **kwargs)
