"""Distribution matching (``objective: distribution``, method ``dm``; DM, Zhao & Bilen 2023): per class, the
mean embedding of an augmented real batch against that of the class's synthetic images, one siamese draw
per class; ``dm_layers: all`` matches every block's output, ``dm_moments: 2`` adds the mean squares."""

from __future__ import annotations

import torch

from histodd_fed.distill.objectives import Objective, StageInputs, register, sample_indices, siamese
from histodd_fed.errors import InputError
from histodd_fed.formation import decode


def dm_embedding(net, config):
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


def dm_distance(real: list[torch.Tensor], syn: list[torch.Tensor], moments: int) -> torch.Tensor:
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


@register("distribution")
class DistributionMatching(Objective):
    """DM: one joint image step per inner step on the summed class losses (``update`` does not apply);
    multi-formation sets are decoded into their training images first."""

    method = "dm"

    def step(self, s: StageInputs, net, weights, aug, opt_img: torch.optim.Optimizer) -> torch.Tensor:
        loss = self.loss(s, net, aug)
        self.joint_step(loss, s.x_syn, opt_img)
        return loss

    def loss(self, s: StageInputs, net, aug) -> torch.Tensor:
        """Sum over classes of :func:`dm_distance` between the embeddings (:func:`dm_embedding`) of an
        augmented real batch and of the class's synthetic images."""
        config = self.config
        embed = dm_embedding(net, config)
        total = torch.zeros((), device=s.x_syn.device)
        f = config.formation
        for k, g in enumerate(s.groups):
            ridx = torch.from_numpy(sample_indices(g.real_idx, config.batch_real, s.rng)).to(s.x_real.device)
            xs = decode(s.x_syn[int(s.offsets[k]):int(s.offsets[k + 1])], f)      # the class's training images
            sl = slice(int(s.offsets[k]) * f * f, int(s.offsets[k + 1]) * f * f)
            xr, xs = siamese(aug, s.x_real[ridx], xs, ridx, s.real_stains, s.syn_stains, sl, s.gen)
            with torch.no_grad():
                fr = embed(xr)
            total = total + dm_distance(fr, embed(xs), config.dm_moments)
        return total
