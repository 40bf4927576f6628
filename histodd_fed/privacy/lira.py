"""LiRA: the likelihood-ratio membership-inference attack (Carlini et al., S&P 2022), online variant.

Threat model (as :mod:`histodd_fed.privacy.membership`): whoever holds the released set trains the
evaluation classifier on it and queries it. The attacker also knows the *recipe* that made the set
(distillation config or coreset method) and has a pool of real patches, some of which were in the
centre's store (members) and some not (non-members). LiRA asks, for every pool patch ``x``: does the
target model's confidence on ``x`` look like that of models whose released set was made *with*
``x``, or like that of models whose set was made *without* it?

1. Pool = members + non-members. ``shadows`` shadow runs each apply the recipe (``make_set``: real
   patches, seed -> released set) to a random half of the pool; the halves are balanced so every
   pool patch is IN for exactly ``shadows // 2`` runs and OUT for the rest (the paper's design).
2. A fresh evaluation classifier (``train_spec``) is trained on every shadow set and on the target set.
3. Each model scores every pool patch by the logit-scaled confidence on its true label,
   ``phi = log(p / (1 - p)) = z_y - logsumexp_{j != y} z_j``, under a few deterministic
   augmentations (identity, flips, 180-degree rotation).
4. Per patch and augmentation, Gaussians are fitted to the IN and OUT shadow values of ``phi``; the
   score of the target is the Gaussian log-likelihood ratio ``log N(phi_t; mu_in, s_in) -
   log N(phi_t; mu_out, s_out)``, averaged over the augmentations (as the paper's reference code).
   With fewer than ``global_variance_below`` (64) shadows the paper recommends a *global* variance;
   here that is the pooled within-patch variance (the spread of every IN value around its own
   patch's IN mean; likewise OUT), one per augmentation.

5. The same likelihood ratio on a second observable, the released set's own images: ``phi`` = minus the
   log squared distance from the pool patch to the nearest released image (:func:`set_proximity`). The
   recipient holds those images; for sets of 20 a trained model's confidence barely separates its own
   training images from look-alike patches (a random coreset's 20 patches: 0-2 of 20 found at 1% FPR on
   PCam), the images do.

The ROC (:func:`histodd_fed.privacy.membership.roc_curve`, from its definition), AUC and TPR at
1% / 0.1% FPR are computed on members vs non-members. Two reference numbers come along: the
*offline* variant (OUT Gaussians only: a one-sided z-test) and the *global-threshold* baseline
(the target's own ``phi``, no shadows: the loss attack). Everything is seeded; on one machine a run
is deterministic for a seed.

This module never imports the distillation (``histodd_fed.distill``): the recipe is injected as
``make_set`` (see :mod:`histodd_fed.release.recipes` for the one rebuilt from a set's meta).
"""

from __future__ import annotations

import io
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from histodd_fed.errors import InputError
from histodd_fed.formation import decode_set
from histodd_fed.patchset import PatchSet
from histodd_fed.privacy.classifier import TrainSpec, train_model
from histodd_fed.privacy.membership import auc_from_roc, roc_curve, tpr_at_fpr

#: real patches (in the set's view), seed -> the released set
MakeSet = Callable[[PatchSet, int], PatchSet]

#: the evaluation classifier every shadow and the target train (the pcam preset's eval recipe)
DEFAULT_TRAIN_SPEC = TrainSpec(model="convnet", model_kwargs={"width": 32, "depth": 3}, epochs=200, lr=0.01,
                               batch_size=128, augmentation="flip_rotate")
#: deterministic queries: name -> transform of NCHW images
AUGMENTATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(3),
    "vflip": lambda x: x.flip(2),
    "rot180": lambda x: x.flip(2).flip(3),
}
FPRS = (0.01, 0.001)
#: below this many shadows the per-patch variances are replaced by a global one (paper, Sec. VI-A)
GLOBAL_VARIANCE_BELOW = 64


