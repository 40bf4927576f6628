"""Figures of a distillation run: the loss curve and synthetic-vs-initial patch grids (PNG, atomic)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from histodd_fed.atomic import atomic_write_bytes


def _figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def save_loss_curve(loss_curve: list[dict], path: str | Path) -> Path:
    """Mean matching loss per outer step (plus first/last inner step) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if loss_curve:
        steps = [r["step"] for r in loss_curve]
        ax.plot(steps, [r["mean"] for r in loss_curve], label="mean over inner steps")
        ax.plot(steps, [r["first"] for r in loss_curve], alpha=0.4, label="first inner step")
        ax.plot(steps, [r["last"] for r in loss_curve], alpha=0.4, label="last inner step")
        ax.legend(fontsize=8)
    ax.set_xlabel("outer step")
    ax.set_ylabel("gradient-matching loss per class")
    ax.set_title("Histo-DD distillation")
    data = _figure_bytes(fig)
    plt.close(fig)
    return atomic_write_bytes(path, data)


def save_grid(initial: np.ndarray, synthetic: np.ndarray, labels: np.ndarray, class_names: list[str],
              path: str | Path, max_per_class: int = 10) -> Path:
    """Two rows per class: initial images (top) and synthetic images (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [c for c in range(len(class_names)) if (labels == c).any()]
    cols = max(1, min(max_per_class, max(int((labels == c).sum()) for c in classes) if classes else 1))
    fig, axes = plt.subplots(2 * max(1, len(classes)), cols, figsize=(cols * 1.1, 2.3 * max(1, len(classes))),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for r, c in enumerate(classes):
        idx = np.flatnonzero(labels == c)[:cols]
        for j, i in enumerate(idx):
            axes[2 * r, j].imshow(initial[i])
            axes[2 * r + 1, j].imshow(synthetic[i])
        axes[2 * r, 0].set_title(f"{class_names[c]}: initial", fontsize=8, loc="left")
        axes[2 * r + 1, 0].set_title(f"{class_names[c]}: synthetic", fontsize=8, loc="left")
    data = _figure_bytes(fig)
    plt.close(fig)
    return atomic_write_bytes(path, data)


def save_drift(summary: dict, path: str | Path, to_real: dict | None = None) -> Path:
    """Drift from the start vs outer step (``meta["drift"]``): RMS change, SSIM and structure correlation
    of each image to its starting image (mean over images); with ``to_real`` (the local record's
    ``to_real_summary``) also to the closest real patch each image was mixed from, dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = summary.get("steps") or []
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, key, label in zip(axes, ("rms", "ssim", "structure"),
                              ("RMS change (pixels in [0, 1])", "SSIM", "structure correlation")):
        ax.plot(steps, summary.get(f"{key}_mean") or [], marker="o", ms=3, label="to its starting image")
        if to_real:
            ax.plot(steps, to_real.get(f"{key}_mean") or [], ls="--", marker="x", ms=3,
                    label="to its closest source patch")
        ax.set_xlabel("outer step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Drift from the start (mean over {summary.get('n_images', '?')} images)", fontsize=10)
    data = _figure_bytes(fig)
    plt.close(fig)
    return atomic_write_bytes(path, data)
