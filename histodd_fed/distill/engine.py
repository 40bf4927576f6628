"""The distillation run loop: ``run_distillation(real, config)`` with the objective the config names
(:mod:`histodd_fed.distill.objectives`), a model pool, model augmentation and differentiable siamese
augmentation including stain normalisation.

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

from histodd_fed.atomic import atomic_write_bytes
from histodd_fed.augment import build_augmentation
from histodd_fed.content_hash import data_hash
from histodd_fed.distill.config import DistillConfig
from histodd_fed.distill.drift import DriftRecorder
from histodd_fed.distill.initialisation import herding_init, initial_images, plan_stages, stacked_mix
from histodd_fed.distill.model_aug import augment_model, matched_weights
from histodd_fed.distill.objectives import StageInputs, get_objective
from histodd_fed.distill.pool import build_model, get_pool, input_stats
from histodd_fed.distill.privacy_term import PrivacyGuard
from histodd_fed.errors import InputError
from histodd_fed.formation import META_KEY as FORMATION_KEY
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


@dataclass
class DistillResult:
    """The synthetic set, the images it started from (uint8 NHWC, same order) and the per-image drift
    record that stays on the centre's disk (:meth:`histodd_fed.distill.drift.DriftRecorder.local`)."""

    patchset: PatchSet
    initial_images: np.ndarray
    drift_local: dict | None = None


def distill(real: PatchSet, config: DistillConfig, work_dir: Path | None = None, progress: bool = True, *,
            stop_after_steps: int | None = None, resume: bool = True, candidate_check=None,
            workers: int = 1) -> PatchSet:
    """Distil ``real`` into a synthetic PatchSet (kind ``synthetic``, uint8); see :func:`run_distillation`."""
    return run_distillation(real, config, work_dir, progress, stop_after_steps=stop_after_steps,
                            resume=resume, candidate_check=candidate_check, workers=workers).patchset


