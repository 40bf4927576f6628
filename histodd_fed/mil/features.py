"""Patch encoder for MIL: a patch model's ``features()`` run batched, in eval mode, without grad.

The default encoder is the centre's own patch classifier trunk (e.g. the ResNet18 it trained on its
real patches). :func:`load_encoder` accepts a model object, a saved model directory, or a local
weights file (``.safetensors`` / ``torch.save`` state dict loaded with ``weights_only=True``) for a
registered architecture; nothing is ever downloaded.

Per-slide features are cached on disk as safetensors under
``cache_dir / <encoder hash[:16]>-<patch-set hash[:16]> / <slide id>.safetensors``; the header
records both full hashes and the slide id, and a cached file is reused only when all three match.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from histodd_fed.atomic import atomic_write_bytes
from histodd_fed.errors import InputError

log = logging.getLogger(__name__)

def module_fingerprint(model: nn.Module) -> str:
    """SHA-256 (hex) of a module's class name and every state-dict tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()


def patchset_fingerprint(ps) -> str:
    """SHA-256 (hex) of a patch set's images, labels, slide index and slide table."""
    h = hashlib.sha256()
    h.update(str(ps.images.shape).encode())
    h.update(np.ascontiguousarray(ps.images).data)
    h.update(np.ascontiguousarray(ps.labels).data)
    h.update(np.ascontiguousarray(ps.slide_index).data)
    h.update(json.dumps([list(ps.slide_ids), sorted(ps.slide_labels.items())]).encode())
    return h.hexdigest()


class PatchEncoder:
    """Wrap a model with ``features(x) -> (B, D)`` as a batched, no-grad, eval-mode patch encoder.

    ``input_size`` resizes patches (bilinear, antialiased) to the size the encoder was trained at,
    so real tiles and distilled patches of another size share one feature space.

    ``calls`` counts forward batches and ``images_encoded`` the patches encoded, so callers (and
    tests) can see whether the cache was used.
    """

    def __init__(self, model: nn.Module, *, batch_size: int = 128, device: str | torch.device = "cpu",
                 name: str | None = None, input_size: int | None = None):
        if not hasattr(model, "features") or not callable(model.features):
            raise InputError(f"{type(model).__name__}: a patch encoder needs a features(x) method")
        self.model = model.to(device)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.name = name or type(model).__name__
        self.calls = 0
        self.images_encoded = 0
        self.input_size = input_size
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        """Hash of the wrapped model's weights (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = module_fingerprint(self.model)
            if self.input_size:
                self._fingerprint = hashlib.sha256(f"{self._fingerprint}:{self.input_size}".encode()).hexdigest()
        return self._fingerprint

    @property
    def feature_dim(self) -> int | None:
        d = getattr(self.model, "feature_dim", None)
        return int(d) if d is not None else None

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) patches -> float32 (N, D) features on the CPU."""
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise InputError(f"encoder input must be uint8 (N,H,W,3), got {images.dtype} {images.shape}")
        was_training = self.model.training
        self.model.eval()
        out = []
        try:
            for s in range(0, images.shape[0], self.batch_size):
                chunk = np.ascontiguousarray(images[s:s + self.batch_size])
                x = torch.from_numpy(chunk).to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
                if self.input_size and x.shape[-1] != self.input_size:
                    x = torch.nn.functional.interpolate(x, size=(self.input_size, self.input_size),
                                                        mode="bilinear", align_corners=False, antialias=True)
                out.append(self.model.features(x).float().flatten(1).cpu())
                self.calls += 1
                self.images_encoded += chunk.shape[0]
        finally:
            self.model.train(was_training)
        if not out:
            d = self.feature_dim or 0
            return torch.zeros(0, d)
        return torch.cat(out)


def _safe_name(slide_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", slide_id)
    if safe != slide_id:  # keep distinct ids distinct after sanitising
        safe += "-" + hashlib.sha256(slide_id.encode()).hexdigest()[:8]
    return safe


class FeatureCache:
    """Per-slide feature files keyed by encoder hash + patch-set hash + slide id."""

    def __init__(self, root: str | Path, encoder_hash: str, patchset_hash: str):
        self.root = Path(root)
        self.encoder_hash = encoder_hash
        self.patchset_hash = patchset_hash
        self.dir = self.root / f"{encoder_hash[:16]}-{patchset_hash[:16]}"

    def path(self, slide_id: str) -> Path:
        return self.dir / f"{_safe_name(slide_id)}.safetensors"

    def get(self, slide_id: str, n_expected: int) -> torch.Tensor | None:
        """Cached (N, D) features, or None when absent, stale or unreadable (then recomputed)."""
        from safetensors import safe_open

        p = self.path(slide_id)
        if not p.is_file():
            return None
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                feats = f.get_tensor("features")
        except Exception as exc:  # noqa: BLE001 - a damaged cache entry is recomputed, not fatal
            log.warning("%s: unreadable feature cache entry (%s); recomputing", p, exc)
            return None
        if (meta.get("encoder_sha256") != self.encoder_hash or meta.get("patchset_sha256") != self.patchset_hash
                or meta.get("slide_id") != slide_id or feats.dim() != 2 or feats.shape[0] != n_expected):
            log.warning("%s: feature cache entry does not match this encoder/patch set; recomputing", p)
            return None
        return feats

    def put(self, slide_id: str, feats: torch.Tensor) -> Path:
        from safetensors.torch import save

        meta = {"encoder_sha256": self.encoder_hash, "patchset_sha256": self.patchset_hash,
                "slide_id": slide_id, "n": str(int(feats.shape[0]))}
        return atomic_write_bytes(self.path(slide_id), save({"features": feats.contiguous()}, metadata=meta))


def load_encoder(spec: "str | Path | nn.Module", *, image_size: int, num_classes: int = 2,
                 arch: str = "resnet18", batch_size: int = 128, device: str = "cpu",
                 input_size: int | None = None) -> PatchEncoder:
    """A :class:`PatchEncoder` from a model, a saved classifier directory, or a local weights file.

    - ``nn.Module``: used as is (must have ``features``).
    - directory: a classifier saved by :func:`histodd_fed.training.checkpoint.save_model`
      (``model.json`` + ``model.safetensors``); its image size becomes the encoder's input size.
    - file: a state dict for ``create_model(arch, num_classes=..., image_size=..., weights_path=file)``.
    """
    if isinstance(spec, nn.Module):
        return PatchEncoder(spec, batch_size=batch_size, device=device, input_size=input_size)
    path = Path(spec)
    if not path.exists():
        raise InputError(f"{path}: encoder model or weights file not found")
    if path.is_dir():
        from histodd_fed.training.checkpoint import load_model, read_model_header

        model = load_model(path)
        input_size = input_size or int(read_model_header(path)["image_size"])
    else:
        from histodd_fed.models.registry import create_model

        model = create_model(arch, num_classes=num_classes, image_size=image_size, weights_path=path)
    return PatchEncoder(model, batch_size=batch_size, device=device, name=str(path), input_size=input_size)


def save_patch_model(model: nn.Module, out_dir: str | Path, *, arch: str, num_classes: int, image_size: int,
                     arch_kwargs: dict | None = None, class_names: list[str] | None = None) -> Path:
    """Save a patch classifier with :func:`histodd_fed.training.checkpoint.save_model`."""
    from histodd_fed.training.checkpoint import save_model

    return save_model(model, out_dir, arch=arch, num_classes=num_classes, image_size=image_size,
                      arch_kwargs=arch_kwargs, class_names=class_names)
