"""Differentially private gradient matching (as Private Set Generation, Chen et al., NeurIPS 2022).

The only way real patches reach the synthetic images is through the real-batch gradient of each
matching step. In DP mode that gradient is made private:

- each class's real batch is drawn by Poisson sampling (every patch of the class independently,
  with probability ``q = batch_real / n_class``);
- every example's gradient (over the matched weights, after its siamese augmentation, which is
  drawn independently of the data) is clipped to L2 norm ``clip``;
- the clipped gradients are summed, Gaussian noise N(0, (noise * clip)^2) is added to every
  coordinate, and the sum is divided by the expected batch size ``q * n_class``.

Everything else must not touch real data: the synthetic images start from noise, the networks are
freshly initialised (no pool pre-training on real patches), network updates in the inner loop use
the synthetic images, and no stain template is estimated from real patches (DistillConfig.validate
enforces this). The privacy loss is accounted with Opacus's RDP accountant: a class's patches take
part in ``outer_steps * inner_steps`` sampled Gaussian mechanisms; the classes are disjoint sets of
patches, so the set's guarantee is the per-class one (parallel composition). The unit is one patch
(patch-level DP): a patient with many patches is protected by group privacy only, which is weaker.
The noise comes from torch's seeded generator (reproducible runs), not a cryptographic RNG.

The objective is :class:`DPGradientMatching` (registered as ``gradient-dp``, chosen by ``dp_noise > 0``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from histodd_fed.distill.gradient import GradientMatching
from histodd_fed.distill.initialisation import Group
from histodd_fed.distill.matching import gradient_distance
from histodd_fed.distill.objectives import StageInputs, register, siamese
from histodd_fed.errors import ConfigError


def dp_real_gradient(model: torch.nn.Module, weights: Sequence[torch.nn.Parameter], x: torch.Tensor, y: torch.Tensor,
                     *, clip: float, noise: float, expected_batch: float, gen: torch.Generator) -> list[torch.Tensor]:
    """Clipped, noised mean of per-example CE gradients over ``weights`` (one tensor per weight)."""
    from torch.func import functional_call, grad, vmap

    from histodd_fed.distill.matching import functional_split

    w_names, fixed, w = functional_split(model, weights)

    def ce(wd, xi, yi):
        return F.cross_entropy(functional_call(model, {**fixed, **wd}, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    if len(x):
        with torch.no_grad():
            per = vmap(grad(ce), in_dims=(None, 0, 0))(w, x, y)                      # {name: (B, *shape)}
        norms = torch.sqrt(sum(per[n].flatten(1).pow(2).sum(1) for n in w_names))    # (B,)
        scale = (clip / norms.clamp_min(1e-12)).clamp(max=1.0)
        sums = [(per[n] * scale.view(-1, *[1] * (per[n].dim() - 1))).sum(0) for n in w_names]
    else:
        sums = [torch.zeros_like(w[n]) for n in w_names]
    out = []
    for s in sums:
        z = torch.randn(s.shape, generator=gen).to(s.device, s.dtype)
        out.append((s + noise * clip * z) / expected_batch)
    return out


def poisson_batch(idx: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson sampling: each index kept independently with probability ``rate``."""
    return idx[rng.random(len(idx)) < rate]


def epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    """(epsilon at ``delta``) of ``steps`` sampled Gaussian mechanisms, from Opacus's RDP accountant."""
    try:
        from opacus.accountants import RDPAccountant
    except ImportError as exc:  # pragma: no cover - opacus is pinned in requirements.lock
        raise ConfigError("DP distillation needs the opacus package (pip install 'opacus>=1.5,<2') for its "
                          "privacy accountant") from exc
    acc = RDPAccountant()
    acc.history = [(float(noise), float(sample_rate), int(steps))]
    return float(acc.get_epsilon(delta=float(delta)))


def class_sample_rate(g: Group, config) -> float:
    """Poisson sampling rate of a class's real patches."""
    return min(1.0, config.batch_real / len(g.real_idx))


@register("gradient-dp")
class DPGradientMatching(GradientMatching):
    """DP gradient matching (``dp_noise > 0``, method ``histo-dd-dp``): the reference or per-class path with
    each class's real gradient Poisson-sampled, clipped per example and noised; the network trains on the
    synthetic images only."""

    method = "histo-dd-dp"
    batched = False

    def class_loss(self, s: StageInputs, k: int, net, weights, aug) -> torch.Tensor:
        config, g = self.config, s.groups[k]
        rate = class_sample_rate(g, config)
        ridx = torch.from_numpy(poisson_batch(g.real_idx, rate, s.rng)).to(s.x_real.device)
        sl = slice(int(s.offsets[k]), int(s.offsets[k + 1]))
        xr, xs = siamese(aug, s.x_real[ridx], s.x_syn[sl], ridx, s.real_stains, s.syn_stains, sl, s.gen)
        g_real = dp_real_gradient(net, weights, xr, s.y_real[ridx], clip=config.dp_clip, noise=config.dp_noise,
                                  expected_batch=rate * len(g.real_idx), gen=s.gen)
        g_syn = torch.autograd.grad(F.cross_entropy(net(xs), s.y_syn[k]), weights, create_graph=True)
        return gradient_distance(g_real, g_syn, config.distance)

    def net_step(self, s: StageInputs, net, net_opt: torch.optim.Optimizer, aug) -> None:
        """CE on the (augmented) synthetic images: the network never trains on real patches."""
        xb, yb = s.x_syn.detach(), torch.cat(s.y_syn)
        if aug.ops:
            xb = aug(xb, s.gen)
        nl = F.cross_entropy(net(xb), yb)
        net_opt.zero_grad(set_to_none=True)
        nl.backward()
        net_opt.step()

    def dp_meta(self, stages: list[list[Group]], steps_done: int) -> dict:
        """Per class, ``steps_done * inner_steps`` sampled Gaussian mechanisms at rate ``batch_real / n_class``;
        the set's epsilon is the largest (parallel composition over the disjoint classes), unit one patch."""
        config = self.config
        steps = int(steps_done) * config.inner_steps
        per_class = []
        for g in stages[0]:
            rate = class_sample_rate(g, config)
            per_class.append({"label": g.label, "n": int(len(g.real_idx)), "sample_rate": rate,
                              "epsilon": epsilon(config.dp_noise, rate, steps, config.dp_delta) if steps else 0.0})
        return {"mechanism": "per-example clipping + Gaussian noise on Poisson-sampled real-batch gradients",
                "unit": "patch", "noise_multiplier": config.dp_noise, "clip": config.dp_clip, "delta": config.dp_delta,
                "steps": steps, "accountant": "opacus RDPAccountant", "per_class": per_class,
                "epsilon": max(c["epsilon"] for c in per_class)}
