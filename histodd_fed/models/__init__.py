"""Networks: distillation networks (ConvNet, ResNetAP-10) and evaluation networks (torchvision)."""

from histodd_fed.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
