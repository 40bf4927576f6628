"""Histo-DD distillation (Algorithm 1 of Cong et al.): gradient matching with a model pool, model
augmentation and differentiable siamese augmentation including stain normalisation.

Patch-level mode distils ``ipc`` images per class over all slides (one *stage*). Slide-level mode
(``per_slide``) runs one stage per slide, distilling ``ipc`` images per class present in that
slide from that slide's patches, sharing the model pool. Progress is checkpointed into
``work_dir/checkpoints/<key>.pt`` (tensors only, loaded with ``weights_only=True``) every
``checkpoint_every`` outer steps; a re-run with the same data and config continues from there.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from histodd_fed.atomic import atomic_write_bytes
from histodd_fed.augment import build_augmentation
from histodd_fed.content_hash import data_hash  # noqa: F401  (re-exported: histodd_fed.distill.data_hash)
from histodd_fed.distill.config import DistillConfig
from histodd_fed.distill.initialisation import Group, herding_init, initial_images, plan_stages
from histodd_fed.distill.matching import batched_matching_loss, class_matching_loss, supports_batched_matching
from histodd_fed.distill.model_aug import augment_model, matched_weights
from histodd_fed.distill.pool import build_model, get_pool
from histodd_fed.distill.privacy_term import PrivacyGuard
from histodd_fed.errors import InputError
from histodd_fed.formation import META_KEY as FORMATION_KEY
from histodd_fed.formation import decode
from histodd_fed.logging_setup import progress as progress_bar
from histodd_fed.patchset import PatchSet
from histodd_fed.preprocess import ViewSpec, recorded_view, resize_images
from histodd_fed.runconfig import config_hash
from histodd_fed.stain.normalize import ImageStains, StainContext

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sample(idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(idx, size=n, replace=len(idx) < n)


def _save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    buf = io.BytesIO()
    torch.save({"tensors": {k: v.detach().cpu() for k, v in tensors.items()},
                "info_json": json.dumps(info)}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return blob["tensors"], json.loads(blob["info_json"])
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is reported the same way
        raise InputError(f"{path}: unreadable distillation checkpoint ({type(exc).__name__}: {exc})") from exc


def _fast_step_loss(net, weights, stage: list[Group], x_syn: torch.Tensor, syn_st: ImageStains | None,
                    offsets: np.ndarray, y_syn: list[torch.Tensor], x_real: torch.Tensor, y_real: torch.Tensor,
                    real_stains: ImageStains | None, aug, config: DistillConfig, rng: np.random.Generator,
                    gen: torch.Generator, per_class: str) -> torch.Tensor:
    """One inner step's matching loss over all classes of a stage, batched.

    Draws exactly what the reference loop draws, in the same order (per class: the real batch from
    ``rng``, then one siamese augmentation draw from ``gen``), then augments every class's real and
    synthetic images in ONE call (each image gets its class's draw) and matches class-stacked gradients.
    """
    k, b, m = len(stage), config.batch_real, config.ipc
    ridx_np, draws = [], []
    for g in stage:
        ridx_np.append(_sample(g.real_idx, b, rng))
        if aug.ops:
            draws.append(aug.sample(1, gen, siamese=True))
    ridx = torch.from_numpy(np.concatenate(ridx_np)).to(x_real.device)
    xr, xs = x_real[ridx], x_syn[offsets[0]:offsets[-1]]
    if aug.ops:
        from histodd_fed.augment.dsa import AugDraw

        vals = {}
        for key in draws[0].values:
            per = torch.cat([d.values[key] for d in draws])                      # (K, ...)
            vals[key] = torch.cat([per.repeat_interleave(b, dim=0), per.repeat_interleave(m, dim=0)])
        stains = None
        if real_stains is not None:
            rs = real_stains.index(ridx)
            ss = syn_st.index(slice(offsets[0], offsets[-1]))
            stains = ImageStains(torch.cat([rs.matrices, ss.matrices]), torch.cat([rs.max_conc, ss.max_conc]))
        both = aug.apply(torch.cat([xr, xs]), AugDraw(vals, siamese=False), stains)
        xr, xs = both[:k * b], both[k * b:]
    shape = xr.shape[1:]
    return batched_matching_loss(net, weights, xr.reshape(k, b, *shape), y_real[ridx].reshape(k, b),
                                 xs.reshape(k, m, *shape), torch.stack(y_syn), config.distance, per_class)


def _siamese(aug, xr, xs, ridx, real_stains, syn_st, sl: slice, gen: torch.Generator):
    """One siamese draw applied to a class's real batch ``xr`` (indices ``ridx``) and its synthetic block
    ``xs`` (rows ``sl``); unchanged when the strategy has no ops."""
    if not aug.ops:
        return xr, xs
    draw = aug.sample(1, gen, siamese=True)
    return (aug.apply(xr, draw, None if real_stains is None else real_stains.index(ridx)),
            aug.apply(xs, draw, None if syn_st is None else syn_st.index(sl)))


def _dp_rate(g: Group, config: DistillConfig) -> float:
    """Poisson sampling rate of a class's real patches in DP mode."""
    return min(1.0, config.batch_real / len(g.real_idx))


def _class_loss(net, weights, g: Group, k: int, x_syn, syn_st, offsets, y_syn, x_real, y_real, real_stains, aug,
                config: DistillConfig, rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
    """The reference matching loss of class block ``k`` (its real batch and one siamese draw); in DP mode
    the real gradient is Poisson-sampled, clipped per example and noised (histodd_fed.distill.dp)."""
    dp = config.dp_noise > 0
    if dp:
        from histodd_fed.distill.dp import poisson_batch

        rate = _dp_rate(g, config)
        ridx = torch.from_numpy(poisson_batch(g.real_idx, rate, rng)).to(x_real.device)
    else:
        ridx = torch.from_numpy(_sample(g.real_idx, config.batch_real, rng)).to(x_real.device)
    sl = slice(int(offsets[k]), int(offsets[k + 1]))
    xr, xs = _siamese(aug, x_real[ridx], x_syn[sl], ridx, real_stains, syn_st, sl, gen)
    if dp:
        from histodd_fed.distill.dp import dp_real_gradient
        from histodd_fed.distill.matching import gradient_distance

        g_real = dp_real_gradient(net, weights, xr, y_real[ridx], clip=config.dp_clip, noise=config.dp_noise,
                                  expected_batch=rate * len(g.real_idx), gen=gen)
        g_syn = torch.autograd.grad(F.cross_entropy(net(xs), y_syn[k]), weights, create_graph=True)
        return gradient_distance(g_real, g_syn, config.distance)
    return class_matching_loss(net, weights, xr, y_real[ridx], xs, y_syn[k], config.distance)


def _dm_loss(net, stage: list[Group], x_syn, syn_st, offsets, x_real, real_stains, aug, config: DistillConfig,
             rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
    """Distribution matching: sum over classes of :func:`_dm_distance` between the embeddings
    (:func:`_dm_embedding`: DM's ``features``, or every block's output) of an augmented real batch and of
    the class's synthetic images, one siamese draw per class."""
    embed = _dm_embedding(net, config)
    total = torch.zeros((), device=x_syn.device)
    f = config.formation
    for k, g in enumerate(stage):
        ridx = torch.from_numpy(_sample(g.real_idx, config.batch_real, rng)).to(x_real.device)
        xs = decode(x_syn[int(offsets[k]):int(offsets[k + 1])], f)      # the class's training images
        sl = slice(int(offsets[k]) * f * f, int(offsets[k + 1]) * f * f)
        xr, xs = _siamese(aug, x_real[ridx], xs, ridx, real_stains, syn_st, sl, gen)
        with torch.no_grad():
            fr = embed(xr)
        total = total + _dm_distance(fr, embed(xs), config.dm_moments)
    return total


def _dm_embedding(net, config: DistillConfig):
    """``x -> [embedding, ...]``: the ``features`` output (``dm_layers: last``), or the flattened output of
    every block of the network's ``body`` (``all``; a block ends at a pooling layer)."""
    if config.dm_layers == "last":
        embed = getattr(net, "features", None)
        if embed is None:
            raise InputError(f"distribution matching needs a network with a features() embedding, not {config.model}")
        return lambda x: [embed(x).flatten(1)]
    body = getattr(net, "body", None)
    if not isinstance(body, torch.nn.Sequential):
        raise InputError(f"dm_layers 'all' needs a network with a Sequential body of blocks (convnet), not {config.model}")

    def blocks(x):
        outs = []
        for layer in body:
            x = layer(x)
            if isinstance(layer, (torch.nn.AvgPool2d, torch.nn.MaxPool2d)):
                outs.append(x.flatten(1))
        return outs or [x.flatten(1)]
    return blocks


def _dm_distance(real: list[torch.Tensor], syn: list[torch.Tensor], moments: int) -> torch.Tensor:
    """Mean over the matched embeddings of the squared L2 distance between the real and synthetic batch
    means (and mean squares when ``moments`` is 2), each layer scaled by (last layer's dim / its dim) so
    every layer weighs like the last; a single embedding gives DM's loss exactly."""
    d_last = real[-1].shape[1]
    total = torch.zeros((), device=syn[-1].device)
    for fr, fs in zip(real, syn):
        term = (fr.mean(0) - fs.mean(0)).pow(2).sum()
        if moments == 2:
            term = term + (fr.pow(2).mean(0) - fs.pow(2).mean(0)).pow(2).sum()
        total = total + term * (d_last / fr.shape[1])
    return total / len(real)


def _per_class_steps(net, weights, stage: list[Group], x_syn, syn_st, offsets, y_syn, x_real, y_real, real_stains, aug,
                     config: DistillConfig, rng, gen, opt_img) -> torch.Tensor:
    """Algorithm 1's update: one SGD-momentum step of each class's images on that class's loss alone.

    The momentum buffer lives in ``opt_img``'s state (so checkpoints keep it); a class's step only
    touches its own rows of the image tensor and of the buffer. Returns the summed loss."""
    lr = opt_img.param_groups[0]["lr"]
    state = opt_img.state[x_syn]
    if state.get("momentum_buffer") is None:
        state["momentum_buffer"] = torch.zeros_like(x_syn)
    buf = state["momentum_buffer"]
    total = torch.zeros((), device=x_syn.device)
    for k, g in enumerate(stage):
        loss = _class_loss(net, weights, g, k, x_syn, syn_st, offsets, y_syn, x_real, y_real, real_stains, aug,
                           config, rng, gen)
        grad = torch.autograd.grad(loss, x_syn)[0]
        sl = slice(int(offsets[k]), int(offsets[k + 1]))
        with torch.no_grad():
            buf[sl].mul_(config.momentum_img).add_(grad[sl])
            x_syn[sl].sub_(lr * buf[sl])
        total = total + loss.detach()
    return total


def _dp_meta(stages: list[list[Group]], config: DistillConfig, steps_done: int) -> dict | None:
    """The DP guarantee of a run (None when DP is off): per class, ``steps_done * inner_steps`` sampled
    Gaussian mechanisms at rate ``batch_real / n_class``; the set's epsilon is the largest (parallel
    composition over the disjoint classes), at the unit of one patch."""
    if config.dp_noise <= 0:
        return None
    from histodd_fed.distill.dp import epsilon

    steps = int(steps_done) * config.inner_steps
    per_class = []
    for g in stages[0]:
        rate = _dp_rate(g, config)
        per_class.append({"label": g.label, "n": int(len(g.real_idx)), "sample_rate": rate,
                          "epsilon": epsilon(config.dp_noise, rate, steps, config.dp_delta) if steps else 0.0})
    return {"mechanism": "per-example clipping + Gaussian noise on Poisson-sampled real-batch gradients",
            "unit": "patch", "noise_multiplier": config.dp_noise, "clip": config.dp_clip, "delta": config.dp_delta,
            "steps": steps, "accountant": "opacus RDPAccountant", "per_class": per_class,
            "epsilon": max(c["epsilon"] for c in per_class)}


def method_name(config: DistillConfig) -> str:
    """What made a set, honestly: ``histo-dd`` is the paper's gradient matching; ``dm`` distribution matching;
    ``-dp`` when the run is differentially private (dm-dp sets come from histodd_fed.distill.dm_dp)."""
    base = "dm" if config.objective == "distribution" else "histo-dd"
    return base + ("-dp" if config.dp_noise > 0 else "")


@dataclass
class DistillResult:
    """The synthetic set and the images it started from (uint8 NHWC, same order)."""

    patchset: PatchSet
    initial_images: np.ndarray


def distill(real: PatchSet, config: DistillConfig, work_dir: Path | None = None, progress: bool = True, *,
            stop_after_steps: int | None = None, resume: bool = True, candidate_check=None) -> PatchSet:
    """Distil ``real`` into a synthetic PatchSet (kind ``synthetic``, uint8); see :func:`run_distillation`."""
    return run_distillation(real, config, work_dir, progress, stop_after_steps=stop_after_steps,
                            resume=resume, candidate_check=candidate_check).patchset


def run_distillation(real: PatchSet, config: DistillConfig, work_dir: Path | None = None, progress: bool = True, *,
                     stop_after_steps: int | None = None, resume: bool = True,
                     candidate_check=None) -> DistillResult:
    """Distil ``real`` into a synthetic PatchSet (``ipc`` per class, or per class per slide).

    ``candidate_check`` (``set -> (passed, reason)``): the gate-aware choice of a best-of-K run
    (``candidate_gate``); given by the release layer (:mod:`histodd_fed.release.choose`).

    ``work_dir`` holds the model-pool cache and the checkpoints (None: nothing cached, no resume).
    ``stop_after_steps`` ends this call after that many outer steps (checkpointed first) for
    time-boxed runs; the returned set then has ``meta["complete"] = False`` and a later call resumes.
    ``resume=False`` discards a checkpoint of this data and config and starts from step 0.
    """
    t_start = time.perf_counter()
    config.validate()
    if len(real) == 0:
        raise InputError("distill: the real patch set is empty")
    if config.dp_epsilon > 0:   # DP distribution matching: one-shot DP mean embeddings (histodd_fed.distill.dm_dp)
        from histodd_fed.distill.dm_dp import run_dm_dp

        return run_dm_dp(real, config, progress)
    if config.candidates > 1:   # best of K on the centre's own held-out patches (histodd_fed.distill.select)
        if stop_after_steps is not None:
            raise InputError("distill: stop_after_steps is for single runs; best-of-K runs resume per candidate")
        from histodd_fed.distill.select import run_best_of

        return run_best_of(real, config, work_dir, progress, resume=resume, candidate_check=candidate_check)
    device = resolve_device(config.device)
    src_hash = data_hash(real)
    cfg_hash = config_hash(config.result_dict())
    run_key = hashlib.sha256(f"{src_hash}:{cfg_hash}".encode()).hexdigest()[:24]
    work_dir = None if work_dir is None else Path(work_dir)

    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(int(config.seed))

    # ---------------------------------------------------------------- data, stains, augmentation
    images = resize_images(real.images, config.image_size)
    src_view = recorded_view(real) or ViewSpec(source_size=real.image_size)
    view = src_view.with_size(config.image_size)
    x_real, y_real = PatchSet(images=images, labels=real.labels, class_names=real.class_names).to_tensors()
    x_real, y_real = x_real.to(device), y_real.to(device)
    t0 = time.perf_counter()
    aug_probe = build_augmentation(config.augmentation)
    stain_ctx, real_stains = None, None
    if aug_probe.uses_stains:
        stain_ctx = StainContext.from_images(images)
        real_stains = ImageStains.estimate(images).to(device)
    aug = build_augmentation(config.augmentation, stain=stain_ctx)
    # DSA 'S' mode: one op of the strategy per matching step
    single_augs = [build_augmentation(op, stain=stain_ctx) for op in aug.ops] if config.dsa_mode == "single" else []
    t_stains = time.perf_counter() - t0
    guard = PrivacyGuard.build(x_real, config) if config.privacy_step > 0 else None

    # ---------------------------------------------------------------- model pool
    pool = get_pool(config, real.num_classes, x_real, y_real, aug, real_stains, src_hash,
                    None if work_dir is None else work_dir / "pool", show_progress=progress)

    # ---------------------------------------------------------------- synthetic initialisation
    stages = plan_stages(real, config, rng)
    herding_meta = None
    if config.init == "herding":
        herding_meta = herding_init(stages, images, real, config, progress)
    syn, syn_stains = initial_images(stages, config, x_real, real_stains, stain_ctx, gen, device)
    initial = [s.detach().cpu().clone() for s in syn]
    steps_per_stage = [config.outer_steps if not config.per_slide else (config.slide_outer_steps or config.outer_steps)
                       for _ in stages]
    total_steps = int(sum(steps_per_stage))

    # ---------------------------------------------------------------- resume
    ckpt = None if work_dir is None else work_dir / "checkpoints" / f"{run_key}.pt"
    done, loss_curve, opt_state = 0, [], None
    if ckpt is not None and ckpt.exists() and not resume:
        log.info("distill: --no-resume: discarding checkpoint %s", ckpt)
        ckpt.unlink()
    if ckpt is not None and ckpt.exists():
        tensors, info = _load_checkpoint(ckpt)
        if info.get("run_key") != run_key or len(info.get("stage_sizes", [])) != len(syn):
            raise InputError(f"{ckpt}: checkpoint does not belong to this data and config")
        for i in range(len(syn)):
            syn[i] = tensors[f"syn_{i}"].to(device)
        gen.set_state(tensors["torch_rng"])
        rng.bit_generator.state = info["numpy_rng"]
        done, loss_curve = int(info["step"]), list(info["loss_curve"])
        if "momentum" in tensors:
            opt_state = tensors["momentum"].to(device)
        log.info("distill: resuming from %s at outer step %d/%d", ckpt, done, total_steps)

    # ---------------------------------------------------------------- outer loop
    net_template = build_model(config, real.num_classes).to(device)
    fast = config.matching == "fast" and supports_batched_matching(net_template) and config.dp_noise == 0
    if config.matching == "fast" and not fast:
        log.info("distill: %s has batch norm; using the per-class reference matching", config.model)
    per_class = "vmap" if device.type == "cuda" else "loop"
    t_loop = time.perf_counter()
    ran = 0
    bar = progress_bar(total=total_steps, initial=done, desc="distill", disable=not progress)
    stage_start = 0
    for s_i, (stage, n_steps) in enumerate(zip(stages, steps_per_stage)):
        stage_end = stage_start + n_steps
        if done >= stage_end:
            stage_start = stage_end
            continue
        x_syn = syn[s_i].detach().requires_grad_(True)
        syn[s_i] = x_syn
        opt_img = torch.optim.SGD([x_syn], lr=config.lr_img, momentum=config.momentum_img)
        if opt_state is not None and done > stage_start:
            opt_img.state[x_syn]["momentum_buffer"] = opt_state.clone()
        opt_state = None
        sizes = [config.ipc] * len(stage)
        offsets = np.cumsum([0] + sizes)
        y_syn = [torch.full((config.ipc,), g.label, dtype=torch.long, device=device) for g in stage]
        stage_real = np.concatenate([g.real_idx for g in stage])
        while done < stage_end:
            if stop_after_steps is not None and ran >= stop_after_steps:
                break
            t_step = time.perf_counter()
            net = copy.deepcopy(net_template)
            net.load_state_dict(pool.states[int(rng.integers(len(pool.states)))])
            augment_model(net, config.alpha, gen)
            net.train()
            weights = matched_weights(net)
            net_opt = torch.optim.SGD(net.parameters(), lr=config.lr_net, momentum=0.5)
            step_losses = []
            if config.lr_schedule == "cosine":
                opt_img.param_groups[0]["lr"] = config.lr_img * 0.5 * (1 + math.cos(math.pi * done / total_steps))
            for u in range(config.inner_steps):
                aug_u = aug
                if single_augs:
                    aug_u = single_augs[int(torch.randint(len(single_augs), (1,), generator=gen))]
                if config.objective == "distribution":
                    loss = _dm_loss(net, stage, x_syn, syn_stains[s_i], offsets, x_real, real_stains, aug_u, config,
                                    rng, gen)
                    opt_img.zero_grad(set_to_none=True)
                    x_syn.grad = torch.autograd.grad(loss, x_syn)[0]
                    opt_img.step()
                elif config.update == "per_class":
                    loss = _per_class_steps(net, weights, stage, x_syn, syn_stains[s_i], offsets, y_syn, x_real, y_real,
                                            real_stains, aug_u, config, rng, gen, opt_img)
                elif fast:
                    loss = _fast_step_loss(net, weights, stage, x_syn, syn_stains[s_i], offsets, y_syn, x_real, y_real,
                                           real_stains, aug_u, config, rng, gen, per_class)
                    opt_img.zero_grad(set_to_none=True)
                    x_syn.grad = torch.autograd.grad(loss, x_syn)[0]
                    opt_img.step()
                else:
                    loss = torch.zeros((), device=device)
                    for k, g in enumerate(stage):
                        loss = loss + _class_loss(net, weights, g, k, x_syn, syn_stains[s_i], offsets, y_syn, x_real,
                                                  y_real, real_stains, aug_u, config, rng, gen)
                    opt_img.zero_grad(set_to_none=True)
                    loss.backward()
                    opt_img.step()
                with torch.no_grad():
                    x_syn.clamp_(0.0, 1.0)
                if guard is not None:
                    guard.push(x_syn, config.privacy_step)
                step_losses.append(float(loss.detach()) / len(stage))
                if u == config.inner_steps - 1:
                    break
                for _ in range(config.net_steps):
                    if config.dp_noise > 0:  # DP: the network trains on the synthetic images, never on real ones
                        xb, yb = x_syn.detach(), torch.cat(y_syn)
                        if aug.ops:
                            xb = aug(xb, gen)
                        nl = F.cross_entropy(net(xb), yb)
                        net_opt.zero_grad(set_to_none=True)
                        nl.backward()
                        net_opt.step()
                        continue
                    bidx = torch.from_numpy(_sample(stage_real, config.batch_net, rng)).to(device)
                    xb = x_real[bidx]
                    if aug.ops:
                        xb = aug(xb, gen, stains=None if real_stains is None else real_stains.index(bidx))
                    nl = F.cross_entropy(net(xb), y_real[bidx])
                    net_opt.zero_grad(set_to_none=True)
                    nl.backward()
                    net_opt.step()
            loss_curve.append({"step": done, "stage": s_i, "mean": float(np.mean(step_losses)),
                               "first": step_losses[0], "last": step_losses[-1],
                               "seconds": round(time.perf_counter() - t_step, 4)})
            done += 1
            ran += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_curve[-1]['mean']:.4g}")
            stop_now = stop_after_steps is not None and ran >= stop_after_steps and done < total_steps
            if ckpt is not None and ((config.checkpoint_every and done % config.checkpoint_every == 0) or stop_now):
                tensors = {f"syn_{i}": t for i, t in enumerate(syn)}
                tensors["torch_rng"] = gen.get_state()
                buf = opt_img.state.get(x_syn, {}).get("momentum_buffer")
                if buf is not None and done < stage_end:
                    tensors["momentum"] = buf
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                _save_checkpoint(ckpt, tensors, {"run_key": run_key, "step": done, "loss_curve": loss_curve,
                                                 "numpy_rng": rng.bit_generator.state,
                                                 "stage_sizes": [int(t.shape[0]) for t in syn]})
        if stop_after_steps is not None and ran >= stop_after_steps and done < total_steps:
            break
        stage_start = stage_end
    bar.close()
    t_loop = time.perf_counter() - t_loop
    complete = done >= total_steps

    # ---------------------------------------------------------------- output
    out_imgs = torch.cat([s.detach().cpu() for s in syn]).clamp(0, 1)
    out_u8 = (out_imgs * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    init_u8 = (torch.cat(initial) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    labels = np.concatenate([[g.label] * config.ipc for stage in stages for g in stage]).astype(np.int64)
    slide_idx = np.concatenate([[g.slide] * config.ipc for stage in stages for g in stage]).astype(np.int32)
    meta = {
        "method": method_name(config),
        "complete": complete,
        "steps_done": done,
        "steps_total": total_steps,
        "config": config.to_dict(),
        "config_sha256": config_hash(config),
        "result_config_sha256": cfg_hash,
        "source_data_sha256": src_hash,
        "source_num_images": len(real),
        "source_class_counts": real.class_counts(),
        "device": str(device),
        "pool": {"key": pool.key, "reused": pool.reused, "train_seconds": round(pool.seconds, 3)},
        "stain_template": None if stain_ctx is None else stain_ctx.to_dict(),
        "view": view.to_dict(),
        "dp": _dp_meta(stages, config, done),
        **({FORMATION_KEY: {"factor": config.formation}} if config.formation > 1 else {}),
        "init": config.init,
        "init_herding": herding_meta,
        "init_source_indices": [int(i) for stage in stages for g in stage for i in g.init_idx],
        "timings": {"stains_s": round(t_stains, 3), "pool_s": round(pool.seconds, 3),
                    "matching_s": round(t_loop, 3), "total_s": round(time.perf_counter() - t_start, 3),
                    "outer_steps_this_call": ran},
        "loss_curve": loss_curve,
    }
    ps = PatchSet(
        images=out_u8, labels=labels, class_names=list(real.class_names),
        slide_index=slide_idx if config.per_slide else np.full(len(labels), -1, np.int32),
        slide_ids=list(real.slide_ids) if config.per_slide else [],
        slide_labels=dict(real.slide_labels) if config.per_slide else {},
        kind="synthetic", meta=meta,
    )
    return DistillResult(ps, init_u8)
