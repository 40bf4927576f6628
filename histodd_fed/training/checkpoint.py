"""Saving and loading trained classifiers: ``model.safetensors`` + ``model.json`` in a directory.

The JSON records the registry name, constructor kwargs, classes and image size, so
:func:`load_model` rebuilds the same network and loads its weights (no pickle anywhere).
"""

from __future__ import annotations

import json
from pathlib import Path

from histodd_fed.atomic import atomic_directory
from histodd_fed.errors import InputError

CHECKPOINT_FORMAT = "histodd-classifier"


def save_model(model, out_dir: str | Path, *, arch: str, num_classes: int, image_size: int,
               arch_kwargs: dict | None = None, class_names: list[str] | None = None,
               extra: dict | None = None) -> Path:
    """Write ``model``'s state dict and rebuild information atomically into ``out_dir``."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {
        "format": CHECKPOINT_FORMAT,
        "format_version": 1,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "num_classes": int(num_classes),
        "image_size": int(image_size),
        "class_names": list(class_names or []),
        "extra": dict(extra or {}),
    }
    from histodd_fed.training.trainer import INPUT_TRANSFORM_ATTR

    transform = getattr(model, INPUT_TRANSFORM_ATTR, None)
    if transform is not None:   # the stain normalisation it was trained with (applied when predicting)
        header["input_transform"] = transform.to_dict()
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "model.json").write_text(json.dumps(header, indent=2, default=str) + "\n")
    return out_dir


def read_model_header(path: str | Path) -> dict:
    """The ``model.json`` of a checkpoint directory (validated)."""
    f = Path(path) / "model.json"
    if not f.is_file():
        raise InputError(f"{path}: not a classifier checkpoint (no model.json)")
    try:
        header = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{f}: unreadable ({exc})") from exc
    if header.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{f}: not a {CHECKPOINT_FORMAT} header")
    return header


def load_model(path: str | Path):
    """Rebuild and load a classifier saved by :func:`save_model` (returned in eval mode)."""
    from histodd_fed.models.registry import create_model
    from histodd_fed.models.torchvision_models import load_weights

    header = read_model_header(path)
    model = create_model(header["arch"], num_classes=header["num_classes"], image_size=header["image_size"],
                         **header.get("arch_kwargs", {}))
    load_weights(model, Path(path) / "model.safetensors")
    if header.get("input_transform"):
        from histodd_fed.training.trainer import StainInputs, set_input_transform

        set_input_transform(model, StainInputs.from_dict(header["input_transform"]))
    return model.eval()