def run_distillation(real: PatchSet, config: DistillConfig, work_dir: Path | None = None, progress: bool = True, *,
                     stop_after_steps: int | None = None, resume: bool = True,
                     candidate_check=None, workers: int = 1) -> DistillResult:
    """Distil ``real`` into a synthetic PatchSet (``ipc`` per class, or per class per slide).

    ``candidate_check`` (``set -> (passed, reason)``): the gate-aware choice of a best-of-K run
    (``candidate_gate``); given by the release layer (:mod:`histodd_fed.release.choose`).

    ``work_dir`` holds the model-pool cache and the checkpoints (None: nothing cached, no resume).
    ``stop_after_steps`` ends this call after that many outer steps (checkpointed first) for
    time-boxed runs; the returned set then has ``meta["complete"] = False`` and a later call resumes.
    ``resume=False`` discards a checkpoint of this data and config and starts from step 0.
    ``workers`` > 1: a best-of-K run distils that many candidates at once, each in its own process
    (:func:`histodd_fed.distill.select.run_best_of`); a single run ignores it.
    """
    t_start = time.perf_counter()
    config.validate()
    if len(real) == 0:
        raise InputError("distill: the real patch set is empty")
    objective_cls = get_objective(config)
    if objective_cls.standalone:   # e.g. dm-dp: one-shot DP mean embeddings (histodd_fed.distill.dm_dp)
        return objective_cls.run(real, config, progress)
    if config.candidates > 1:   # best of K on the centre's own held-out patches (histodd_fed.distill.select)
        if stop_after_steps is not None:
            raise InputError("distill: stop_after_steps is for single runs; best-of-K runs resume per candidate")
        from histodd_fed.distill.select import run_best_of

        return run_best_of(real, config, work_dir, progress, resume=resume, candidate_check=candidate_check,
                           workers=workers)
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
    norm = input_stats(config, x_real)     # input normalisation inside the networks (None: off)
    pool = get_pool(config, real.num_classes, x_real, y_real, aug, real_stains, src_hash,
                    None if work_dir is None else work_dir / "pool", show_progress=progress, norm=norm)

    # ---------------------------------------------------------------- synthetic initialisation
    stages = plan_stages(real, config, rng)
    herding_meta = None
    if config.init == "herding":
        herding_meta = herding_init(stages, images, real, config, progress)
    syn, syn_stains = initial_images(stages, config, x_real, real_stains, stain_ctx, gen, device)
    initial = [s.detach().cpu().clone() for s in syn]
    mixed = config.init in ("mixture", "mosaic") and config.formation == 1
    drift = DriftRecorder(torch.cat(initial), stacked_mix([g for stage in stages for g in stage])
                          if mixed else None, x_real, config.init)
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
        drift.restore(info.get("drift"))
        if "momentum" in tensors:
            opt_state = tensors["momentum"].to(device)
        log.info("distill: resuming from %s at outer step %d/%d", ckpt, done, total_steps)

    if done == 0:
        drift.record(0, torch.cat(syn))

    # ---------------------------------------------------------------- outer loop
    net_template = build_model(config, real.num_classes, norm).to(device)
    lr_img = config.effective_lr_img()
    objective = objective_cls(config, net_template, device)
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
        opt_img = torch.optim.SGD([x_syn], lr=lr_img, momentum=config.momentum_img)
        if opt_state is not None and done > stage_start:
            opt_img.state[x_syn]["momentum_buffer"] = opt_state.clone()
        opt_state = None
        sizes = [config.ipc] * len(stage)
        offsets = np.cumsum([0] + sizes)
        y_syn = [torch.full((config.ipc,), g.label, dtype=torch.long, device=device) for g in stage]
        inputs = StageInputs(stage, x_syn, syn_stains[s_i], offsets, y_syn, x_real, y_real, real_stains,
                             np.concatenate([g.real_idx for g in stage]), rng, gen)
        while done < stage_end:
            if stop_after_steps is not None and ran >= stop_after_steps:
                break
            t_step = time.perf_counter()
            net = copy.deepcopy(net_template)
            net.load_state_dict(pool.states[int(rng.integers(len(pool.states)))])
            augment_model(net, config.alpha, gen)
            net.train()
            weights = matched_weights(net, fc=config.match_fc)
            net_opt = torch.optim.SGD(net.parameters(), lr=config.lr_net, momentum=0.5)
            step_losses = []
            if config.lr_schedule == "cosine":
                opt_img.param_groups[0]["lr"] = lr_img * 0.5 * (1 + math.cos(math.pi * done / total_steps))
            for u in range(config.inner_steps):
                aug_u = aug
                if single_augs:
                    aug_u = single_augs[int(torch.randint(len(single_augs), (1,), generator=gen))]
                loss = objective.step(inputs, net, weights, aug_u, opt_img)
                with torch.no_grad():
                    x_syn.clamp_(0.0, 1.0)
                if guard is not None:
                    guard.push(x_syn, config.privacy_step)
                step_losses.append(float(loss.detach()) / len(stage))
                if u == config.inner_steps - 1:
                    break
                for _ in range(config.net_steps):
                    objective.net_step(inputs, net, net_opt, aug)
            loss_curve.append({"step": done, "stage": s_i, "mean": float(np.mean(step_losses)),
                               "first": step_losses[0], "last": step_losses[-1],
                               "seconds": round(time.perf_counter() - t_step, 4)})
            done += 1
            ran += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_curve[-1]['mean']:.4g}")
            if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == total_steps:
                drift.record(done, torch.cat(syn))
            stop_now = stop_after_steps is not None and ran >= stop_after_steps and done < total_steps
            if ckpt is not None and ((config.checkpoint_every and done % config.checkpoint_every == 0) or stop_now):
                tensors = {f"syn_{i}": t for i, t in enumerate(syn)}
                tensors["torch_rng"] = gen.get_state()
                buf = opt_img.state.get(x_syn, {}).get("momentum_buffer")
                if buf is not None and done < stage_end:
                    tensors["momentum"] = buf
                ckpt.parent.mkdir(parents=True, exist_ok=True)
                _save_checkpoint(ckpt, tensors, {"run_key": run_key, "step": done, "loss_curve": loss_curve,
                                                 "drift": drift.state(), "numpy_rng": rng.bit_generator.state,
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
        "method": objective.method,
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
        "lr_img_effective": lr_img,
        "input_norm": None if norm is None else {"kind": config.input_norm, "mean": norm[0], "std": norm[1]},
        "dp": objective.dp_meta(stages, done),
        **({FORMATION_KEY: {"factor": config.formation}} if config.formation > 1 else {}),
        "init": config.init,
        "init_herding": herding_meta,
        "init_source_indices": [int(i) for stage in stages for g in stage for i in g.init_idx],
        **({"slide_groups_widened": [{"slide": real.slide_ids[g.slide], "class": real.class_names[g.label],
                                      "own": int(len(g.real_idx) - g.borrowed), "borrowed": int(g.borrowed)}
                                     for stage in stages for g in stage if g.borrowed]} if config.per_slide else {}),
        "timings": {"stains_s": round(t_stains, 3), "pool_s": round(pool.seconds, 3),
                    "matching_s": round(t_loop, 3), "total_s": round(time.perf_counter() - t_start, 3),
                    "outer_steps_this_call": ran},
        "loss_curve": loss_curve,
        "drift": drift.summary(),
    }
    ps = PatchSet(
        images=out_u8, labels=labels, class_names=list(real.class_names),
        slide_index=slide_idx if config.per_slide else np.full(len(labels), -1, np.int32),
        slide_ids=list(real.slide_ids) if config.per_slide else [],
        slide_labels=dict(real.slide_labels) if config.per_slide else {},
        kind="synthetic", meta=meta,
    )
    return DistillResult(ps, init_u8, drift.local())
