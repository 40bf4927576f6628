"""The fast (batched) matching path equals a plain per-class reference written here; bad configs fail."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histodd_fed.augment import build_augmentation
from histodd_fed.distill import DistillConfig, distill, run_distillation
from histodd_fed.distill.matching import batched_matching_loss
from histodd_fed.distill.model_aug import matched_weights
from histodd_fed.errors import ConfigError, InputError
from histodd_fed.models import create_model
from histodd_fed.stain import StainContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distill_run import TINY, toy_set  # noqa: E402


def plain_reference(net, x_real, y_real, x_syn, y_syn, distance):
    """Per class: CE gradients w.r.t. every conv/linear weight, summed layer distances (no library helpers)."""
    ws = [m.weight for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    total = 0.0
    for k in range(x_real.shape[0]):
        gr = torch.autograd.grad(F.cross_entropy(net(x_real[k]), y_real[k]), ws)
        gs = torch.autograd.grad(F.cross_entropy(net(x_syn[k]), y_syn[k]), ws, create_graph=True)
        for a, b in zip(gr, gs):
            a = a.detach()
            if distance == "l1":
                d = (a - b).abs().sum()
            elif distance == "l1_mean":
                d = (a - b).abs().mean()
            elif distance == "mse":
                d = ((a - b) ** 2).sum()
            else:
                a2, b2 = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
                d = (1 - (a2 * b2).sum(1) / (a2.norm(dim=1) * b2.norm(dim=1) + 1e-6)).sum()
            total = total + d
    return total


@pytest.mark.parametrize("model,kw,distance,px", [("convnet", {"width": 8, "depth": 2}, d, 8) for d in
                                                   ("l1", "l1_mean", "cosine", "mse")]
                         + [("resnetap10", {"width": 4}, "l1", 16)])  # >= 16 px: no 1x1 instance norm
def test_fast_matching_equals_per_class_reference(model, kw, distance, px):
    torch.manual_seed(0)
    net = create_model(model, num_classes=3, image_size=px, **kw)
    k, b, m = 3, 6, 2
    g = torch.Generator().manual_seed(1)
    xr = torch.rand(k, b, 3, px, px, generator=g)
    yr = torch.arange(k).repeat_interleave(b).reshape(k, b)
    xs0 = torch.rand(k, m, 3, px, px, generator=g)
    ys = torch.arange(k).repeat_interleave(m).reshape(k, m)
    xs = xs0.clone().requires_grad_(True)
    ref = plain_reference(net, xr, yr, xs, ys, distance)
    g_ref, = torch.autograd.grad(ref, xs)
    assert g_ref.abs().sum() > 0
    for mode in ("vmap", "loop"):
        xf = xs0.clone().requires_grad_(True)
        fast = batched_matching_loss(net, matched_weights(net), xr, yr, xf, ys, distance, per_class=mode)
        g_fast, = torch.autograd.grad(fast, xf)
        assert fast.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-5), mode
        assert torch.allclose(g_fast, g_ref, rtol=1e-3, atol=1e-5 * g_ref.abs().max().item()), mode


def test_batched_siamese_augmentation_equals_per_class_application():
    # What the fast path does: every image gets its class's single draw, one apply over all classes.
    from histodd_fed.augment.dsa import AugDraw

    aug = build_augmentation("color_crop_cutout_flip_scale_rotate_stain_stainjitter", stain=StainContext.reference())
    gen = torch.Generator().manual_seed(5)
    xs = [torch.rand(4, 3, 16, 16, generator=gen) * 0.6 + 0.2 for _ in range(3)]
    draws = [aug.sample(1, gen, siamese=True) for _ in xs]
    from histodd_fed.stain import ImageStains

    st = ImageStains.from_tensor(torch.cat(xs))
    per = [aug.apply(x, d, st.index(slice(4 * i, 4 * i + 4))) for i, (x, d) in enumerate(zip(xs, draws))]
    vals = {key: torch.cat([d.values[key] for d in draws]).repeat_interleave(4, dim=0) for key in draws[0].values}
    both = aug.apply(torch.cat(xs), AugDraw(vals, siamese=False), st)
    assert torch.allclose(both, torch.cat(per), atol=1e-5)


def test_engine_fast_equals_reference_and_is_seeded():
    real = toy_set()
    cfg = DistillConfig.from_yaml(TINY, outer_steps=1, inner_steps=2, pool_epochs=0)
    fast = run_distillation(real, cfg, progress=False).patchset
    again = run_distillation(real, cfg, progress=False).patchset
    ref = run_distillation(real, DistillConfig.from_dict(cfg.to_dict(), matching="reference"), progress=False).patchset
    assert np.array_equal(fast.images, again.images)          # same seed -> same synthetic set
    assert np.abs(fast.images.astype(int) - ref.images.astype(int)).max() <= 1
    for a, b in zip(fast.meta["loss_curve"], ref.meta["loss_curve"]):
        assert a["mean"] == pytest.approx(b["mean"], rel=1e-4)


def test_bad_configs_fail_clearly():
    real = toy_set(3)
    with pytest.raises(InputError, match="ipc=4 is larger than class"):
        distill(real, DistillConfig.from_yaml(TINY, ipc=4), progress=False)
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        distill(real, DistillConfig.from_yaml(TINY, model="nope", model_kwargs={}), progress=False)
    missing = toy_set(3)
    missing.class_names = ["normal", "tumour", "stroma"]
    with pytest.raises(InputError, match="'stroma' has no patches"):
        distill(missing, DistillConfig.from_yaml(TINY), progress=False)
    with pytest.raises(ConfigError, match="matching"):
        DistillConfig(matching="turbo")
