"""Drift from the start: how far every synthetic image has moved from the image it started from, recorded
at every checkpoint of a distillation (outer step 0, every ``checkpoint_every`` steps, the last step).

Per image and record: RMS change and mean absolute change of the [0, 1] pixels, SSIM (the privacy
code's gaussian-window SSIM, ``histodd_fed.image_similarity``, a leaf module) and the structure
correlation of the low-passed grey images (:func:`histodd_fed.structure.structure_vectors`, pool 2 as the
export gate) to the starting image. When the images start from several real patches each (``init:
mixture`` / ``mosaic``) the same three numbers are also recorded against the real patches an image was
mixed from (per image: the closest source by each measure).

What goes where: the set's meta gets :meth:`DriftRecorder.summary` (per record the mean over images, and
nothing per image: it travels in a bundle's manifest); the per-image numbers - to the start and to the
real source patches - are only in :meth:`DriftRecorder.local`, which ``centre-node distill`` writes to
``OUT/drift.json`` on the centre's disk and nothing exports.
"""

from __future__ import annotations

import numpy as np
import torch

from histodd_fed.structure import structure_vectors

#: low-pass factor of the structure correlation (as the export gate's ``structure_pool``)
STRUCTURE_POOL = 2
MEASURES = ("rms", "abs_mean", "ssim", "structure")


def _ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from histodd_fed.image_similarity import ssim

    return ssim(a, b)


@torch.no_grad()
def pair_drift(now: torch.Tensor, start: torch.Tensor, pool: int = STRUCTURE_POOL) -> dict[str, np.ndarray]:
    """Per pair ``(now[i], start[i])`` of (N, C, H, W) images in [0, 1]: RMS and mean absolute change,
    SSIM and structure correlation, as float arrays of length N."""
    now, start = now.detach().float().cpu(), start.detach().float().cpu()
    d = (now - start).flatten(1)
    corr = (structure_vectors(now, pool) * structure_vectors(start, pool)).sum(1)
    return {"rms": d.pow(2).mean(1).sqrt().numpy(), "abs_mean": d.abs().mean(1).numpy(),
            "ssim": _ssim(now, start).numpy(), "structure": corr.float().numpy()}


def _r(a) -> list[float]:
    return [round(float(v), 5) for v in np.asarray(a).ravel()]


class DriftRecorder:
    """Collects drift records of one run (see the module doc); its state goes into the checkpoints."""

    def __init__(self, initial: torch.Tensor, sources: np.ndarray | None = None,
                 real: torch.Tensor | None = None, init: str = "real") -> None:
        self.initial = initial.detach().float().cpu()
        self.init = init
        #: (N, k) indices into ``real`` of the patches each image was mixed from (None: no mixture)
        self.sources = None if sources is None or real is None else np.asarray(sources, dtype=np.int64)
        self.real = None if self.sources is None else real
        self.records: list[dict] = []

    # ------------------------------------------------------------------ recording
    def record(self, step: int, images: torch.Tensor) -> None:
        """Record drift of ``images`` (the stored synthetic images, same order as the start) at ``step``."""
        if self.records and self.records[-1]["step"] == step:
            return
        now = images.detach().float().cpu().clamp(0, 1)
        rec = {"step": int(step), **{k: _r(v) for k, v in pair_drift(now, self.initial).items()}}
        if self.sources is not None:
            rec["to_real"] = self._to_sources(now)
        self.records.append(rec)

    @torch.no_grad()
    def _to_sources(self, now: torch.Tensor) -> dict[str, list[float]]:
        """Per image, the closest of its source patches by each measure (min RMS, max SSIM / structure)."""
        n, k = self.sources.shape
        src = self.real[torch.from_numpy(self.sources.reshape(-1)).to(self.real.device)].detach().float().cpu()
        rep = now.repeat_interleave(k, dim=0)
        d = pair_drift(rep, src)
        return {"rms": _r(d["rms"].reshape(n, k).min(1)), "abs_mean": _r(d["abs_mean"].reshape(n, k).min(1)),
                "ssim": _r(d["ssim"].reshape(n, k).max(1)), "structure": _r(d["structure"].reshape(n, k).max(1))}

    # ------------------------------------------------------------------ state (checkpoints)
    def state(self) -> list[dict]:
        return list(self.records)

    def restore(self, records: list[dict] | None) -> None:
        self.records = list(records or [])

    # ------------------------------------------------------------------ outputs
    def summary(self) -> dict:
        """The set's ``meta["drift"]``: per record, the mean over images of each measure (nothing per image)."""
        out = {"reference": "each image's starting image", "structure_pool": STRUCTURE_POOL,
               "n_images": int(self.initial.shape[0]), "steps": [r["step"] for r in self.records]}
        for m in MEASURES:
            out[f"{m}_mean"] = [round(float(np.mean(r[m])), 5) if len(r[m]) else None for r in self.records]
        return out

    def local(self) -> dict:
        """Everything per image (to the start, and to the real source patches of a mixture): for the
        centre's own disk only (``OUT/drift.json``), never the set's meta."""
        out = {"note": "per-image drift of a synthetic set: LOCAL ONLY (names real patches an image started from); "
                       "never part of the set's meta or of a bundle",
               "init": self.init, "structure_pool": STRUCTURE_POOL, "steps": [r["step"] for r in self.records],
               "to_start": {m: [r[m] for r in self.records] for m in MEASURES}}
        if self.sources is not None:
            out["to_real"] = {"source_indices": self.sources.tolist(),
                              "closest_source": {m: [r["to_real"][m] for r in self.records] for m in MEASURES}}
            out["to_real_summary"] = {f"{m}_mean": [round(float(np.mean(r["to_real"][m])), 5) for r in self.records]
                                      for m in MEASURES}
        elif self.init in ("real", "herding"):
            out["to_real"] = "the starting image is a real patch (meta init_source_indices): to_start is the drift to it"
        return out
