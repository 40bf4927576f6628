"""ConvNet: the small distillation network of dataset condensation (DC/DSA/Histo-DD).

``depth`` blocks of conv3x3(width) -> instance norm -> ReLU -> 2x2 average pooling, then a linear
head. Instance norm is ``GroupNorm(C, C)`` with an affine transform, as in DC.
"""

from __future__ import annotations

import torch
from torch import nn

from histodd_fed.errors import ConfigError
from histodd_fed.models.registry import register_model


class ConvNet(nn.Module):
    """``depth`` x (conv3x3 -> instancenorm -> relu -> avgpool2) + linear classifier."""

    def __init__(self, num_classes: int, image_size: int, in_channels: int = 3, width: int = 128,
                 depth: int = 3, norm: str = "instance") -> None:
        super().__init__()
        if image_size < 2**depth:
            raise ConfigError(f"convnet: image_size {image_size} too small for depth {depth}")
        layers: list[nn.Module] = []
        c, s = in_channels, image_size
        for _ in range(depth):
            layers.append(nn.Conv2d(c, width, kernel_size=3, padding=1))
            if norm == "instance":
                layers.append(nn.GroupNorm(width, width, affine=True))
            elif norm == "batch":
                layers.append(nn.BatchNorm2d(width))
            elif norm != "none":
                raise ConfigError(f"convnet: unknown norm {norm!r} (instance|batch|none)")
            layers.append(nn.ReLU(inplace=True))
            layers.append(nn.AvgPool2d(2))
            c, s = width, s // 2
        self.body = nn.Sequential(*layers)
        self.feature_dim = width * s * s
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, feature_dim) flattened feature map."""
        return self.body(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("convnet")
def convnet(*, num_classes: int, image_size: int, in_channels: int = 3, width: int = 128, depth: int = 3,
            norm: str = "instance") -> ConvNet:
    """DC-style ConvNet (default depth 3, width 128, instance norm)."""
    return ConvNet(num_classes, image_size, in_channels, width=width, depth=depth, norm=norm)
