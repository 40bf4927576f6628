"""MIL head registry: names -> constructors ``ctor(*, in_dim, num_classes, **kw) -> nn.Module``.

Every head maps one bag ``(N, D)`` of instance features to a dict with ``logits`` (1, C) and
``attention`` ((N,) or (C, N), each row summing to one) and has ``loss(out, label) -> Tensor``
that adds its own auxiliary terms (CLAM's instance clustering, DSMIL's max-instance stream).
"""

from __future__ import annotations

from typing import Callable

from histodd_fed.errors import ConfigError

_REGISTRY: dict[str, Callable[..., "torch.nn.Module"]] = {}  # noqa: F821
_ALIASES = {"clam_sb": "clam", "clam-sb": "clam", "ab-mil": "abmil", "trans-mil": "transmil", "ds-mil": "dsmil"}


def register_mil(name: str):
    """Decorator: register a MIL head constructor under ``name``."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"MIL model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _load_builtin() -> None:
    from histodd_fed.mil import abmil, clam, dsmil, transmil  # noqa: F401


def list_mil() -> list[str]:
    """Names of the registered MIL heads."""
    _load_builtin()
    return sorted(_REGISTRY)


def canonical_name(name: str) -> str:
    """``name`` lower-cased with aliases resolved (``clam_sb`` -> ``clam``)."""
    n = name.strip().lower()
    return _ALIASES.get(n, n)


def create_mil(name: str, *, in_dim: int, num_classes: int = 2, **kwargs):
    """Build MIL head ``name``; the module remembers its constructor args in ``mil_config``."""
    _load_builtin()
    key = canonical_name(name)
    try:
        ctor = _REGISTRY[key]
    except KeyError:
        raise ConfigError(f"unknown MIL model {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None
    model = ctor(in_dim=int(in_dim), num_classes=int(num_classes), **kwargs)
    model.mil_config = {"arch": key, "in_dim": int(in_dim), "num_classes": int(num_classes), **kwargs}
    return model


def as_bag(x):
    """Accept a bag as (N, D) or (1, N, D); return (N, D). Raise ValueError on an empty bag."""
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2:
        raise ValueError(f"a bag must be (N, D) instance features, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("empty bag (N = 0)")
    return x
