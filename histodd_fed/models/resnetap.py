"""ResNetAP-10: ResNet-10 with average-pooling downsampling and instance norm (IDC / Histo-DD).

BasicBlocks [1, 1, 1, 1]; every stride-2 convolution of a plain ResNet is a stride-1 convolution
followed by 2x2 average pooling (also on the shortcut). Normalisation is instance norm
(``GroupNorm(C, C)``, affine). The stem depends on the input size: a 3x3 stride-1 convolution
without pooling for images up to 64 px, plus one 2x2 average pooling for larger images (so a 96 px
patch enters the residual stages at 48 px).
"""

from __future__ import annotations

import torch
from torch import nn

from histodd_fed.models.registry import register_model


def _norm(c: int) -> nn.Module:
    return nn.GroupNorm(c, c, affine=True)


class BasicBlockAP(nn.Module):
    """Two 3x3 convolutions; downsampling (if any) by 2x2 average pooling after the first."""

    def __init__(self, cin: int, cout: int, downsample: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.AvgPool2d(2) if downsample else nn.Identity()
        self.bn1 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = _norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if downsample or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, bias=False),
                nn.AvgPool2d(2) if downsample else nn.Identity(),
                _norm(cout),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.pool(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNetAP(nn.Module):
    """ResNetAP with ``blocks`` BasicBlocks per stage and widths ``width * (1, 2, 4, 8)``."""

    def __init__(self, num_classes: int, image_size: int, in_channels: int = 3, width: int = 64,
                 blocks: tuple[int, ...] = (1, 1, 1, 1)) -> None:
        super().__init__()
        stem: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), _norm(width),
                                 nn.ReLU(inplace=True)]
        if image_size > 64:
            stem.append(nn.AvgPool2d(2))
        self.stem = nn.Sequential(*stem)
        stages: list[nn.Module] = []
        cin = width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for b in range(n):
                stages.append(BasicBlockAP(cin, cout, downsample=(i > 0 and b == 0)))
                cin = cout
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin
        self.classifier = nn.Linear(cin, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, feature_dim) globally pooled features."""
        return self.pool(self.layers(self.stem(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("resnetap10")
def resnetap10(*, num_classes: int, image_size: int, in_channels: int = 3, width: int = 64) -> ResNetAP:
    """ResNetAP-10 (BasicBlocks [1, 1, 1, 1], average-pool downsampling, instance norm)."""
    return ResNetAP(num_classes, image_size, in_channels, width=width, blocks=(1, 1, 1, 1))
