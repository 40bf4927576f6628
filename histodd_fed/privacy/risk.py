"""The export gate's rules: when is a synthetic set too close to its source, or too leaky?

A set is flagged (one finding per rule that fires) when

1. ``ssim_block``: some synthetic patch has SSIM >= this with a real patch (default 0.95: a
   near pixel copy; SSIM of distinct PCam patches at 32 px is below 0.95 for ~98% of patches);
2. ``l2_block_percentile``: some synthetic patch's normalised-L2 distance to its nearest real
   patch is below this percentile of the real-real nearest-neighbour distances (default 1.0:
   closer than 99% of the centre's own patches are to each other), and that real patch stands out:
   with ``l2_unique_ratio`` (default 0.5) the squared distance is at most half the squared distance
   to the 8th-nearest distinct real patch (``uniqueness_rank`` of the memorisation config). A bland
   image (background, fat) is about as close to dozens of blank real patches as to its nearest one,
   and singles none of them out; an exact or near copy of one patch stands far closer to it than to
   the 8th. The same "stands out from chance" reading as the copy detector's uniqueness rule;
3. ``structure_block_percentile``: some synthetic patch's structure correlation (low-passed grey
   images, :func:`histodd_fed.structure.structure_vectors`) with its nearest
   real patch is higher than all but this percentage of the real-real nearest-neighbour
   correlations (default 1.0: above the real-real 99th percentile). Catches a real patch with
   added noise or a colour shift (measured on the demo's C1 patches, 20 real patches + gaussian
   noise: sigma 0.15 passed rules 1-2 but 18/20 patches fire this rule);
4. ``auc_block``: the best membership-inference attack reaches an ROC AUC above this (default
   0.6), when the attack ran (it needs held-out real patches).

Any rule can be disabled with ``null``. ``require_audit`` makes the gate block a set it cannot
audit (no real patches found). Findings are one-line strings naming the closest pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from histodd_fed.privacy.membership import MembershipResult
from histodd_fed.privacy.memorisation import MemorisationResult


@dataclass
class GateThresholds:
    """Limits beyond which the export gate blocks (``None`` disables a rule)."""

    ssim_block: float | None = 0.95
    l2_block_percentile: float | None = 1.0
    #: ... and its nearest real patch stands out: the squared distance is <= this x the squared distance to
    #: the ``uniqueness_rank``-th nearest distinct real patch (None: any patch below the percentile)
    l2_unique_ratio: float | None = 0.5
    structure_block_percentile: float | None = 1.0
    auc_block: float | None = 0.6
    require_audit: bool = False  #: block exports whose real patches cannot be found

    def __post_init__(self) -> None:
        if self.l2_unique_ratio is not None and not 0 < float(self.l2_unique_ratio) <= 1:
            from histodd_fed.errors import ConfigError

            raise ConfigError(f"gate.l2_unique_ratio must be in (0, 1] or null, got {self.l2_unique_ratio}")


def find_risks(mem: MemorisationResult, mia: MembershipResult | None, thresholds: GateThresholds) -> list[str]:
    """One message per rule that fires; an empty list means the set passes."""
    out: list[str] = []
    ssim = mem.metrics.get("ssim")
    if thresholds.ssim_block is not None and ssim is not None:
        i = ssim.closest()
        v = float(ssim.synthetic_nn[i])
        if v >= thresholds.ssim_block:
            n = int((ssim.synthetic_nn >= thresholds.ssim_block).sum())
            out.append(f"synthetic patch {i} is a near copy of real patch {int(ssim.synthetic_nn_index[i])} "
                       f"(SSIM {v:.3f} >= threshold {thresholds.ssim_block}; {n}/{mem.n_synthetic} patches at or above it)")
    l2 = mem.metrics.get("l2")
    if thresholds.l2_block_percentile is not None and l2 is not None:
        thr = l2.reference_threshold(thresholds.l2_block_percentile)
        d1 = np.asarray(l2.synthetic_nn, dtype=np.float64)
        below = d1 < thr
        singles = below.copy()
        kth = l2.synthetic_kth
        if thresholds.l2_unique_ratio is not None and kth is not None:
            singles &= d1 ** 2 <= thresholds.l2_unique_ratio * np.asarray(kth, dtype=np.float64) ** 2
        if singles.any():
            i = int(np.flatnonzero(singles)[np.argmin(d1[singles])])
            k = "" if kth is None else f", {float(kth[i]):.4f} to its {l2.kth_rank}th-nearest distinct real patch"
            out.append(f"synthetic patch {i} is closer to real patch {int(l2.synthetic_nn_index[i])} than "
                       f"{100 - thresholds.l2_block_percentile:g}% of real patches are to each other "
                       f"(normalised L2 {d1[i]:.4f} < real-real p{thresholds.l2_block_percentile:g} {thr:.4f}{k}; "
                       f"{int(singles.sum())}/{mem.n_synthetic} patches so close)")
    st = mem.metrics.get("structure")
    if thresholds.structure_block_percentile is not None and st is not None:
        thr = st.reference_threshold(thresholds.structure_block_percentile)
        i = st.closest()
        v = float(st.synthetic_nn[i])
        if v > thr:
            n = int((st.synthetic_nn > thr).sum())
            out.append(f"synthetic patch {i} keeps the layout of real patch {int(st.synthetic_nn_index[i])} "
                       f"(structure correlation {v:.3f} > real-real p{100 - thresholds.structure_block_percentile:g} "
                       f"{thr:.3f}; {n}/{mem.n_synthetic} patches above it)")
    if thresholds.auc_block is not None and mia is not None:
        name, att = max(mia.attacks.items(), key=lambda kv: kv[1].auc)
        if att.auc > thresholds.auc_block:
            out.append(f"membership inference ({name} attack) reaches ROC AUC {att.auc:.3f} > limit {thresholds.auc_block}")
    return out
