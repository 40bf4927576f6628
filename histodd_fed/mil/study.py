"""Slide-level study: MIL on distilled per-slide bags vs full bags (Histo-DD Table 4 analogue).

For each ``ipc`` the train slides are distilled per slide (``DistillConfig(per_slide=True)``: ``ipc``
synthetic patches per class present in each slide); every MIL head is trained on the synthetic
bags and on the full real bags ("Full") and evaluated on the real test slides. Patch features come
from one encoder (the centre's ResNet18 patch classifier, trained on the train split when none is
given). Outputs in ``out_dir``: ``mil_study.csv`` (one row per setting, arch, seed),
``mil_study.md`` (mean +- std), ``mil_study.png``, ``run_config.json``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from histodd_fed.atomic import atomic_write_bytes, atomic_write_text
from histodd_fed.errors import ConfigError, InputError
from histodd_fed.patchset import PatchSet

log = logging.getLogger(__name__)


@dataclass
class MilStudyPreset:
    """Sizes of one study run (encoder training, distillation, MIL training)."""

    encoder_arch: str = "resnet18"
    encoder_epochs: int = 4
    encoder_lr: float = 0.01
    encoder_image_size: int | None = None      #: None: the store's patch size
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)  #: create_model kwargs (e.g. small_stem)
    encoder_balance: bool = True               #: oversample minority classes to equal counts (tumour is ~10 %)
    mil_epochs: int = 40
    mil_lr: float = 1e-3
    mil_hidden: int = 64
    distill: dict[str, Any] = field(default_factory=dict)  #: DistillConfig overrides


#: Distillation steps the synthetic pixels (in [0, 1]) with ``lr_img``; 0.01 keeps the distilled
#: patches inside the real patches' feature distribution. With 0.1 (the first presets) a few steps
#: turned tumour patches into "super-tumour" images (encoder feature norm 4x the real tumour tiles',
#: p(tumour) 1.0 vs 0.3), so heads trained on synthetic bags ranked real slides perfectly but called
#: every real slide normal. See docs/mil.md, "Synthetic-to-real gap".
PRESETS: dict[str, MilStudyPreset] = {
    # a few minutes on two CPU cores for ~10 slides of ~100 patches
    "tiny": MilStudyPreset(encoder_epochs=3, encoder_image_size=32, encoder_kwargs={"small_stem": False}, mil_epochs=30, mil_hidden=32, distill=dict(
        model="convnet", image_size=32, outer_steps=2, slide_outer_steps=2, inner_steps=1, pool_size=1,
        pool_epochs=1, batch_real=32, batch_net=32, lr_img=0.01, augmentation="color_crop_flip")),
    # ResNet18 with its ImageNet stem (stride 2 + max-pool) at 32 px: 16x cheaper than the small stem
    # (3x3 stride 1), which made the encoder alone take > 8 min on the shared CPU.
    # ~15 min on the loaded 2-core CPU for 24 slides of ~50 patches, ipcs 2,5, 4 heads, 3 seeds
    "cpu": MilStudyPreset(encoder_epochs=4, encoder_image_size=32, encoder_kwargs={"small_stem": False}, mil_epochs=40, mil_hidden=64, distill=dict(
        model="convnet", image_size=32, outer_steps=5, slide_outer_steps=5, inner_steps=2, pool_size=2,
        pool_epochs=2, batch_real=64, batch_net=64, lr_img=0.01, augmentation="color_crop_flip")),
    "gpu": MilStudyPreset(encoder_epochs=10, encoder_image_size=None, mil_epochs=50, mil_hidden=128, distill=dict(
        model="resnetap10", image_size=64, outer_steps=50, slide_outer_steps=50, inner_steps=10, pool_size=5,
        lr_img=0.01)),
}


@dataclass
class MilStudyResult:
    rows: list[dict]
    csv_path: Path
    markdown_path: Path
    plot_path: Path
    markdown: str


def resolve_preset(preset: str | MilStudyPreset) -> MilStudyPreset:
    if isinstance(preset, MilStudyPreset):
        return preset
    try:
        return PRESETS[preset]
    except KeyError:
        raise ConfigError(f"unknown MIL study preset {preset!r}; known: {', '.join(PRESETS)}") from None


def split_train_test(real: PatchSet) -> tuple[PatchSet, PatchSet]:
    """Train and test slides of a tiled store (``meta['slide_splits']``)."""
    from histodd_fed.slides.manifest import select_split

    train, test = select_split(real, "train"), select_split(real, "test")
    if len(train) == 0 or len(test) == 0:
        raise InputError("MIL study: the store needs slides in both the train and the test split")
    return train, test


def balance_classes(ps: PatchSet, seed: int = 0) -> PatchSet:
    """``ps`` with every present class oversampled (with replacement, seeded) to the largest class's count.

    Tiled slides hold ~10 % tumour patches; an encoder trained on them unbalanced barely separates
    real tumour patches (mean p(tumour) ~0.3 on real tumour tiles in the 12-slide run), which leaves
    the MIL heads little tumour signal to find.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    counts = np.bincount(ps.labels, minlength=ps.num_classes)
    target = int(counts.max())
    idx = [np.flatnonzero(ps.labels == c) for c in range(ps.num_classes) if counts[c]]
    idx = [np.concatenate([i, rng.choice(i, target - len(i), replace=True)]) if len(i) < target else i for i in idx]
    return ps.subset(np.sort(np.concatenate(idx)))


