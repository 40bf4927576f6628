"""Membership inference against a classifier trained on the synthetic set.

Threat model: the target centre (or anyone holding the bundle) trains the evaluation classifier on
the synthetic patches and can query it. The attacker holds candidate real patches and wants to
tell *members* (patches of the source centre's training store, from which the set was distilled)
from *non-members* (held-out real patches from the same distribution). Two threshold attacks:

- ``loss``:       score = -cross-entropy of the true label (members should have lower loss);
- ``confidence``: score = the model's top softmax probability (label-free).

Each yields a ROC curve (written here from its definition), its AUC (0.5 = no better than
chance) and the TPR at 1% and 0.1% FPR (the low-FPR regime that matters for individual records;
the resolution is limited by the number of non-members, reported alongside). Members are
subsampled to the number of non-members (seeded) so the two classes are balanced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from histodd_fed.patchset import PatchSet
from histodd_fed.privacy.classifier import TrainSpec, per_sample_outputs, train_model

ATTACKS = ("loss", "confidence")


@dataclass
class MembershipConfig:
    """Settings of the membership-inference audit."""

    enabled: bool = True
    target: TrainSpec = field(default_factory=lambda: TrainSpec(
        model="convnet", model_kwargs={"width": 64}, epochs=150, lr=0.01, batch_size=256,
        augmentation="color_crop_cutout_flip_scale_rotate"))
    max_per_side: int = 1000
    fprs: tuple[float, ...] = (0.01, 0.001)


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the rule ``score >= threshold``, from (0,0) to (1,1).

    One point per distinct score, thresholds in decreasing order; ties move TPR and FPR together.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(positive, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"roc_curve: scores {s.shape} and labels {y.shape} differ")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_curve: need both positives and negatives")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    tps = np.cumsum(y)
    fps = np.cumsum(~y)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # last index of each distinct score
    tpr = np.r_[0.0, tps[last] / n_pos]
    fpr = np.r_[0.0, fps[last] / n_neg]
    thr = np.r_[np.inf, s[last]]
    return fpr, tpr, thr


def auc_from_roc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve by the trapezoid rule (ties count one half)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
    """The highest TPR among ROC points with FPR <= ``max_fpr``."""
    ok = fpr <= max_fpr + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


@dataclass
class AttackResult:
    """One threshold attack's ROC and its headline numbers."""

    name: str
    auc: float
    tpr_at_fpr: dict[str, float]
    fpr: np.ndarray
    tpr: np.ndarray

    def summary(self) -> dict[str, Any]:
        return {"auc": self.auc, **{f"tpr_at_fpr_{k}": v for k, v in self.tpr_at_fpr.items()}}


@dataclass
class MembershipResult:
    """Attacks on one target model, with the target's accuracy on members and non-members."""

    attacks: dict[str, AttackResult]
    n_members: int
    n_nonmembers: int
    member_accuracy: float
    nonmember_accuracy: float
    target: str = ""

    @property
    def max_auc(self) -> float:
        return max(a.auc for a in self.attacks.values())

    def summary(self) -> dict[str, Any]:
        return {"n_members": self.n_members, "n_nonmembers": self.n_nonmembers,
                "fpr_resolution": 1.0 / max(1, self.n_nonmembers), "target": self.target,
                "member_accuracy": self.member_accuracy, "nonmember_accuracy": self.nonmember_accuracy,
                "max_auc": self.max_auc, **{n: a.summary() for n, a in self.attacks.items()}}


def _fmt_fpr(f: float) -> str:
    return f"{f * 100:g}%"


def attack_model(model: nn.Module, members: PatchSet, nonmembers: PatchSet,
                 fprs: tuple[float, ...] = (0.01, 0.001), target: str = "") -> MembershipResult:
    """Run the loss and confidence threshold attacks on ``model``."""
    if len(members) == 0 or len(nonmembers) == 0:
        raise ValueError("membership attack needs at least one member and one non-member")
    xm, ym = members.to_tensors()
    xn, yn = nonmembers.to_tensors()
    om = per_sample_outputs(model, xm, ym)
    on = per_sample_outputs(model, xn, yn)
    is_member = np.r_[np.ones(len(xm), bool), np.zeros(len(xn), bool)]
    scores = {"loss": -np.r_[om["loss"], on["loss"]], "confidence": np.r_[om["p_max"], on["p_max"]]}
    attacks = {}
    for name in ATTACKS:
        fpr, tpr, _ = roc_curve(scores[name], is_member)
        attacks[name] = AttackResult(name, auc_from_roc(fpr, tpr),
                                     {_fmt_fpr(f): tpr_at_fpr(fpr, tpr, f) for f in fprs}, fpr, tpr)
    with torch.no_grad():
        acc = lambda x, y: float((torch.cat([model(x[s:s + 256]).argmax(1) for s in range(0, len(x), 256)]) == y)  # noqa: E731
                                 .float().mean())
        acc_m, acc_n = acc(xm, ym), acc(xn, yn)
    return MembershipResult(attacks, len(xm), len(xn), acc_m, acc_n, target)


def balanced_members(members: PatchSet, nonmembers: PatchSet, max_per_side: int,
                     seed: int) -> tuple[PatchSet, PatchSet]:
    """Seeded subsamples with equal counts (at most ``max_per_side`` each)."""
    rng = np.random.default_rng(seed)
    n = min(len(members), len(nonmembers), max_per_side)
    mi = np.sort(rng.choice(len(members), n, replace=False))
    ni = np.sort(rng.choice(len(nonmembers), n, replace=False))
    return members.subset(mi), nonmembers.subset(ni)


def membership_audit(synthetic: PatchSet, members: PatchSet, nonmembers: PatchSet,
                     config: MembershipConfig | None = None, *, seed: int = 0) -> MembershipResult:
    """Train the evaluation classifier on ``synthetic``; attack members vs non-members."""
    cfg = config or MembershipConfig()
    model = train_model(cfg.target, synthetic, seed=seed, desc="target model")
    m, n = balanced_members(members, nonmembers, cfg.max_per_side, seed)
    return attack_model(model, m, n, cfg.fprs,
                        target=f"{cfg.target.model} trained {cfg.target.epochs} epochs on {len(synthetic)} {synthetic.kind} patches")
