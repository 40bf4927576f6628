"""DP distribution matching (``dm-dp``): one-shot differentially private class-mean embeddings, then
distribution matching against them (in the spirit of DP-MEPF, Harder et al. 2023, and DP-Sinkhorn /
Dosser-style one-shot releases).

Mechanism (the only place the centre's real patches are read):

1. ``dp_nets`` (T) networks of the recipe's architecture are initialised from the run's seed and never
   trained (public: they depend on no data). A patch ``x``'s embedding ``phi(x)`` is the recipe's DM
   embedding - every block's output (``dm_layers: all``, each block scaled so its squared distance
   weighs as in :func:`histodd_fed.distill.distribution.dm_distance`) or the last one - concatenated over the
   T nets (divided by sqrt(T)), averaged over ``dp_augs`` augmentations of the patch, drawn per patch,
   independently of the data, from a SECRET generator (OS entropy). Why secret: with draws from the
   recorded seed, removing one patch would shift which draw every other patch gets, and the release's
   sensitivity would no longer be bounded by one patch's clipped vector. With i.i.d. hidden draws the
   shared patches' draws can be coupled between neighbouring data sets; conditioned on them the two
   releases differ by one clipped vector, and the mixture over the draws keeps the Gaussian mechanism's
   (epsilon, delta) (joint convexity of the hockey-stick divergence).
2. ``phi(x) - mu`` (``mu``: the mean embedding of the PUBLIC patches when ``public_dir`` is set, else 0)
   is clipped to L2 norm ``C = dp_clip``; a count coordinate ``c = COUNT_SCALE * C`` is appended.
3. Per class, the clipped vectors (and counts) are summed; classes are disjoint, so adding or removing
   one patch changes exactly one class's (sum, count) vector, by at most ``sqrt(C^2 + c^2)`` in L2: the
   release of all classes' vectors has that L2 sensitivity (add/remove adjacency, unit: one patch).
4. Gaussian noise ``N(0, (sigma * sensitivity)^2)`` is added to every coordinate ONCE; ``sigma`` is
   calibrated for (epsilon, delta) with Opacus's PRV accountant (one Gaussian mechanism: sample rate 1,
   1 step). The noise generator is seeded from the OS entropy pool (``secrets``), never from the run's
   seed (which the set's meta records): a recipient could otherwise regenerate and subtract it.
5. The noisy means ``mu + noisy_sum / max(noisy_count, 1)`` are the targets. Everything after this is
   post-processing of the release (no further privacy cost): public-patch selection (``init: public``,
   ``public_pick: project``) and the image optimisation, which matches the mean embedding of the
   augmented synthetic images (fresh per-image draws each step) under the same T nets to the targets.

The set's meta records ``method: "dm-dp"`` and ``dp: {epsilon, delta, accountant, noise_multiplier,
clip, mechanism, ...}`` and nothing about the real data the accounting does not cover (no data hash,
no exact counts, no real indices, no selection on held-out real patches). Limits: patch-level DP (a
patient with many patches is protected only by group privacy); floating-point Gaussian sampling
(Mironov 2012) is not hardened.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from histodd_fed.distill.objectives import Objective, register
from histodd_fed.errors import ConfigError, InputError

log = logging.getLogger(__name__)

#: the count coordinate's value for every patch, as a fraction of the clip norm C
COUNT_SCALE = 0.25
ACCOUNTANT = "opacus PRVAccountant (one Gaussian mechanism: sample_rate 1, steps 1)"
MECHANISM = ("gaussian: per-class sums of clipped per-patch embeddings with a count coordinate, "
             "released once (add/remove, unit: one patch)")
PUBLIC_PICKS = ("project", "random")
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------- config
def validate_dm_dp(config) -> None:
    """Refuse dm-dp settings that would leak real patches or that the mechanism does not support."""
    eps = config.dp_epsilon
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
        raise ConfigError(f"distill config: dp_epsilon must be a finite number > 0 (0: off), got {eps!r}")
    if config.candidates != 1:
        raise ConfigError("distill config: dm-dp (dp_epsilon > 0) refuses best-of-K selection (candidates "
                          f"{config.candidates}): it reads held-out real patches outside the DP accounting; set candidates: 1")
    if isinstance(config.dp_pool, bool) or not isinstance(config.dp_pool, int) or config.dp_pool < 0:
        raise ConfigError(f"distill config: dp_pool must be an integer >= 0, got {config.dp_pool!r}")
    for name in ("dp_nets", "dp_augs", "public_scale"):
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"distill config: {name} must be an integer >= 1, got {v!r}")
    if config.public_pick not in PUBLIC_PICKS:
        raise ConfigError(f"distill config: public_pick must be one of {PUBLIC_PICKS}, got {config.public_pick!r}")
    from histodd_fed.augment import build_augmentation

    leaks = [f"objective {config.objective!r} (needs distribution)" if config.objective != "distribution" else "",
             "dp_noise (the per-step DP gradient matching; pick one mechanism)" if config.dp_noise else "",
             f"init {config.init!r} (needs noise or public)" if config.init not in ("noise", "public") else "",
             "init public without public_dir" if config.init == "public" and not config.public_dir else "",
             f"pool_epochs {config.pool_epochs} (the networks must not train on real patches: 0)"
             if config.pool_epochs else "",
             "per_slide" if config.per_slide else "",
             f"formation {config.formation} (needs 1)" if config.formation != 1 else "",
             f"dm_moments {config.dm_moments} (needs 1)" if config.dm_moments != 1 else "",
             "privacy_step (reads real patches)" if config.privacy_step else "",
             "candidate_gate (audits against real patches)" if config.candidate_gate else "",
             f"augmentation {config.augmentation!r} estimates a stain template from real patches"
             if build_augmentation(config.augmentation).uses_stains else ""]
    leaks = [x for x in leaks if x]
    if leaks:
        raise ConfigError("distill config: dm-dp (dp_epsilon > 0) cannot be made DP with: " + "; ".join(leaks))


# ------------------------------------------------------------------------------------------ accounting
def calibrate_noise(epsilon: float, delta: float) -> float:
    """Noise multiplier sigma of one Gaussian mechanism meeting (``epsilon``, ``delta``), by Opacus's PRV
    accountant (``get_noise_multiplier``, sample rate 1, 1 step); its epsilon for sigma is <= ``epsilon``."""
    try:
        from opacus.accountants.utils import get_noise_multiplier
    except ImportError as exc:  # pragma: no cover - opacus is pinned in requirements.lock
        raise ConfigError("dm-dp needs the opacus package (pip install 'opacus>=1.5,<2') for its accountant") from exc
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return float(get_noise_multiplier(target_epsilon=float(epsilon), target_delta=float(delta), sample_rate=1.0,
                                          steps=1, accountant="prv", epsilon_tolerance=0.005))


def accountant_epsilon(noise: float, delta: float) -> float:
    """Epsilon at ``delta`` of one Gaussian mechanism with noise multiplier ``noise`` (Opacus PRV accountant)."""
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(float(noise), 1.0, 1)]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=float(delta)))


# ------------------------------------------------------------------------------------------- embedding
def make_nets(config, num_classes: int) -> list[torch.nn.Module]:
    """The T fixed random networks (seeded from ``config.seed``; they see no data)."""
    from histodd_fed.distill.pool import build_model

    nets = []
    with torch.random.fork_rng(devices=[]):
        for t in range(config.dp_nets):
            torch.manual_seed(int(config.seed) * 7919 + 104729 + t)
            net = build_model(config, num_classes).eval()
            for p in net.parameters():
                p.requires_grad_(False)
            nets.append(net)
    return nets


def embed(nets: list[torch.nn.Module], x: torch.Tensor, layers: str, pool: int = 0) -> torch.Tensor:
    """(B, D) embedding: per net, every block's output (``all``; each scaled by sqrt(d_last / (d_block * L)))
    or the last block's (``last``), concatenated, / sqrt(T). ``pool`` 0: the flattened feature maps (then
    ``||mean embed(a) - mean embed(b)||^2`` is the mean over the nets of the recipe's DM distance); ``pool``
    p > 0: each block's map average-pooled to p x p first (p = 1: per-block channel means), far fewer
    coordinates for the noise to land on."""
    parts = []
    for net in nets:
        body = getattr(net, "body", None)
        if not isinstance(body, torch.nn.Sequential):
            raise InputError(f"dm-dp needs a network with a Sequential body of blocks (convnet), not {type(net).__name__}")
        outs, h = [], x
        for layer in body:
            h = layer(h)
            if isinstance(layer, (torch.nn.AvgPool2d, torch.nn.MaxPool2d)):
                outs.append((torch.nn.functional.adaptive_avg_pool2d(h, pool) if pool else h).flatten(1))
        outs = outs or [h.flatten(1)]
        if layers == "last":
            outs = outs[-1:]
        d_last = outs[-1].shape[1]
        parts += [o * math.sqrt(d_last / (o.shape[1] * len(outs))) for o in outs]
    return torch.cat(parts, 1) / math.sqrt(len(nets))


def augmented_embedding(nets, x: torch.Tensor, aug, n_augs: int, gen: torch.Generator, layers: str,
                        pool: int = 0) -> torch.Tensor:
    """Mean over ``n_augs`` per-image augmentation draws (from ``gen``, data-independent) of :func:`embed`."""
    if not aug.ops:
        return embed(nets, x, layers, pool)
    acc = None
    for _ in range(n_augs):
        e = embed(nets, aug(x, gen), layers, pool)
        acc = e if acc is None else acc + e
    return acc / n_augs


def clip_rows(e: torch.Tensor, clip: float) -> torch.Tensor:
    """Each row scaled to L2 norm at most ``clip``."""
    norms = e.norm(dim=1, keepdim=True)
    return e * (clip / norms.clamp_min(1e-12)).clamp(max=1.0)


def private_class_means(x_real: torch.Tensor, y_real: torch.Tensor, num_classes: int, nets, aug, config,
                        centre: torch.Tensor | None, noise_multiplier: float, *, batch: int = 256,
                        progress: bool = True, noise_gen: torch.Generator | None = None,
                        sums_cache: dict | None = None) -> dict:
    """The one DP release: per class, noisy (sum of clipped centred embeddings, count); returns the noisy
    means (targets, centre added back) and noisy counts. ``noise_multiplier`` 0 releases the exact means
    (a no-noise control for benchmarks only). ``noise_gen`` (the real patches' augmentation draws and the
    noise) defaults to a generator seeded from the OS entropy pool; tests may pass their own.
    ``sums_cache`` (benchmarks only: several epsilons from one embedding pass) keeps the exact clipped sums
    between calls with the same data, nets and clip; each call still adds its own fresh noise."""
    from histodd_fed.logging_setup import progress as progress_bar

    if noise_gen is None:
        noise_gen = torch.Generator().manual_seed(secrets.randbits(63))
    gen = noise_gen        # per-patch augmentation draws: secret, i.i.d., independent of the data
    clip, c = float(config.dp_clip), COUNT_SCALE * float(config.dp_clip)
    sums, counts = None, torch.zeros(num_classes, dtype=torch.float64)
    if sums_cache:
        sums, counts = sums_cache["sums"].clone(), sums_cache["counts"].clone()
    bar = progress_bar(total=len(x_real), desc="dm-dp embed", disable=not progress or sums is not None)
    with torch.no_grad():
        for s in range(0, 0 if sums_cache else len(x_real), batch):
            xb, yb = x_real[s:s + batch], y_real[s:s + batch].cpu()
            e = augmented_embedding(nets, xb, aug, config.dp_augs, gen, config.dm_layers, config.dp_pool)
            if centre is not None:
                e = e - centre
            e = clip_rows(e, clip).double().cpu()
            if sums is None:
                sums = torch.zeros(num_classes, e.shape[1], dtype=torch.float64)
            sums.index_add_(0, yb, e)
            counts += torch.bincount(yb, minlength=num_classes).double()
            bar.update(len(xb))
    bar.close()
    if sums_cache is not None and not sums_cache:
        sums_cache.update(sums=sums.clone(), counts=counts.clone())
    sens = math.sqrt(clip ** 2 + c ** 2)
    std = noise_multiplier * sens
    noisy_sums = sums + std * torch.randn(sums.shape, generator=noise_gen, dtype=torch.float64)
    noisy_counts = (c * counts + std * torch.randn(counts.shape, generator=noise_gen, dtype=torch.float64)) / c
    del sums, counts    # the exact statistics go no further than this line
    means = noisy_sums / noisy_counts.clamp_min(1.0).unsqueeze(1)
    if centre is not None:
        means = means + centre.double().cpu()
    return {"targets": means.float(), "noisy_counts": noisy_counts, "sensitivity": sens, "count_value": c}


# ---------------------------------------------------------------------------------------------- public
def resolve_public_dir(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (REPO / p).exists():
        p = REPO / p          # presets name public data relative to the repository root
    if not p.is_dir():
        raise InputError(f"dm-dp: public_dir {path!r} is not a folder of public images")
    return p


def load_public_patches(path: str, size: int, scale: int) -> tuple[np.ndarray, list[str]]:
    """uint8 NHWC patches of ``size`` px cut (stride size / 2) from every image in ``path`` after a
    ``scale``-fold antialiased downscale (the Camelyon17 stain tiles are ~4x PCam's magnification)."""
    from PIL import Image

    from histodd_fed.patchset import IMAGE_SUFFIXES
    root = resolve_public_dir(path)
    files = sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    patches, names = [], []
    stride = max(1, size // 2)
    for f in files:
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.uint8)
        h, w = a.shape[0] // scale, a.shape[1] // scale
        if min(h, w) < size:
            continue
        if scale != 1:
            a = _resize_hw(a, h, w)
        for i in range(0, h - size + 1, stride):
            for j in range(0, w - size + 1, stride):
                patches.append(a[i:i + size, j:j + size])
                names.append(f"{f.name}:{i},{j}")
    if not patches:
        raise InputError(f"dm-dp: no public image in {root} gives a {size}-px patch after a {scale}x downscale")
    return np.stack(patches), names


def _resize_hw(a: np.ndarray, h: int, w: int) -> np.ndarray:
    import torch.nn.functional as F

    x = torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return y[0].round().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def pick_public(pub_emb: torch.Tensor, targets: torch.Tensor, ipc: int, how: str, rng: np.random.Generator) -> np.ndarray:
    """(num_classes, ipc) indices of public patches to start each class from: ``project`` - per class the
    patches furthest along (class's noisy mean - mean of the other classes' noisy means), distinct across
    classes (classes take turns); ``random`` - random distinct patches. Post-processing of the release."""
    k, n = targets.shape[0], pub_emb.shape[0]
    if n < k * ipc:
        raise InputError(f"dm-dp: {n} public patches for {k} x {ipc} initial images; give more public images")
    if how == "random":
        return rng.choice(n, size=k * ipc, replace=False).reshape(k, ipc)
    dirs = torch.stack([targets[j] - (targets.sum(0) - targets[j]) / max(k - 1, 1) for j in range(k)])
    scores = (pub_emb @ dirs.T).numpy()                  # (n, k)
    order = [list(np.argsort(-scores[:, j])) for j in range(k)]
    taken, picks = set(), [[] for _ in range(k)]
    for _ in range(ipc):
        for j in range(k):
            while order[j][0] in taken:
                order[j].pop(0)
            i = int(order[j].pop(0))
            taken.add(i)
            picks[j].append(i)
    return np.asarray(picks)


# ------------------------------------------------------------------------------------------------- run
@register("distribution-dp")
class DMDP(Objective):
    """dm-dp (``dp_epsilon > 0``): one DP release, then its own image loop (:func:`run_dm_dp`)."""

    method = "dm-dp"
    standalone = True

    @classmethod
    def run(cls, real, config, progress: bool = True):
        return run_dm_dp(real, config, progress)


def run_dm_dp(real, config, progress: bool = True, *, add_noise: bool = True,
              noise_gen: torch.Generator | None = None, sums_cache: dict | None = None):
    """Distil ``real`` with dm-dp; returns a ``DistillResult``. ``add_noise=False`` is the no-noise control
    of the benchmark (same pipeline, exact means; its meta ``dp`` is None and ``method`` ``dm-nodp``)."""
    from histodd_fed.augment import build_augmentation
    from histodd_fed.distill.engine import DistillResult, resolve_device
    from histodd_fed.logging_setup import progress as progress_bar
    from histodd_fed.patchset import PatchSet
    from histodd_fed.preprocess import ViewSpec, recorded_view, resize_images
    from histodd_fed.runconfig import config_hash

    config.validate()
    if not config.dp_epsilon:
        raise ConfigError("dm-dp: dp_epsilon is not set")
    device = resolve_device(config.device)
    t0 = time.perf_counter()
    k = real.num_classes
    sigma = calibrate_noise(config.dp_epsilon, config.dp_delta) if add_noise else 0.0
    eps_spent = accountant_epsilon(sigma, config.dp_delta) if add_noise else math.inf
    images = resize_images(real.images, config.image_size)
    view = (recorded_view(real) or ViewSpec(source_size=real.image_size)).with_size(config.image_size)
    x_real, y_real = PatchSet(images=images, labels=real.labels, class_names=real.class_names).to_tensors()
    x_real = x_real.to(device)
    aug = build_augmentation(config.augmentation)
    nets = [n.to(device) for n in make_nets(config, k)]

    # public patches: centre of the clipping and (init public) the starting images
    pub_x, centre, pub_emb, pub_names = None, None, None, None
    if config.public_dir:
        pub_u8, pub_names = load_public_patches(config.public_dir, config.image_size, config.public_scale)
        pub_x = torch.from_numpy(pub_u8).permute(0, 3, 1, 2).float().div(255.0).to(device)
        pgen = torch.Generator().manual_seed(int(config.seed) + 4242)
        with torch.no_grad():
            pub_emb = torch.cat([augmented_embedding(nets, pub_x[s:s + 256], aug, config.dp_augs, pgen, config.dm_layers, config.dp_pool)
                                 for s in range(0, len(pub_x), 256)]).cpu()
        centre = pub_emb.mean(0).to(device)

    # ---- the one DP release (the only read of the real patches)
    rel = private_class_means(x_real, y_real, k, nets, aug, config, centre, sigma, progress=progress,
                              noise_gen=noise_gen, sums_cache=sums_cache)
    del x_real, y_real, images
    targets = rel["targets"].to(device)            # (k, D)

    # ---- post-processing: initial images
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(int(config.seed))
    init_public = None
    if config.init == "public":
        picks = pick_public(pub_emb - centre.cpu(), rel["targets"] - centre.cpu(), config.ipc, config.public_pick, rng)
        x0 = pub_x[torch.from_numpy(picks.reshape(-1)).to(device)].clone()
        init_public = {"dir": str(config.public_dir), "pick": config.public_pick,
                       "patches": [pub_names[i] for i in picks.reshape(-1)]}
    else:
        x0 = torch.rand((k * config.ipc, 3, config.image_size, config.image_size), generator=gen).to(device)
    initial = x0.detach().cpu().clone()
    from histodd_fed.distill.drift import DriftRecorder

    drift = DriftRecorder(initial, init=config.init)    # to the starting (public / noise) images
    drift.record(0, initial)
    every = int(config.checkpoint_every) * int(config.inner_steps)

    # ---- post-processing: match the synthetic images' mean embedding to the noisy targets
    x_syn = x0.requires_grad_(True)
    opt = torch.optim.SGD([x_syn], lr=config.effective_lr_img(), momentum=config.momentum_img)
    total = int(config.outer_steps) * int(config.inner_steps)
    curve = []
    t_syn = time.perf_counter()
    bar = progress_bar(total=total, desc="dm-dp match", disable=not progress)
    for step in range(total):
        if config.lr_schedule == "cosine":
            opt.param_groups[0]["lr"] = config.effective_lr_img() * 0.5 * (1 + math.cos(math.pi * step / total))
        xa = aug(x_syn, gen) if aug.ops else x_syn
        e = embed(nets, xa, config.dm_layers, config.dp_pool).reshape(k, config.ipc, -1).mean(1)
        loss = (e - targets).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        x_syn.grad = torch.autograd.grad(loss, x_syn)[0]
        opt.step()
        with torch.no_grad():
            x_syn.clamp_(0.0, 1.0)
        lv = float(loss.detach()) / k
        if (every and (step + 1) % every == 0) or step + 1 == total:
            drift.record((step + 1) // int(config.inner_steps), x_syn)
        curve.append({"step": step, "stage": 0, "mean": lv, "first": lv, "last": lv})
        bar.update(1)
        bar.set_postfix(loss=f"{lv:.4g}")
    bar.close()
    with torch.no_grad():   # the final loss, without augmentation noise in the comparison's sense: one more draw
        xa = aug(x_syn, gen) if aug.ops else x_syn
        final = float((embed(nets, xa, config.dm_layers, config.dp_pool).reshape(k, config.ipc, -1).mean(1) - targets).pow(2).sum()) / k
    out = (x_syn.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    init_u8 = (initial.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    labels = np.repeat(np.arange(k), config.ipc).astype(np.int64)
    dp = None
    if add_noise:
        dp = {"epsilon": eps_spent, "delta": float(config.dp_delta), "accountant": ACCOUNTANT,
              "noise_multiplier": sigma, "clip": float(config.dp_clip), "mechanism": MECHANISM,
              "epsilon_requested": float(config.dp_epsilon), "unit": "patch", "adjacency": "add/remove",
              "count_value": rel["count_value"], "sensitivity": rel["sensitivity"],
              "embedding": {"nets": config.dp_nets, "augs": config.dp_augs, "layers": config.dm_layers,
                            "pool": config.dp_pool,
                            "centred_on_public": centre is not None},
              "noisy_class_counts": {real.class_names[j]: round(float(rel["noisy_counts"][j]), 1) for j in range(k)},
              "noisy_counts_note": "noisy (Gaussian mechanism output), not the real class counts"}
    meta = {
        "method": "dm-dp" if add_noise else "dm-nodp",
        "complete": True,
        "steps_done": total,
        "steps_total": total,
        "config": config.to_dict(),
        "config_sha256": config_hash(config),
        "device": str(device),
        "view": view.to_dict(),
        "dp": dp,
        "init": config.init,
        "init_public": init_public,
        "final_loss": final,
        "timings": {"matching_s": round(time.perf_counter() - t_syn, 3)},
        "loss_curve": curve,
        "drift": drift.summary(),
    }
    if not add_noise:
        meta["timings"]["total_s"] = round(time.perf_counter() - t0, 3)
    ps = PatchSet(images=out, labels=labels, class_names=list(real.class_names),
                  slide_index=np.full(len(labels), -1, np.int32), slide_ids=[], slide_labels={},
                  kind="synthetic", meta=meta)
    return DistillResult(ps, init_u8, drift.local())