def train_patch_encoder(train: PatchSet, out_dir: Path, preset: MilStudyPreset, seed: int = 0,
                        progress: bool = True):
    """Train the centre's patch classifier (ResNet18 by default) on ``train`` and save it to ``out_dir``."""
    import numpy as np

    from histodd_fed.mil.features import save_patch_model
    from histodd_fed.models.registry import create_model
    from histodd_fed.training.trainer import train_classifier

    size = preset.encoder_image_size or train.image_size
    data = balance_classes(train, seed) if preset.encoder_balance else train
    if size != train.image_size:
        from histodd_fed.preprocess import resize_images

        data = PatchSet(images=resize_images(np.asarray(data.images), size), labels=data.labels,
                        class_names=data.class_names)
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(preset.encoder_arch, num_classes=train.num_classes, image_size=size,
                             **preset.encoder_kwargs)
    res = train_classifier(model, data, epochs=preset.encoder_epochs, lr=preset.encoder_lr, batch_size=64,
                           seed=seed, device="cpu", progress=progress, augmentation=None, desc="encoder")
    save_patch_model(res.model, out_dir, arch=preset.encoder_arch, num_classes=train.num_classes, image_size=size,
                     arch_kwargs=dict(preset.encoder_kwargs) or None, class_names=train.class_names)
    log.info("patch encoder trained (%d epochs, %.1f s/epoch) -> %s", preset.encoder_epochs,
             float(np.mean(res.epoch_seconds)) if res.epoch_seconds else math.nan, out_dir)
    return res.model, size