def _fpr_key(f: float) -> str:
    return f"{f:g}"


@dataclass
class LiraResult:
    """LiRA on one target set: ROC of the online attack, reference numbers, per-patch scores."""

    auc: float
    tpr_at_fpr: dict[str, float]           #: {"0.01": .., "0.001": ..}
    shadows: int
    members: int
    non_members: int
    fpr: np.ndarray
    tpr: np.ndarray
    scores: np.ndarray                     #: (P,) online LiRA score per pool patch (higher: member)
    is_member: np.ndarray                  #: (P,) bool
    target_phi: np.ndarray                 #: (P, A) the target model's phi per augmentation
    shadow_phi: np.ndarray                 #: (S, P, A) every shadow model's phi
    keep: np.ndarray                       #: (S, P) bool: patch p was in shadow s's half
    global_variance: bool
    augmentations: tuple[str, ...]
    offline: dict[str, Any]                #: OUT-only variant: auc, tpr_at_fpr, fpr, tpr
    baseline: dict[str, Any]               #: target phi alone (global threshold): auc, tpr_at_fpr, fpr, tpr
    target_accuracy: dict[str, float]      #: the target model's accuracy on members / non-members (identity)
    set_online: dict[str, Any]             #: LiRA on the released set's own images (set_proximity): online
    set_offline: dict[str, Any]            #: ... and its OUT-only variant
    shadow_sizes: list[int]                #: released-set size of each shadow
    shadow_seeds: list[int]                #: the seed each shadow's ``make_set`` got
    seconds: dict[str, float] = field(default_factory=dict)
    train_spec: dict[str, Any] = field(default_factory=dict)
    target_model: nn.Module | None = field(default=None, repr=False)
    resumed_shadows: int = 0               #: shadows read back from the checkpoint instead of re-run

    def summary(self) -> dict[str, Any]:
        """The small JSON (``audit.json``'s ``lira``): headline numbers and how they were obtained."""
        r = lambda d: {k: round(float(v), 4) for k, v in d.items()}  # noqa: E731
        return {"auc": round(self.auc, 4), "tpr_at_fpr": r(self.tpr_at_fpr), "shadows": self.shadows,
                "members": self.members, "non_members": self.non_members,
                "fpr_resolution": 1.0 / max(1, self.non_members),
                "in_per_patch": int(self.keep.sum(0).min()) if self.keep.size else 0,
                "variance": "global (pooled within-patch)" if self.global_variance else "per patch",
                "augmentations": list(self.augmentations),
                "offline": {"auc": round(self.offline["auc"], 4), "tpr_at_fpr": r(self.offline["tpr_at_fpr"])},
                "baseline_global_threshold": {"auc": round(self.baseline["auc"], 4),
                                              "tpr_at_fpr": r(self.baseline["tpr_at_fpr"])},
                "released_set": {"observable": "-log(squared distance to the nearest released image)",
                                 "auc": round(self.set_online["auc"], 4), "tpr_at_fpr": r(self.set_online["tpr_at_fpr"]),
                                 "offline": {"auc": round(self.set_offline["auc"], 4),
                                             "tpr_at_fpr": r(self.set_offline["tpr_at_fpr"])}},
                "target_accuracy": r(self.target_accuracy), "shadow_sizes": list(self.shadow_sizes),
                "shadow_seeds": list(self.shadow_seeds), "train_spec": dict(self.train_spec),
                "resumed_shadows": int(self.resumed_shadows),
                "seconds": {k: round(v, 2) for k, v in self.seconds.items()}}

    def found_among(self, rows: np.ndarray, max_fpr: float = 0.01) -> dict[str, int]:
        """How many of the members at ``rows`` (indices into ``members``, e.g. the patches a coreset holds)
        each attack variant flags at ``max_fpr`` FPR over all non-members - the sanity check that a set of
        real pool patches is caught. The model-based variants (``online``, ``offline``, ``global_threshold``)
        barely tell 20 training images from look-alike patches; the released-set variants (``set_*``) see
        the images themselves."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.members):
            raise InputError(f"lira: member rows must lie in [0, {self.members}), got {rows.min()}..{rows.max()}")
        out = {}
        for name, scores in (("online", self.scores), ("offline", self.offline["scores"]),
                             ("global_threshold", self.baseline["scores"]), ("set_online", self.set_online["scores"]),
                             ("set_offline", self.set_offline["scores"])):
            t = threshold_at_fpr(scores, self.is_member, max_fpr)
            out[name] = int((scores[:self.members][rows] >= t).sum())
        return out

    def to_dict(self, per_patch: bool = True) -> dict[str, Any]:
        """``summary()`` plus the ROC curves and (``per_patch``) every pool patch's score."""
        d = self.summary()
        d["roc"] = {"online": {"fpr": self.fpr.tolist(), "tpr": self.tpr.tolist()},
                    "offline": {"fpr": self.offline["fpr"].tolist(), "tpr": self.offline["tpr"].tolist()},
                    "baseline_global_threshold": {"fpr": self.baseline["fpr"].tolist(),
                                                  "tpr": self.baseline["tpr"].tolist()},
                    "released_set": {"fpr": self.set_online["fpr"].tolist(), "tpr": self.set_online["tpr"].tolist()}}
        if per_patch:
            d["per_patch"] = {"is_member": self.is_member.astype(int).tolist(),
                              "score": [round(float(s), 4) for s in self.scores],
                              "target_phi": [round(float(s), 4) for s in self.target_phi.mean(1)],
                              "in_shadows": self.keep.sum(0).astype(int).tolist()}
        return d


