"""The privacy term (``privacy_step > 0``): after each image step, synthetic images closer to a real patch
than the real set's own nearest neighbours are pushed away from their nearest real patches."""

from __future__ import annotations

import logging
import math

import torch

from histodd_fed.distill.config import DistillConfig

log = logging.getLogger(__name__)


class PrivacyGuard:
    """Keeps synthetic images away from their nearest real patches (the privacy term).

    Thresholds come from the real set's own nearest-neighbour distribution, measured as the export
    gate measures it (structure correlation of low-passed grey images, normalised L2): an image
    whose correlation with a real patch is above the real-real p``corr_percentile``, or whose L2 to
    one is below the real-real p``l2_percentile``, takes a normalised gradient step away from its
    ``topk`` nearest real patches."""

    def __init__(self, vr: torch.Tensor, flat: torch.Tensor, corr_thr: float, l2_thr: float, topk: int,
                 pool: int = 2):
        self.vr, self.flat, self.pool = vr, flat, pool   # real structure vectors, real pixels flattened
        self.corr_thr, self.l2_thr, self.topk = corr_thr, l2_thr, topk

    @classmethod
    def build(cls, x_real: torch.Tensor, config: DistillConfig, reference: int = 1000) -> "PrivacyGuard":
        from histodd_fed.structure import structure_vectors

        gen = torch.Generator().manual_seed(int(config.seed) + 7919)
        q = torch.randperm(len(x_real), generator=gen)[:min(reference, len(x_real))].to(x_real.device)
        vr = structure_vectors(x_real, 2).float()
        corr = vr[q] @ vr.T
        corr[torch.arange(len(q)), q] = -2.0
        flat = x_real.flatten(1)
        d = torch.cdist(flat[q], flat) / math.sqrt(flat.shape[1])
        d[torch.arange(len(q)), q] = float("inf")
        dup = d == 0            # exact copies of a patch are not its neighbours (as in the audit)
        d[dup], corr[dup] = float("inf"), -2.0
        corr_thr = float(torch.quantile(corr.max(1).values, config.privacy_corr_percentile / 100))
        l2_thr = float(torch.quantile(d.min(1).values, config.privacy_l2_percentile / 100))
        log.info("privacy term: push below structure corr %.3f (real-real p%g) and above L2 %.4f (p%g)",
                 corr_thr, config.privacy_corr_percentile, l2_thr, config.privacy_l2_percentile)
        return cls(vr, flat, corr_thr, l2_thr, config.privacy_topk)

    def violations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(max structure correlation, min normalised L2) of each image to the real patches."""
        from histodd_fed.structure import structure_vectors

        with torch.no_grad():
            corr = (structure_vectors(x, self.pool).float() @ self.vr.T).max(1).values
            l2 = (torch.cdist(x.flatten(1), self.flat) / math.sqrt(self.flat.shape[1])).min(1).values
        return corr, l2

    def push(self, x_syn: torch.Tensor, step: float) -> int:
        """One step away from the nearest real patches for every image too close; returns how many moved."""
        from histodd_fed.structure import structure_vectors

        corr, l2 = self.violations(x_syn.detach())
        bad = torch.nonzero((corr > self.corr_thr) | (l2 < self.l2_thr)).flatten()
        if len(bad) == 0:
            return 0
        x = x_syn.detach()[bad].clone().requires_grad_(True)
        c = structure_vectors(x, self.pool).float() @ self.vr.T                       # (b, N)
        d = torch.cdist(x.flatten(1), self.flat) / math.sqrt(self.flat.shape[1])     # (b, N)
        k = min(self.topk, c.shape[1])
        pen = (c.topk(k, dim=1).values - self.corr_thr).clamp_min(0).sum() \
            + (self.l2_thr - d.topk(k, dim=1, largest=False).values).clamp_min(0).sum()
        if float(pen.detach()) <= 0:
            return 0
        g = torch.autograd.grad(pen, x)[0]
        rms = g.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12).view(-1, 1, 1, 1)
        with torch.no_grad():
            x_syn[bad] = (x_syn[bad] - step * g / rms).clamp(0.0, 1.0)
        return int(len(bad))
