"""The paper preset (configs/distill-paper.yaml): input normalisation, classifier weights left out of the match,
the image learning rate rule, and a short CPU run that lowers its matching loss without saturating pixels."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from histodd_fed.distill import DistillConfig, run_distillation
from histodd_fed.augment import build_augmentation
from histodd_fed.distill.engine import _load_checkpoint
from histodd_fed.distill.gradient import GradientMatching
from histodd_fed.distill.initialisation import Group
from histodd_fed.distill.model_aug import augment_model, matched_weights
from histodd_fed.distill.objectives import StageInputs
from histodd_fed.distill.pool import InputNormalised, build_model, get_pool, input_stats, pool_key
from histodd_fed.errors import ConfigError
from histodd_fed.stain.normalize import ImageStains, StainContext
from histodd_fed.studies.toy_data import make_toy_patchset

torch.set_num_threads(1)
PAPER = Path(__file__).resolve().parents[1] / "configs" / "distill-paper.yaml"


def _tiny_paper(**kw) -> DistillConfig:
    """The paper preset at CPU-test scale: 32 px, a width-8 ResNetAP-10, a pool of one 1-epoch model."""
    opts = dict(image_size=32, ipc=2, outer_steps=2, inner_steps=2, model_kwargs={"width": 8}, pool_size=1,
                pool_epochs=1, batch_real=12, batch_net=12, pool_batch=12, device="cpu", checkpoint_every=1)
    opts.update(kw)
    return DistillConfig.from_yaml(PAPER, **opts)


def test_paper_yaml_is_the_sound_recipe():
    c = DistillConfig.from_yaml(PAPER)
    assert (c.model, c.update, c.dsa_mode, c.distance, c.init) == ("resnetap10", "per_class", "single", "l1", "real")
    assert "stain" in c.augmentation and c.pool_size == 5 and c.alpha > 0
    assert (c.outer_steps, c.inner_steps) == (200, 100)
    assert c.match_fc is False and c.input_norm == "dataset" and c.lr_img_ref_size == 32
    # the rule: lr_img at 32 px / 10 ipc, x (size / 32)^3 x (ipc / 10)^1.5 (measured powers)
    assert c.effective_lr_img() == pytest.approx(c.lr_img * 8)
    assert DistillConfig.from_yaml(PAPER, image_size=32, ipc=40).effective_lr_img() == pytest.approx(c.lr_img * 8)
    assert DistillConfig(lr_img=0.3).effective_lr_img() == 0.3            # rule off by default
    assert DistillConfig(lr_img=0.3, lr_img_ref_size=32, ipc=20, image_size=64).effective_lr_img() == \
        pytest.approx(0.3 * 4 * 2)                                         # IDC's powers (2, 1) by default


def test_classifier_weights_left_out_of_the_match_and_inputs_normalised():
    net = build_model(_tiny_paper(), 2)
    conv_only = matched_weights(net, fc=False)
    assert len(conv_only) == len(matched_weights(net)) - 1 and all(w.dim() == 4 for w in conv_only)
    cfg = _tiny_paper()
    x = torch.rand(6, 3, 32, 32)
    mean, std = input_stats(cfg, x)
    assert np.allclose(mean, x.transpose(0, 1).reshape(3, -1).mean(1).numpy(), atol=1e-5)
    wrapped = build_model(cfg, 2, (mean, std))
    assert isinstance(wrapped, InputNormalised)
    inner = copy.deepcopy(wrapped.net)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(wrapped(x), inner((x - m) / s), atol=1e-5)
    assert set(wrapped.state_dict()) == {f"net.{k}" for k in inner.state_dict()}   # mean / std not persisted
    assert input_stats(DistillConfig(input_norm="imagenet"), None)[0] == [0.485, 0.456, 0.406]
    # the pool key changes with the normalisation, and not at all for configs that leave it off
    assert pool_key("h", cfg) != pool_key("h", _tiny_paper(input_norm="none"))
    assert "input_norm" not in DistillConfig().result_dict()
    with pytest.raises(ConfigError, match="input_norm"):
        DistillConfig(objective="distribution", input_norm="dataset")


def test_paper_preset_short_cpu_run_lowers_its_matching_loss_without_saturating(tmp_path):
    """Three runs (seeds 0-2): the objective (in expectation) falls on the whole and in most runs - 4 small
    stochastic steps need not lower it every time (9 of seeds 0-9 did, the other rose 0.3%)."""
    changes = [_short_run(tmp_path / f"s{seed}", seed) for seed in (0, 1, 2)]
    assert sum(a - b for b, a in changes) < 0, changes
    assert sum(a < b for b, a in changes) >= 2, changes


def _short_run(tmp_path: Path, seed: int) -> tuple[float, float]:
    real = make_toy_patchset(12, 32, seed=3)
    cfg = _tiny_paper(seed=seed)
    res = run_distillation(real, cfg, work_dir=tmp_path, progress=False)
    syn = res.patchset
    assert syn.meta["method"] == "histo-dd" and syn.meta["complete"]
    assert syn.meta["lr_img_effective"] == pytest.approx(cfg.lr_img * 0.2 ** 1.5)    # 32 px, ipc 2
    assert syn.meta["input_norm"]["kind"] == "dataset" and len(syn.meta["input_norm"]["std"]) == 3

    # the objective in expectation: the mean matching loss over 8 draws of (pool network + model augmentation,
    # real batch, one DSA op), the same draws for the images before and after (common random numbers)
    x_real, y_real = real.to_tensors()
    images = real.images
    ctx, real_st = StainContext.from_images(images), ImageStains.estimate(images)
    aug = build_augmentation(cfg.augmentation, stain=ctx)
    singles = [build_augmentation(op, stain=ctx) for op in aug.ops]
    norm = input_stats(cfg, x_real)
    pool = get_pool(cfg, 2, x_real, y_real, aug, real_st, syn.meta["source_data_sha256"], tmp_path / "pool",
                    show_progress=False, norm=norm)
    assert pool.reused
    template = build_model(cfg, 2, norm)
    objective = GradientMatching(cfg, template, torch.device("cpu"))
    init_idx = torch.tensor(syn.meta["init_source_indices"])
    groups = [Group(c, -1, np.flatnonzero(real.labels == c), init_idx[2 * c:2 * c + 2].numpy()) for c in (0, 1)]

    def loss(x: torch.Tensor) -> float:
        rng, gen = np.random.default_rng(11), torch.Generator().manual_seed(11)
        s = StageInputs(groups, x, real_st.index(init_idx), np.array([0, 2, 4]),
                        [torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)], x_real, y_real, real_st,
                        np.arange(len(real)), rng, gen)
        total = 0.0
        for _ in range(8):
            net = copy.deepcopy(template)
            net.load_state_dict(pool.states[0])
            augment_model(net, cfg.alpha, gen)
            op = singles[int(torch.randint(len(singles), (1,), generator=gen))]
            total += sum(float(objective.class_loss(s, k, net, matched_weights(net, fc=False), op).detach())
                         for k in (0, 1))
        return total / 8

    # the float images before / after (the last checkpoint; the set itself is rounded to uint8)
    (ckpt,) = (tmp_path / "checkpoints").glob("*.pt")
    x1 = _load_checkpoint(ckpt)[0]["syn_0"]
    x0 = torch.from_numpy(res.initial_images).permute(0, 3, 1, 2).float() / 255
    before, after = loss(x0), loss(x1)

    def saturated(x: torch.Tensor) -> float:
        return float(((x <= 0) | (x >= 1)).float().mean())

    assert saturated(x1) - saturated(x0) < 0.01
    moved = float((x1 - x0).abs().mean())
    assert 0 < moved < 0.02, moved           # the images moved, a little (4 image steps)
    assert syn.meta["drift"]["abs_mean_mean"][-1] == pytest.approx(moved, abs=1e-4)
    return before, after