# ---------------------------------------------------------------------------- scoring
@torch.no_grad()
def logit_confidence(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     augmentations: tuple[str, ...] = tuple(AUGMENTATIONS), batch_size: int = 512) -> np.ndarray:
    """(N, A) ``phi = log(p_y / (1 - p_y))`` of ``model`` on ``x`` under each augmentation, computed
    stably from the logits as ``z_y - logsumexp_{j != y} z_j``."""
    model.eval()
    out = np.zeros((len(x), len(augmentations)), dtype=np.float64)
    for a, name in enumerate(augmentations):
        aug = AUGMENTATIONS[name]
        for s in range(0, len(x), batch_size):
            z = model(aug(x[s:s + batch_size])).double()
            yb = y[s:s + batch_size].view(-1, 1)
            zy = z.gather(1, yb).squeeze(1)
            others = z.scatter(1, yb, float("-inf"))
            out[s:s + len(z), a] = (zy - torch.logsumexp(others, dim=1)).numpy()
    return out


@torch.no_grad()
def set_proximity(released: torch.Tensor, x: torch.Tensor, augmentations: tuple[str, ...] = tuple(AUGMENTATIONS),
                  batch_size: int = 512) -> np.ndarray:
    """(N, A) ``phi = -log(d2 + 1e-6)``: how close each pool patch ``x`` (under each query augmentation) lies to
    the nearest image of the ``released`` set, ``d2`` the mean squared pixel difference ([0, 1] images).

    The second observable of the attack: whoever receives a set holds its images, not only a model
    trained on them. A verbatim copy has ``d2 = 0`` (phi ~ 13.8); for a model trained on 20 images the
    model's confidence barely separates the 20 from look-alike patches, the images themselves do."""
    flat = released.reshape(len(released), -1).double()
    out = np.zeros((len(x), len(augmentations)), dtype=np.float64)
    for a, name in enumerate(augmentations):
        aug = AUGMENTATIONS[name]
        for s in range(0, len(x), batch_size):
            q = aug(x[s:s + batch_size]).reshape(min(batch_size, len(x) - s), -1).double()
            d2 = torch.cdist(q, flat).pow(2).min(1).values / flat.shape[1]
            out[s:s + len(q), a] = (-torch.log(d2 + 1e-6)).numpy()
    return out


