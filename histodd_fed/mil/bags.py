"""Bags: one per slide, the features of all the slide's patches, labelled with the slide label.

For a real (tiled) store a bag holds every tissue patch of the slide; for a synthetic per-slide
set it holds the slide's synthetic patches. The label comes from ``PatchSet.slide_labels``.
``nbytes`` is the storage of the bag's patches (uint8 images), the "storage" column of the study.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from histodd_fed.errors import InputError
from histodd_fed.logging_setup import progress as progress_bar
from histodd_fed.mil.features import FeatureCache, PatchEncoder, patchset_fingerprint

log = logging.getLogger(__name__)


@dataclass
class Bag:
    """One slide's instances: ``features`` (N, D) float32, slide-level ``label``."""

    slide_id: str
    label: int
    features: torch.Tensor
    n_patches: int
    nbytes: int = 0

    def __post_init__(self) -> None:
        if self.features.dim() != 2 or self.features.shape[0] != self.n_patches:
            raise InputError(f"bag {self.slide_id}: features {tuple(self.features.shape)} do not match "
                             f"{self.n_patches} patches")

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def slide_rows(ps) -> dict[str, np.ndarray]:
    """Row indices of each slide that has at least one patch, in slide-table order."""
    out: dict[str, np.ndarray] = {}
    order = np.argsort(ps.slide_index, kind="stable")
    si = ps.slide_index[order]
    for j, sid in enumerate(ps.slide_ids):
        lo, hi = np.searchsorted(si, j, "left"), np.searchsorted(si, j, "right")
        if hi > lo:
            out[sid] = order[lo:hi]
    return out


def bags_from_patchset(ps, encoder: PatchEncoder, cache_dir: str | Path | None = None, *,
                       slides: list[str] | None = None, progress: bool = True) -> list[Bag]:
    """One :class:`Bag` per slide of ``ps`` (or of ``slides``), features from ``encoder``.

    With ``cache_dir`` the features of each slide are read from / written to the on-disk cache
    (keyed by encoder hash, patch-set hash and slide id), so a second call does not run the encoder.
    Raises :class:`InputError` when the patch set has no slides or a slide lacks a slide label.
    """
    if not ps.slide_ids or (ps.slide_index < 0).all():
        raise InputError("patch set has no slide table (slide_ids / slide_index): cannot build MIL bags")
    rows = slide_rows(ps)
    wanted = list(rows) if slides is None else list(slides)
    missing_label = [s for s in wanted if s not in ps.slide_labels]
    if missing_label:
        raise InputError(f"patch set: no slide label for {missing_label[:3]}"
                         f"{'...' if len(missing_label) > 3 else ''} (slide_labels is needed for MIL)")
    cache = None
    if cache_dir is not None:
        cache = FeatureCache(cache_dir, encoder.fingerprint, patchset_fingerprint(ps))
    bags: list[Bag] = []
    it = progress_bar(wanted, desc="bags", leave=False) if progress else wanted
    for sid in it:
        idx = rows.get(sid)
        if idx is None:
            log.warning("slide %s has no patches; no bag", sid)
            continue
        feats = cache.get(sid, len(idx)) if cache is not None else None
        if feats is None:
            feats = encoder.encode(ps.images[np.sort(idx)])
            if cache is not None:
                cache.put(sid, feats)
        bags.append(Bag(slide_id=sid, label=int(ps.slide_labels[sid]), features=feats, n_patches=len(idx),
                        nbytes=int(len(idx) * int(np.prod(ps.images.shape[1:])))))
    return bags


def bags_nbytes(bags: list[Bag]) -> int:
    """Total storage of the bags' patches (uint8 images), in bytes."""
    return int(sum(b.nbytes for b in bags))


def save_bags(bags: list[Bag], out_dir: str | Path) -> Path:
    """Write bags as one safetensors file per slide plus ``bags.json`` (atomic directory)."""
    import json

    from safetensors.torch import save

    from histodd_fed.atomic import atomic_directory

    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        index = []
        for i, b in enumerate(bags):
            fname = f"bag_{i:05d}.safetensors"
            (tmp / fname).write_bytes(save({"features": b.features.contiguous()}))
            index.append({"file": fname, "slide_id": b.slide_id, "label": b.label, "n_patches": b.n_patches,
                          "nbytes": b.nbytes})
        (tmp / "bags.json").write_text(json.dumps({"format": "histodd-mil-bags", "bags": index}, indent=2) + "\n")
    return out_dir


def load_bags(path: str | Path) -> list[Bag]:
    """Read bags written by :func:`save_bags`."""
    import json

    from safetensors.torch import load_file

    path = Path(path)
    try:
        header = json.loads((path / "bags.json").read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path / 'bags.json'}: unreadable bag index ({exc})") from exc
    if header.get("format") != "histodd-mil-bags":
        raise InputError(f"{path / 'bags.json'}: not a histodd MIL bag index")
    bags = []
    for e in header["bags"]:
        try:
            feats = load_file(str(path / e["file"]))["features"]
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{path / e['file']}: unreadable bag features ({exc})") from exc
        bags.append(Bag(slide_id=e["slide_id"], label=int(e["label"]), features=feats,
                        n_patches=int(e["n_patches"]), nbytes=int(e.get("nbytes", 0))))
    return bags
