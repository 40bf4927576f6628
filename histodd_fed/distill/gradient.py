"""Gradient matching (``objective: gradient``, method ``histo-dd``): Histo-DD's per-class match of the CE
gradients of a real batch and of the class's synthetic images, under one siamese augmentation draw.

Paths: ``fast`` (every class in one augmentation call, class-stacked gradients), ``reference`` (the plain
per-class loop; batch-norm networks) and ``update: per_class`` (Algorithm 1's step per class). They draw
the same random numbers in the same order.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from histodd_fed.distill.matching import batched_matching_loss, class_matching_loss, supports_batched_matching
from histodd_fed.distill.objectives import Objective, StageInputs, register, sample_indices, siamese
from histodd_fed.stain.normalize import ImageStains

log = logging.getLogger(__name__)


@register("gradient")
class GradientMatching(Objective):
    """Histo-DD's gradient matching (Algorithm 1 of Cong et al.)."""

    method = "histo-dd"
    #: whether the batched (``matching: fast``) path may be used
    batched = True

    def __init__(self, config, net_template: torch.nn.Module, device: torch.device) -> None:
        super().__init__(config, net_template, device)
        self.fast = config.matching == "fast" and self.batched and supports_batched_matching(net_template)
        if config.matching == "fast" and self.batched and not self.fast:
            log.info("distill: %s has batch norm; using the per-class reference matching", config.model)
        self.per_class = "vmap" if device.type == "cuda" else "loop"

    def step(self, s: StageInputs, net, weights, aug, opt_img: torch.optim.Optimizer) -> torch.Tensor:
        if self.config.update == "per_class":
            return self.per_class_steps(s, net, weights, aug, opt_img)
        if self.fast:
            loss = self.fast_loss(s, net, weights, aug)
            self.joint_step(loss, s.x_syn, opt_img)
            return loss
        loss = torch.zeros((), device=s.x_syn.device)
        for k in range(len(s.groups)):
            loss = loss + self.class_loss(s, k, net, weights, aug)
        opt_img.zero_grad(set_to_none=True)
        loss.backward()
        opt_img.step()
        return loss

    def class_loss(self, s: StageInputs, k: int, net, weights, aug) -> torch.Tensor:
        """The reference matching loss of block ``k``: its real batch, then one siamese draw."""
        g = s.groups[k]
        ridx = torch.from_numpy(sample_indices(g.real_idx, self.config.batch_real, s.rng)).to(s.x_real.device)
        sl = slice(int(s.offsets[k]), int(s.offsets[k + 1]))
        xr, xs = siamese(aug, s.x_real[ridx], s.x_syn[sl], ridx, s.real_stains, s.syn_stains, sl, s.gen)
        return class_matching_loss(net, weights, xr, s.y_real[ridx], xs, s.y_syn[k], self.config.distance)

    def per_class_steps(self, s: StageInputs, net, weights, aug, opt_img: torch.optim.Optimizer) -> torch.Tensor:
        """Algorithm 1's update: one SGD-momentum step of each class's images on that class's loss alone.

        The momentum buffer lives in ``opt_img``'s state (so checkpoints keep it); a class's step only
        touches its own rows of the image tensor and of the buffer. Returns the summed loss."""
        x_syn = s.x_syn
        lr = opt_img.param_groups[0]["lr"]
        state = opt_img.state[x_syn]
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(x_syn)
        buf = state["momentum_buffer"]
        total = torch.zeros((), device=x_syn.device)
        for k in range(len(s.groups)):
            loss = self.class_loss(s, k, net, weights, aug)
            grad = torch.autograd.grad(loss, x_syn)[0]
            sl = slice(int(s.offsets[k]), int(s.offsets[k + 1]))
            with torch.no_grad():
                buf[sl].mul_(self.config.momentum_img).add_(grad[sl])
                x_syn[sl].sub_(lr * buf[sl])
            total = total + loss.detach()
        return total

    def fast_loss(self, s: StageInputs, net, weights, aug) -> torch.Tensor:
        """One inner step's matching loss over all classes of a stage, batched.

        Draws exactly what the reference loop draws, in the same order (per class: the real batch from
        ``rng``, then one siamese augmentation draw from ``gen``), then augments every class's real and
        synthetic images in ONE call (each image gets its class's draw) and matches class-stacked gradients.
        """
        config, offsets = self.config, s.offsets
        k, b, m = len(s.groups), config.batch_real, config.ipc
        ridx_np, draws = [], []
        for g in s.groups:
            ridx_np.append(sample_indices(g.real_idx, b, s.rng))
            if aug.ops:
                draws.append(aug.sample(1, s.gen, siamese=True))
        ridx = torch.from_numpy(np.concatenate(ridx_np)).to(s.x_real.device)
        xr, xs = s.x_real[ridx], s.x_syn[offsets[0]:offsets[-1]]
        if aug.ops:
            from histodd_fed.augment.dsa import AugDraw

            vals = {}
            for key in draws[0].values:
                per = torch.cat([d.values[key] for d in draws])                      # (K, ...)
                vals[key] = torch.cat([per.repeat_interleave(b, dim=0), per.repeat_interleave(m, dim=0)])
            stains = None
            if s.real_stains is not None:
                rs = s.real_stains.index(ridx)
                ss = s.syn_stains.index(slice(offsets[0], offsets[-1]))
                stains = ImageStains(torch.cat([rs.matrices, ss.matrices]), torch.cat([rs.max_conc, ss.max_conc]))
            both = aug.apply(torch.cat([xr, xs]), AugDraw(vals, siamese=False), stains)
            xr, xs = both[:k * b], both[k * b:]
        shape = xr.shape[1:]
        return batched_matching_loss(net, weights, xr.reshape(k, b, *shape), s.y_real[ridx].reshape(k, b),
                                     xs.reshape(k, m, *shape), torch.stack(s.y_syn), config.distance, self.per_class)