def balanced_halves(n: int, shadows: int, rng: np.random.Generator) -> np.ndarray:
    """(shadows, n) bool: each column has exactly ``shadows // 2`` True (a random half of the shadows)."""
    order = rng.random((shadows, n)).argsort(0)
    return order < shadows // 2


def _gauss_logpdf(x: np.ndarray, mu: np.ndarray, sd: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)


def lira_scores(target_phi: np.ndarray, shadow_phi: np.ndarray, keep: np.ndarray,
                global_variance: bool) -> tuple[np.ndarray, np.ndarray]:
    """(online, offline) per-patch scores from ``target_phi`` (P, A), ``shadow_phi`` (S, P, A) and the IN
    mask ``keep`` (S, P); both higher for likelier members (offline: z-score above the OUT Gaussian)."""
    k = keep[:, :, None].astype(np.float64)
    n_in, n_out = k.sum(0), (1 - k).sum(0)
    if (n_in < 1).any() or (n_out < 1).any():
        raise InputError("lira: every pool patch needs at least one IN and one OUT shadow")
    mu_in = (shadow_phi * k).sum(0) / n_in
    mu_out = (shadow_phi * (1 - k)).sum(0) / n_out
    res_in = ((shadow_phi - mu_in) ** 2 * k)
    res_out = ((shadow_phi - mu_out) ** 2 * (1 - k))
    if global_variance:   # pooled within-patch variance, one per augmentation
        dof_in = np.maximum(n_in.sum(0) - n_in.shape[0], 1)
        dof_out = np.maximum(n_out.sum(0) - n_out.shape[0], 1)
        sd_in = np.broadcast_to(np.sqrt(res_in.sum((0, 1)) / dof_in), mu_in.shape)
        sd_out = np.broadcast_to(np.sqrt(res_out.sum((0, 1)) / dof_out), mu_out.shape)
    else:
        sd_in = np.sqrt(res_in.sum(0) / np.maximum(n_in - 1, 1))
        sd_out = np.sqrt(res_out.sum(0) / np.maximum(n_out - 1, 1))
    sd_in, sd_out = np.maximum(sd_in, 1e-6), np.maximum(sd_out, 1e-6)
    online = (_gauss_logpdf(target_phi, mu_in, sd_in) - _gauss_logpdf(target_phi, mu_out, sd_out)).mean(1)
    offline = ((target_phi - mu_out) / sd_out).mean(1)
    return online, offline


def _attack(scores: np.ndarray, is_member: np.ndarray, fprs: tuple[float, ...]) -> dict[str, Any]:
    fpr, tpr, _ = roc_curve(scores, is_member)
    return {"auc": auc_from_roc(fpr, tpr), "tpr_at_fpr": {_fpr_key(f): tpr_at_fpr(fpr, tpr, f) for f in fprs},
            "fpr": fpr, "tpr": tpr, "scores": np.asarray(scores, dtype=np.float64)}


def threshold_at_fpr(scores: np.ndarray, is_member: np.ndarray, max_fpr: float) -> float:
    """The lowest threshold whose rule ``score >= t`` flags at most ``max_fpr`` of the non-members
    (``inf`` when even the top score would exceed it)."""
    neg = np.sort(np.asarray(scores, dtype=np.float64)[~np.asarray(is_member, bool)])[::-1]
    allowed = int(np.floor(max_fpr * len(neg) + 1e-9))      # non-members that may sit at or above t
    if allowed >= len(neg):
        return float("-inf")
    # t just above the (allowed+1)-th highest non-member score
    return float(np.nextafter(neg[allowed], np.inf))


def _concat(a: PatchSet, b: PatchSet) -> PatchSet:
    return PatchSet(images=np.concatenate([np.asarray(a.images), np.asarray(b.images)]),
                    labels=np.concatenate([a.labels, b.labels]), class_names=list(a.class_names),
                    kind="real", meta=dict(a.meta))


