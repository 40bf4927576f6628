"""Device choice for training and evaluation."""

from __future__ import annotations

from histodd_fed.errors import ConfigError


def resolve_device(device: str = "auto"):
    """``"auto"`` -> CUDA when available, else CPU; otherwise the named torch device."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return dev
