"""PNG figures of the privacy audit (matplotlib, Agg backend; returned as bytes for atomic writes)."""

from __future__ import annotations

import io

import numpy as np

from histodd_fed.patchset import PatchSet
from histodd_fed.privacy.membership import MembershipResult
from histodd_fed.privacy.memorisation import MemorisationResult


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def closest_pairs_png(mem: MemorisationResult, synthetic: PatchSet, real: PatchSet, n_pairs: int = 12) -> bytes:
    """Grid: one row per synthetic patch (closest first by SSIM): synthetic | nearest real per metric | init."""
    plt = _plt()
    order_metric = mem.metrics.get("ssim") or next(iter(mem.metrics.values()))
    order = np.argsort(order_metric.closeness(order_metric.synthetic_nn), kind="stable")[:max(1, n_pairs)]
    cols = ["synthetic"] + [f"NN {m}" for m in mem.metrics] + (["init"] if mem.init_indices is not None else [])
    fig, axes = plt.subplots(len(order), len(cols), figsize=(1.6 * len(cols), 1.7 * len(order)), squeeze=False)
    for r, s in enumerate(order):
        panels = [(synthetic.images[s], f"syn {s} ({synthetic.class_names[synthetic.labels[s]]})")]
        for m, res in mem.metrics.items():
            j = int(res.synthetic_nn_index[s])
            panels.append((real.images[j], f"real {j}\n{m} {res.synthetic_nn[s]:.3f} (p{res.percentile[s]:.0f})"))
        if mem.init_indices is not None:
            j = int(mem.init_indices[s])
            panels.append((real.images[j], f"init real {j}") if j >= 0 else (np.zeros_like(synthetic.images[s]), "no init"))
        for c, (img, title) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(np.asarray(img), interpolation="nearest")
            ax.set_title(f"{cols[c].upper()}\n{title}" if r == 0 else title, fontsize=6)
            ax.axis("off")
    fig.suptitle("Closest synthetic / real pairs (rows sorted by SSIM; pN = real-real percentile)", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def nn_distribution_png(mem: MemorisationResult) -> bytes:
    """Histograms of real-real NN values per metric, synthetic NN values as a rug and the p1 line."""
    plt = _plt()
    names = list(mem.metrics)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        r = mem.metrics[name]
        ax.hist(r.reference_nn, bins=40, color="0.7", label="real-real NN")
        ymax = ax.get_ylim()[1]
        ax.vlines(r.synthetic_nn, 0, ymax * 0.35, colors="tab:red", linewidth=1.2, label="synthetic NN")
        ax.axvline(r.reference_threshold(1.0), color="k", linestyle="--", linewidth=1, label="real-real closest 1%")
        ax.set_title(f"{name} ({'higher' if r.higher_is_closer else 'lower'} = closer)", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=7)
    return _png(fig)


def roc_png(mia: MembershipResult) -> bytes:
    """ROC curves of the membership attacks (linear and log FPR)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.4))
    for name, a in mia.attacks.items():
        axes[0].plot(a.fpr, a.tpr, label=f"{name} (AUC {a.auc:.3f})")
        axes[1].plot(np.maximum(a.fpr, 1e-4), a.tpr, label=name)
    axes[0].plot([0, 1], [0, 1], "k:", linewidth=1)
    axes[1].plot([1e-4, 1], [1e-4, 1], "k:", linewidth=1)
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlim(1e-3, 1)
    axes[1].set_ylim(1e-3, 1)
    for ax in axes:
        ax.set_xlabel("FPR")
        ax.set_ylabel("TPR")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Membership inference: {mia.n_members} members vs {mia.n_nonmembers} non-members", fontsize=9)
    return _png(fig)