# ---------------------------------------------------------------------------- the attack
def run_lira(target_set: PatchSet, members: PatchSet, non_members: PatchSet, make_set: MakeSet, *,
             shadows: int = 16, train_spec: TrainSpec | None = None, seed: int = 0, progress: bool = True,
             augmentations: tuple[str, ...] = tuple(AUGMENTATIONS), global_variance: bool | None = None,
             fprs: tuple[float, ...] = FPRS, checkpoint_dir: str | Path | None = None,
             recipe_id: Any = None, workers: int = 1) -> LiraResult:
    """Online LiRA against a classifier trained on ``target_set`` (see the module doc).

    ``members`` / ``non_members``: real patches in the view the set was made in (same size as the
    set's training images), members from the centre's store, non-members held out. ``make_set(half,
    seed)`` applies the set's recipe to ``half`` (a random half of the pool). ``global_variance``:
    None chooses global below :data:`GLOBAL_VARIANCE_BELOW` shadows. ``progress``: a bar over shadows.
    ``checkpoint_dir``: keep each finished shadow there (:class:`ShadowCheckpoint`) and skip the ones
    already there; ``recipe_id`` (JSON-able) names the recipe in the checkpoint's key - required with
    ``checkpoint_dir`` unless ``make_set`` has ``to_dict()``. ``workers`` > 1: shadows in that many
    processes (one torch thread each; ``make_set`` must pickle, as a :class:`~histodd_fed.release.recipes.Recipe`
    does); every shadow is seeded, so the numbers are those of ``workers=1`` with one thread.
    """
    if shadows < 2:
        raise InputError(f"lira: need at least 2 shadows (an IN and an OUT run per patch), got {shadows}")
    if len(members) == 0 or len(non_members) == 0:
        raise InputError("lira: need at least one member and one non-member")
    bad = [a for a in augmentations if a not in AUGMENTATIONS]
    if bad:
        raise InputError(f"lira: unknown augmentation(s) {bad}; known: {list(AUGMENTATIONS)}")
    spec = train_spec or DEFAULT_TRAIN_SPEC
    target = decode_set(target_set)
    for ps, name in ((members, "members"), (non_members, "non-members")):
        if list(ps.class_names) != list(target.class_names):
            raise InputError(f"lira: {name} have classes {ps.class_names}, the set {target.class_names}")
        if ps.image_size != target.image_size:
            raise InputError(f"lira: {name} are {ps.image_size} px, the set's training images "
                             f"{target.image_size} px; put them in the set's view first")
    gv = shadows < GLOBAL_VARIANCE_BELOW if global_variance is None else bool(global_variance)
    pool = _concat(members, non_members)
    is_member = np.r_[np.ones(len(members), bool), np.zeros(len(non_members), bool)]
    x, y = pool.to_tensors()
    ss = np.random.SeedSequence([int(seed), 0x11A])
    keep = balanced_halves(len(pool), shadows, np.random.default_rng(ss.spawn(1)[0]))
    seeds = [int(s) % (2**31 - 1) for s in ss.generate_state(2 * shadows + 1)]
    set_seeds, model_seeds, target_model_seed = seeds[:shadows], seeds[shadows:2 * shadows], seeds[-1]

    from histodd_fed.privacy.lira_shadows import ShadowCheckpoint, ShadowWork, run_shadows

    checkpoint = None
    if checkpoint_dir is not None:
        if recipe_id is None:
            if not hasattr(make_set, "to_dict"):
                raise InputError("lira: a checkpoint needs recipe_id (what the recipe is) for this make_set")
            recipe_id = make_set.to_dict()
        checkpoint = ShadowCheckpoint(checkpoint_dir, {
            "pool_images": np.asarray(pool.images), "pool_labels": np.asarray(pool.labels), "keep": keep,
            "set_seeds": set_seeds, "model_seeds": model_seeds, "train_spec": asdict(spec),
            "augmentations": list(augmentations), "recipe": recipe_id, "shadows": shadows,
            "pool": {"members": len(members), "non_members": len(non_members)}},
            expect=(len(pool), len(augmentations)))
    work = ShadowWork(pool=pool, make_set=make_set, spec=spec, augmentations=tuple(augmentations),
                      image_size=target.image_size)
    shadow_phi, shadow_prox, sizes, seconds, resumed = run_shadows(
        work, keep, set_seeds, model_seeds, checkpoint=checkpoint, workers=workers, progress=progress)
    t0 = time.perf_counter()
    tmodel = train_model(spec, target, seed=target_model_seed, desc="target model")
    target_phi = logit_confidence(tmodel, x, y, augmentations)
    target_prox = set_proximity(target.to_tensors()[0], x, augmentations)
    seconds["target"] = time.perf_counter() - t0
    with torch.no_grad():
        pred = torch.cat([tmodel(x[s:s + 512]).argmax(1) for s in range(0, len(x), 512)]).numpy()
    correct = pred == y.numpy()
    online, offline = lira_scores(target_phi, shadow_phi, keep, gv)
    main = _attack(online, is_member, fprs)
    set_on, set_off = lira_scores(target_prox, shadow_prox, keep, gv)

    return LiraResult(auc=main["auc"], tpr_at_fpr=main["tpr_at_fpr"], shadows=shadows, members=len(members),
                      non_members=len(non_members), fpr=main["fpr"], tpr=main["tpr"], scores=online,
                      is_member=is_member, target_phi=target_phi, shadow_phi=shadow_phi, keep=keep,
                      global_variance=gv, augmentations=tuple(augmentations),
                      offline=_attack(offline, is_member, fprs),
                      baseline=_attack(target_phi.mean(1), is_member, fprs),
                      target_accuracy={"members": float(correct[is_member].mean()),
                                       "non_members": float(correct[~is_member].mean())},
                      set_online=_attack(set_on, is_member, fprs), set_offline=_attack(set_off, is_member, fprs),
                      shadow_sizes=sizes, shadow_seeds=set_seeds, seconds=seconds, train_spec=asdict(spec),
                      target_model=tmodel, resumed_shadows=resumed)


