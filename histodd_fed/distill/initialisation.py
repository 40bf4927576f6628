"""Where the synthetic images start: the stage plan (which real patches each class block draws from and
starts from) and the initial tensors of every ``init`` (real, noise, herding, mixture, mosaic)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from histodd_fed.distill.config import DistillConfig
from histodd_fed.errors import InputError
from histodd_fed.formation import encode
from histodd_fed.patchset import PatchSet
from histodd_fed.stain.normalize import ImageStains, StainContext


@dataclass
class Group:
    """One block of synthetic images matched against one pool of real images (a class, or a class of a slide)."""

    label: int
    slide: int                # index into the real set's slide_ids, -1 for patch-level
    real_idx: np.ndarray      # indices into the real tensors
    init_idx: np.ndarray      # real indices the synthetic images start from (init: real)
    mix_idx: np.ndarray | None = None  # (ipc, init_mix) real indices averaged into each image (init: mixture)
    borrowed: int = 0                 # per-slide mode: patches of other slides added to a small group


def colour_stats(images: np.ndarray) -> np.ndarray:
    """Per-channel mean and std of uint8 NHWC images, (N, 6) float."""
    x = images.reshape(len(images), -1, images.shape[-1]).astype(np.float32) / 255.0
    return np.concatenate([x.mean(1), x.std(1)], axis=1)


def kmeans_anchors(feats: np.ndarray, k: int, rng: np.random.Generator, iters: int = 20) -> np.ndarray:
    """Indices of the ``k`` rows of ``feats`` nearest to k-means centres (k-means++ seeding from ``rng``),
    distinct when there are enough rows."""
    n = len(feats)
    if n <= k:
        return rng.choice(n, size=k, replace=n < k)
    centres = [feats[rng.integers(n)]]
    for _ in range(1, k):
        d = np.min(((feats[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(feats[rng.choice(n, p=d / d.sum()) if d.sum() > 0 else rng.integers(n)])
    c = np.asarray(centres)
    for _ in range(iters):
        assign = ((feats[:, None, :] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([feats[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
    picks: list[int] = []
    for j in range(k):
        order = np.argsort(((feats - c[j]) ** 2).sum(1))
        picks.append(int(next((i for i in order if i not in picks), order[0])))
    return np.asarray(picks)


def plan_stages(real: PatchSet, config: DistillConfig, rng: np.random.Generator) -> list[list[Group]]:
    """Stages of groups; initial real images drawn without replacement when enough exist."""

    n_init = config.ipc * config.formation ** 2   # training images per class (decoded, multi-formation)

    def group(label: int, slide: int, idx: np.ndarray) -> Group:
        replace = len(idx) < n_init
        init = rng.choice(idx, size=n_init, replace=replace)
        g = Group(label, slide, idx, np.asarray(init, dtype=np.int64))
        if config.init in ("mixture", "mosaic"):
            n = min(config.init_mix if config.init == "mixture" else config.init_grid ** 2, len(idx))
            if config.init_colour_pool:
                # a random anchor and n - 1 others among its init_colour_pool nearest patches of the class
                # by colour statistics (per-channel mean and std): one stain per image
                feats = colour_stats(real.images[idx])
                rows = []
                if config.init_anchor == "kmeans":   # one anchor per colour cluster of the class
                    anchors = kmeans_anchors(feats, n_init, rng)
                else:
                    anchors = rng.choice(len(idx), size=n_init, replace=len(idx) < n_init)
                for a in anchors:
                    near = np.argsort(((feats - feats[a]) ** 2).sum(1))[1:config.init_colour_pool + 1]
                    rows.append(np.concatenate([[idx[a]], idx[rng.choice(near, size=n - 1, replace=len(near) < n - 1)]]))
                g.mix_idx = np.stack(rows)
            else:
                g.mix_idx = np.stack([rng.choice(idx, size=n, replace=False) for _ in range(n_init)])
            g.init_idx = np.full(n_init, -1, dtype=np.int64)  # no single real patch is the start
        return g

    if not config.per_slide:
        stage = []
        for c in range(real.num_classes):
            idx = np.flatnonzero(real.labels == c)
            if len(idx) == 0:
                raise InputError(f"distill: class {real.class_names[c]!r} has no patches in the real set "
                                 f"(class counts {real.class_counts()})")
            if len(idx) < config.ipc:
                raise InputError(f"distill: ipc={config.ipc} is larger than class {real.class_names[c]!r} "
                                 f"({len(idx)} patches); lower --ipc")
            stage.append(group(c, -1, idx))
        return [stage]
    if not real.slide_ids or (real.slide_index < 0).all():
        raise InputError("per-slide distillation: the patch set has no slide ids (slide_index is all -1)")
    stages = []
    for s in range(len(real.slide_ids)):
        stage = []
        for c in range(real.num_classes):
            idx = np.flatnonzero((real.slide_index == s) & (real.labels == c))
            if len(idx):
                own = len(idx)
                idx = widen_slide_group(real, s, c, idx, config.slide_group_min, rng)
                g = group(c, s, idx)
                g.borrowed = len(idx) - own
                stage.append(g)
        if stage:
            stages.append(stage)
    return stages


def widen_slide_group(real: PatchSet, slide: int, label: int, idx: np.ndarray, minimum: int,
                      rng: np.random.Generator) -> np.ndarray:
    """``idx`` (the patches of class ``label`` in slide ``slide``) topped up to ``minimum`` patches with that
    class's patches of other slides: first those whose slide label equals this slide's, then any other slide;
    drawn without replacement from ``rng`` (no draw when the group is large enough or ``minimum`` is 0)."""
    need = int(minimum) - len(idx)
    if need <= 0:
        return idx
    others = (real.labels == label) & (real.slide_index >= 0) & (real.slide_index != slide)
    own_label = real.slide_labels.get(real.slide_ids[slide])
    same = np.zeros(len(real.labels), dtype=bool)
    if own_label is not None:
        peers = [j for j, sid in enumerate(real.slide_ids) if j != slide and real.slide_labels.get(sid) == own_label]
        same = others & np.isin(real.slide_index, peers)
    first, rest = np.flatnonzero(same), np.flatnonzero(others & ~same)
    take = rng.choice(first, size=min(need, len(first)), replace=False) if len(first) else first
    need -= len(take)
    more = rng.choice(rest, size=min(need, len(rest)), replace=False) if need > 0 and len(rest) else rest[:0]
    return np.sort(np.concatenate([idx, take, more]).astype(np.int64))


def herding_init(stages: list[list[Group]], images: np.ndarray, real: PatchSet, config: DistillConfig,
                 progress: bool) -> dict:
    """``init: herding``: replace each class's initial indices with its herding coreset picks.

    The picks are ``histodd_fed.coreset.build_coreset`` (method herding) on the resized real images,
    with ``config.herding_coreset_config()``; the random draws of :func:`plan_stages` are kept (the rng
    stream of the matching steps is the same as for ``init: real``). Returns what the meta records.
    """
    from histodd_fed.coreset import build_coreset

    ccfg = config.herding_coreset_config()
    t0 = time.perf_counter()
    core = build_coreset(PatchSet(images=images, labels=real.labels, class_names=list(real.class_names)), ccfg,
                         progress=progress)
    picks = np.asarray(core.meta["source_indices"], dtype=np.int64).reshape(real.num_classes, config.ipc)
    for g in stages[0]:
        g.init_idx = picks[g.label].copy()
    return {"coreset_config": dict(core.meta["config"]), "source_indices": picks.reshape(-1).tolist(),
            "seconds": round(time.perf_counter() - t0, 3)}


def mosaic(x: torch.Tensor, idx: torch.Tensor, grid: int) -> torch.Tensor:
    """(n, C, H, W) images whose tile (i, j) of a ``grid`` x ``grid`` split is that tile of ``x[idx[:, i*grid+j]]``."""
    n, (c, h, w) = idx.shape[0], x.shape[1:]
    out = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device)
    ys = [round(h * i / grid) for i in range(grid + 1)]
    xs = [round(w * j / grid) for j in range(grid + 1)]
    for i in range(grid):
        for j in range(grid):
            src = x[idx[:, (i * grid + j) % idx.shape[1]]]
            out[:, :, ys[i]:ys[i + 1], xs[j]:xs[j + 1]] = src[:, :, ys[i]:ys[i + 1], xs[j]:xs[j + 1]]
    return out


def stacked_mix(groups: list[Group]) -> np.ndarray:
    """The groups' ``mix_idx`` rows stacked. A group with fewer real patches than ``init_mix`` (a class with a few
    patches in one slide, per-slide mode) has narrower rows: they are cycled to the widest width (its own patches
    repeated in order), so stacking never fails; equal widths are stacked as they are."""
    width = max(g.mix_idx.shape[1] for g in groups)
    return np.concatenate([g.mix_idx if g.mix_idx.shape[1] == width else
                           g.mix_idx[:, np.arange(width) % g.mix_idx.shape[1]] for g in groups])


def initial_images(stages: list[list[Group]], config: DistillConfig, x_real: torch.Tensor,
                   real_stains: ImageStains | None, stain_ctx: StainContext | None, gen: torch.Generator,
                   device: torch.device) -> tuple[list[torch.Tensor], list[ImageStains | None]]:
    """Per stage, the stored synthetic images to start from (multi-formation encoded) and the stains of
    its training (decoded) images: a real patch's own, else the template's. ``init: noise`` draws from ``gen``."""
    syn: list[torch.Tensor] = []
    syn_stains: list[ImageStains | None] = []
    for stage in stages:
        init = np.concatenate([g.init_idx for g in stage])
        if config.init == "mixture":
            mix = torch.from_numpy(stacked_mix(stage)).to(device)   # (n, init_mix)
            x0 = x_real[mix.reshape(-1)].reshape(*mix.shape, *x_real.shape[1:]).mean(1)
        if config.init == "mosaic":
            mix = torch.from_numpy(stacked_mix(stage)).to(device)   # (n, grid**2)
            x0 = mosaic(x_real, mix, config.init_grid)
        if config.init in ("mixture", "mosaic"):
            st = None if stain_ctx is None else ImageStains(
                stain_ctx.template_matrix.to(device).expand(len(init), 3, 2).clone(),
                stain_ctx.template_max_conc.to(device).expand(len(init), 2).clone())
        elif config.init in ("real", "herding"):
            x0 = x_real[torch.from_numpy(init).to(device)].clone()
            st = None if real_stains is None else real_stains.index(torch.from_numpy(init).to(device))
        else:
            x0 = torch.rand((len(init), 3, config.image_size, config.image_size), generator=gen).to(device)
            st = None if stain_ctx is None else ImageStains(
                stain_ctx.template_matrix.to(device).expand(len(init), 3, 2).clone(),
                stain_ctx.template_max_conc.to(device).expand(len(init), 2).clone())
        syn.append(encode(x0, config.formation))   # multi-formation: f x f training images per stored image
        syn_stains.append(st)                       # stains stay per training (decoded) image
    return syn, syn_stains
