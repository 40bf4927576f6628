"""The matching objectives of the run loop (:mod:`histodd_fed.distill.engine`), looked up by name.

An objective is a subclass of :class:`Objective` in its own module, registered with ``@register(name)``;
``MODULES`` lists those modules. A config runs the objective :func:`objective_name` gives:
``config.objective``, or ``<objective>-dp`` when a DP knob is set (``dp_noise``: DP gradient matching,
``dp_epsilon``: dm-dp).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from histodd_fed.distill.initialisation import Group
from histodd_fed.errors import ConfigError
from histodd_fed.stain.normalize import ImageStains

#: the modules (under histodd_fed.distill) that register objectives: one line per module
MODULES = ("gradient", "distribution", "dp", "dm_dp")

_REGISTRY: dict[str, type[Objective]] = {}


def register(name: str):
    """Class decorator: make an :class:`Objective` subclass available as ``name``."""
    def add(cls: type[Objective]) -> type[Objective]:
        if _REGISTRY.get(name, cls) is not cls:
            raise ValueError(f"objective {name!r} is registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return add


def objectives() -> dict[str, type[Objective]]:
    """name -> objective class, every module of ``MODULES`` imported."""
    for module in MODULES:
        importlib.import_module(f"histodd_fed.distill.{module}")
    return dict(_REGISTRY)


def config_objectives() -> tuple[str, ...]:
    """The names ``config.objective`` may take (the DP variants are chosen by their knobs instead)."""
    return tuple(n for n in objectives() if not n.endswith("-dp"))


def objective_name(config) -> str:
    """The registered name a config runs."""
    return config.objective + ("-dp" if config.dp_noise > 0 or config.dp_epsilon > 0 else "")


def get_objective(config) -> type[Objective]:
    """The objective class a config runs."""
    name = objective_name(config)
    found = objectives().get(name)
    if found is None:
        raise ConfigError(f"distill config: no objective {name!r} is registered (known: {sorted(_REGISTRY)})")
    return found


def sample_indices(idx: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` of ``idx`` drawn from ``rng``, without replacement when there are enough."""
    return rng.choice(idx, size=n, replace=len(idx) < n)


def siamese(aug, xr, xs, ridx, real_stains, syn_st, sl: slice, gen: torch.Generator):
    """One siamese draw applied to a class's real batch ``xr`` (indices ``ridx``) and its synthetic block
    ``xs`` (rows ``sl``); unchanged when the strategy has no ops."""
    if not aug.ops:
        return xr, xs
    draw = aug.sample(1, gen, siamese=True)
    return (aug.apply(xr, draw, None if real_stains is None else real_stains.index(ridx)),
            aug.apply(xs, draw, None if syn_st is None else syn_st.index(sl)))


@dataclass
class StageInputs:
    """What an objective sees of one stage: its class blocks, their synthetic images and the real tensors."""

    groups: list[Group]
    x_syn: torch.Tensor                 # the stage's stored synthetic images (requires grad)
    syn_stains: ImageStains | None      # per training (decoded) synthetic image
    offsets: np.ndarray                 # block k is rows offsets[k]:offsets[k + 1] of x_syn
    y_syn: list[torch.Tensor]           # per block, its labels
    x_real: torch.Tensor
    y_real: torch.Tensor
    real_stains: ImageStains | None
    real_idx: np.ndarray                # every real index of the stage
    rng: np.random.Generator
    gen: torch.Generator


class Objective:
    """One matching objective: the image update of an inner step, the network steps between image steps,
    and what the set records. The loop builds it once per run: ``cls(config, net_template, device)``."""

    name = ""               #: its registry name (set by :func:`register`)
    method = ""             #: what a set it made records as ``meta["method"]``
    #: True: the objective runs alone, ``cls.run(real, config, progress) -> DistillResult``, not in the loop
    standalone = False

    def __init__(self, config, net_template: torch.nn.Module, device: torch.device) -> None:
        self.config = config

    def step(self, s: StageInputs, net, weights, aug, opt_img: torch.optim.Optimizer) -> torch.Tensor:
        """One inner step: update ``s.x_syn`` (through ``opt_img``); returns the loss summed over blocks."""
        raise NotImplementedError

    def net_step(self, s: StageInputs, net, net_opt: torch.optim.Optimizer, aug) -> None:
        """One SGD step of the network between image steps: CE on an augmented real batch of the stage."""
        c = self.config
        bidx = torch.from_numpy(sample_indices(s.real_idx, c.batch_net, s.rng)).to(s.x_real.device)
        xb = s.x_real[bidx]
        if aug.ops:
            xb = aug(xb, s.gen, stains=None if s.real_stains is None else s.real_stains.index(bidx))
        nl = F.cross_entropy(net(xb), s.y_real[bidx])
        net_opt.zero_grad(set_to_none=True)
        nl.backward()
        net_opt.step()

    def dp_meta(self, stages: list[list[Group]], steps_done: int) -> dict | None:
        """The set's ``meta["dp"]``: None unless the objective is differentially private."""
        return None

    @staticmethod
    def joint_step(loss: torch.Tensor, x_syn: torch.Tensor, opt_img: torch.optim.Optimizer) -> None:
        """One optimiser step of every synthetic image on ``loss``."""
        opt_img.zero_grad(set_to_none=True)
        x_syn.grad = torch.autograd.grad(loss, x_syn)[0]
        opt_img.step()
