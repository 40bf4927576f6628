"""Evaluation networks from torchvision (ResNet18, DenseNet121, ViT), adapted to small patches.

All are built with ``weights=None`` (no hub access); pretrained weights come only from a local
file (``weights_path=``, loaded with ``weights_only=True`` or as safetensors). Each model:

- takes (B, C, H, W) float images in [0, 1] and normalises them itself (fixed per-channel mean and
  std), so real, coreset and synthetic sets are trained identically;
- exposes ``features(x) -> (B, D)`` (pooled penultimate features) and ``feature_dim``;
- ends in a single linear ``head``.

Small patches: for ``image_size <= 64`` the ResNet/DenseNet stems use a 3x3 stride-1 convolution
and no max-pool (CIFAR-style), so a 32 px patch keeps a 4x4 map before the final pooling.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from histodd_fed.errors import ConfigError, InputError
from histodd_fed.models.registry import register_model

# Per-channel statistics used to normalise [0, 1] inputs (ImageNet's; fine for H&E as a fixed affine map).
INPUT_MEAN = (0.485, 0.456, 0.406)
INPUT_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE_MAX = 64


class PatchClassifier(nn.Module):
    """``head(backbone(normalise(x)))`` with ``features(x) = backbone(normalise(x))``."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, in_channels: int = 3,
                 arch: str = "", config: dict | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = int(feature_dim)
        self.head = nn.Linear(self.feature_dim, num_classes)
        mean = torch.tensor(INPUT_MEAN[:in_channels] if in_channels <= 3 else [0.5] * in_channels)
        std = torch.tensor(INPUT_STD[:in_channels] if in_channels <= 3 else [0.25] * in_channels)
        self.register_buffer("input_mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("input_std", std.view(1, -1, 1, 1), persistent=False)
        self.arch = arch
        self.config = dict(config or {})

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) / self.input_std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalise(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _ResNetTrunk(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return torch.flatten(n.avgpool(x), 1)


class _DenseNetTrunk(nn.Module):
    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.features(x), inplace=False)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class _ViTTrunk(nn.Module):
    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.vit
        x = v._process_input(x)
        cls = v.class_token.expand(x.shape[0], -1, -1)
        x = v.encoder(torch.cat([cls, x], dim=1))
        return x[:, 0]


def load_weights(model: nn.Module, weights_path: str | Path) -> nn.Module:
    """Load a local state dict (``.safetensors`` or a ``torch.save`` file) into ``model``.

    Accepts the wrapper's own keys, or the keys of a checkpoint saved by
    :func:`histodd_fed.training.checkpoint.save_model`. Raises :class:`InputError` naming the file on
    an unreadable file or a key/shape mismatch.
    """
    path = Path(weights_path)
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decode failure is bad input
        raise InputError(f"{path}: unreadable weights ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise InputError(f"{path}: weights do not match {type(model).__name__} "
                         f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    for k, v in state.items():
        if own[k].shape != v.shape:
            raise InputError(f"{path}: weights do not match: {k} has shape {tuple(v.shape)}, "
                             f"model expects {tuple(own[k].shape)}")
    model.load_state_dict(state)
    return model


def _finish(model: PatchClassifier, weights_path: str | Path | None) -> PatchClassifier:
    if weights_path is not None:
        load_weights(model, weights_path)
    return model


@register_model("resnet18")
def resnet18(*, num_classes: int, image_size: int, in_channels: int = 3, small_stem: bool | None = None,
             weights_path: str | Path | None = None) -> PatchClassifier:
    """torchvision ResNet18 (random init). ``small_stem`` defaults to ``image_size <= 64``."""
    from torchvision.models import resnet18 as tv_resnet18

    small = image_size <= SMALL_IMAGE_MAX if small_stem is None else bool(small_stem)
    net = tv_resnet18(weights=None)
    if small:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    cfg = {"small_stem": small}
    return _finish(PatchClassifier(_ResNetTrunk(net), 512, num_classes, in_channels, "resnet18", cfg), weights_path)


@register_model("densenet121")
def densenet121(*, num_classes: int, image_size: int, in_channels: int = 3, small_stem: bool | None = None,
                growth_rate: int = 32, block_config: tuple[int, int, int, int] | list[int] = (6, 12, 24, 16),
                num_init_features: int = 64, weights_path: str | Path | None = None) -> PatchClassifier:
    """torchvision DenseNet121 (random init); ``growth_rate``/``block_config`` shrink it for tests."""
    from torchvision.models import DenseNet

    small = image_size <= SMALL_IMAGE_MAX if small_stem is None else bool(small_stem)
    net = DenseNet(growth_rate=growth_rate, block_config=tuple(block_config), num_init_features=num_init_features)
    if small:
        net.features.conv0 = nn.Conv2d(in_channels, num_init_features, kernel_size=3, stride=1, padding=1, bias=False)
        net.features.pool0 = nn.Identity()
    elif in_channels != 3:
        net.features.conv0 = nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)
    dim = net.classifier.in_features
    cfg = {"small_stem": small, "growth_rate": growth_rate, "block_config": list(block_config)}
    return _finish(PatchClassifier(_DenseNetTrunk(net.features), dim, num_classes, in_channels, "densenet121", cfg),
                   weights_path)


VIT_VARIANTS: dict[str, dict[str, int]] = {
    # torchvision vit_b_16 widths; "small"/"tiny" follow DeiT's.
    "base": {"num_layers": 12, "num_heads": 12, "hidden_dim": 768, "mlp_dim": 3072},
    "small": {"num_layers": 12, "num_heads": 6, "hidden_dim": 384, "mlp_dim": 1536},
    "tiny": {"num_layers": 12, "num_heads": 3, "hidden_dim": 192, "mlp_dim": 768},
}


def default_vit_patch_size(image_size: int) -> int:
    """16 (vit_b_16) when it divides ``image_size`` and leaves >= 6x6 tokens, else 8, 4 or 2."""
    for p in (16, 8, 4, 2):
        if image_size % p == 0 and image_size // p >= 6:
            return p
    if image_size % 16 == 0:
        return 16
    raise ConfigError(f"vit: image size {image_size} is not divisible by 2, 4, 8 or 16")


@register_model("vit")
def vit(*, num_classes: int, image_size: int, in_channels: int = 3, variant: str = "base",
        patch_size: int | None = None, num_layers: int | None = None, num_heads: int | None = None,
        hidden_dim: int | None = None, mlp_dim: int | None = None,
        weights_path: str | Path | None = None) -> PatchClassifier:
    """torchvision VisionTransformer (``vit_b_16`` widths by default) for ``image_size`` patches."""
    from torchvision.models.vision_transformer import VisionTransformer

    if variant not in VIT_VARIANTS:
        raise ConfigError(f"vit: unknown variant {variant!r}; known: {', '.join(VIT_VARIANTS)}")
    if in_channels != 3:
        raise ConfigError("vit: only 3-channel inputs are supported")
    p = patch_size or default_vit_patch_size(image_size)
    if image_size % p:
        raise ConfigError(f"vit: patch size {p} does not divide image size {image_size}")
    cfg = dict(VIT_VARIANTS[variant])
    for k, v in (("num_layers", num_layers), ("num_heads", num_heads), ("hidden_dim", hidden_dim), ("mlp_dim", mlp_dim)):
        if v is not None:
            cfg[k] = int(v)
    if cfg["hidden_dim"] % cfg["num_heads"]:
        raise ConfigError(f"vit: hidden_dim {cfg['hidden_dim']} not divisible by num_heads {cfg['num_heads']}")
    net = VisionTransformer(image_size=image_size, patch_size=p, num_classes=num_classes, **cfg)
    net.heads = nn.Identity()
    return _finish(PatchClassifier(_ViTTrunk(net), cfg["hidden_dim"], num_classes, in_channels, "vit",
                                   {"patch_size": p, **cfg}), weights_path)