def run_mil_study(real: PatchSet, out_dir: str | Path, *, ipcs: Sequence[int] = (10, 20, 50),
                  archs: Sequence[str] = ("abmil", "clam", "dsmil", "transmil"),
                  preset: str | MilStudyPreset = "cpu", seeds: Sequence[int] = (0,),
                  encoder: "str | Path | Any | None" = None, include_full: bool = True,
                  progress: bool = True) -> MilStudyResult:
    """Run the study; see the module docstring. ``encoder``: model, saved classifier dir or weights file."""
    import numpy as np
    import torch

    from histodd_fed.distill import DistillConfig, distill
    from histodd_fed.mil.bags import bags_from_patchset, bags_nbytes
    from histodd_fed.mil.features import load_encoder
    from histodd_fed.mil.registry import canonical_name
    from histodd_fed.mil.train import evaluate_mil, train_mil
    from histodd_fed.runconfig import write_run_config

    p = resolve_preset(preset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    archs = [canonical_name(a) for a in archs]
    config = {"ipcs": list(ipcs), "archs": archs, "preset": preset if isinstance(preset, str) else "custom",
              "preset_values": asdict(p), "seeds": list(seeds), "encoder": None if encoder is None else str(encoder),
              "n_patches": len(real), "slides": len(real.slide_ids)}
    write_run_config(out_dir, "mil study", config)
    train, test = split_train_test(real)

    if encoder is None:
        model, size = train_patch_encoder(train, out_dir / "encoder", p, seed=int(seeds[0]), progress=progress)
        enc = load_encoder(model, image_size=size, input_size=size)
    else:
        enc = load_encoder(encoder, image_size=train.image_size,
                           input_size=p.encoder_image_size if not isinstance(encoder, (str, Path)) else None)
    cache = out_dir / "feature_cache"
    test_bags = bags_from_patchset(test, enc, cache, progress=progress)
    settings: list[tuple[str, int | None, list]] = []
    for ipc in ipcs:
        cfg = DistillConfig(**{**p.distill, "ipc": int(ipc), "per_slide": True, "seed": int(seeds[0]), "device": "cpu"})
        syn_dir = out_dir / "synthetic" / f"ipc{ipc}"
        if (syn_dir / "patchset.json").exists():
            syn = PatchSet.load(syn_dir)
            log.info("reusing %s", syn_dir)
        else:
            syn = distill(train, cfg, work_dir=out_dir / "distill_work", progress=progress)
            syn.save(syn_dir)
        settings.append((f"ipc {ipc}", int(ipc), bags_from_patchset(syn, enc, cache, progress=progress)))
    if include_full:
        settings.append(("Full", None, bags_from_patchset(train, enc, cache, progress=progress)))

    rows: list[dict] = []
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for name, ipc, bags in settings:
        for arch in archs:
            for seed in seeds:
                res = train_mil(bags, arch, epochs=p.mil_epochs, lr=p.mil_lr, seed=int(seed), progress=progress,
                                model_kwargs={"hidden": p.mil_hidden})
                m = evaluate_mil(res.model, test_bags)
                rows.append({"setting": name, "ipc": "" if ipc is None else ipc, "arch": arch, "seed": int(seed),
                             "accuracy": m.accuracy, "auc": m.auc, "balanced_accuracy": m.balanced_accuracy,
                             "epoch_seconds": res.mean_epoch_seconds, "storage_bytes": bags_nbytes(bags),
                             "train_bags": len(bags), "train_instances": int(sum(b.n_patches for b in bags)),
                             "test_bags": len(test_bags)})
                log.info("%s %s seed %d: acc %.3f auc %.3f", name, arch, seed, m.accuracy, m.auc)
    return write_study_outputs(rows, out_dir, archs)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def summarise(rows: list[dict], archs: Sequence[str]) -> str:
    """Markdown table: one line per setting, accuracy / AUC (mean ± std, %) and epoch time per head."""
    from histodd_fed.mil.train import format_mean_std, mean_std

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    head = "| Setting | Storage | " + " | ".join(f"{a} acc | {a} AUC | {a} s/epoch" for a in archs) + " |"
    sep = "|" + "---|" * (2 + 3 * len(archs))
    lines = [head, sep]
    for s in settings:
        rs = [r for r in rows if r["setting"] == s]
        cells = [s, _fmt_bytes(rs[0]["storage_bytes"])]
        for a in archs:
            ra = [r for r in rs if r["arch"] == a]
            cells += [format_mean_std([r["accuracy"] for r in ra], 100), format_mean_std([r["auc"] for r in ra], 100),
                      f"{mean_std([r['epoch_seconds'] for r in ra])[0]:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    n_seeds = len({r["seed"] for r in rows})
    return "\n".join(lines) + f"\n\nSlide-level accuracy / AUC in % on the real test slides, mean ± std over {n_seeds} seed(s).\n"


def write_study_outputs(rows: list[dict], out_dir: str | Path, archs: Sequence[str]) -> MilStudyResult:
    """CSV, Markdown and PNG of the study rows (atomic writes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    if not rows:
        raise InputError("MIL study produced no rows")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    csv_path = atomic_write_text(out_dir / "mil_study.csv", buf.getvalue())
    md = summarise(rows, archs)
    md_path = atomic_write_text(out_dir / "mil_study.md", "# MIL on distilled vs full bags\n\n" + md)
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(settings))
    width = 0.8 / max(1, len(archs))
    for i, a in enumerate(archs):
        for ax, key in zip(axes, ("accuracy", "auc")):
            vals = [[r[key] for r in rows if r["setting"] == s and r["arch"] == a] for s in settings]
            means = [np.nanmean(v) if v else np.nan for v in vals]
            stds = [np.nanstd(v) if v else 0 for v in vals]
            ax.bar(x + i * width - 0.4 + width / 2, means, width, yerr=stds, label=a)
    for ax, key in zip(axes, ("slide accuracy", "slide AUC")):
        ax.set_xticks(x, settings)
        ax.set_ylim(0, 1.05)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_title(key)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    plot_path = atomic_write_bytes(out_dir / "mil_study.png", png.getvalue())
    return MilStudyResult(rows=rows, csv_path=csv_path, markdown_path=md_path, plot_path=plot_path, markdown=md)