# ---------------------------------------------------------------------------- figure
def lira_roc_png(result: LiraResult, title: str = "") -> bytes:
    """Two panels: the ROC curves on log-log axes (as in the paper) and on linear axes; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    floor = 0.5 / max(1, result.non_members)   # FPR (and TPR) 0 drawn at half the resolution
    curves = [("LiRA online", result.fpr, result.tpr, result.auc),
              ("LiRA offline", result.offline["fpr"], result.offline["tpr"], result.offline["auc"]),
              ("global threshold", result.baseline["fpr"], result.baseline["tpr"], result.baseline["auc"]),
              ("LiRA on the set's images", result.set_online["fpr"], result.set_online["tpr"], result.set_online["auc"])]
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 4.2))
    for ax, log in zip(axes, (True, False)):
        for (name, fpr, tpr, auc), style in zip(curves, ("-", "--", ":")):
            fx, ty = (np.maximum(fpr, floor), np.maximum(tpr, floor)) if log else (fpr, tpr)
            ax.plot(fx, ty, style, label=f"{name} (AUC {auc:.3f})")
        grid = np.logspace(np.log10(floor), 0, 50) if log else np.linspace(0, 1, 2)
        ax.plot(grid, grid, color="grey", lw=0.8, label="chance")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(floor, 1)
            ax.set_ylim(floor, 1.02)
            ax.set_title(f"log-log (0 drawn at {floor:.1e})", fontsize=9)
        else:
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_title("linear", fontsize=9)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title or f"LiRA: {result.shadows} shadows, {result.members} members vs {result.non_members} "
                 f"non-members", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
