"""Memorisation analysis: a coreset of real patches is flagged, noise is not."""

from pathlib import Path

import numpy as np
import pytest

from histodd_fed.patchset import PatchSet, load_image_folder
from histodd_fed.privacy.classifier import TrainSpec
from histodd_fed.privacy.memorisation import (MemorisationConfig, analyse_memorisation, init_indices_from_meta,
                                              percentile_in)
from histodd_fed.privacy.risk import GateThresholds, find_risks

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TINY_ENCODER = TrainSpec(model="convnet", model_kwargs={"width": 8, "depth": 2}, epochs=1, batch_size=64)


def textured_patches(n: int, size: int = 16, seed: int = 0) -> PatchSet:
    """Two classes of smooth random colour textures (distinct patches, not noise)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    low = rng.random((n, 4, 4, 3))
    low[labels == 1, :, :, 0] *= 0.5  # class 1 less red
    img = np.kron(low, np.ones((size // 4, size // 4, 1)))
    img = 0.8 * img + 0.2 * rng.random((n, size, size, 3))
    return PatchSet(images=(img * 255).round().astype(np.uint8), labels=labels, class_names=["a", "b"])


def noise_set(n: int, size: int, class_names, seed: int = 1) -> PatchSet:
    rng = np.random.default_rng(seed)
    return PatchSet(images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), labels=np.arange(n) % 2,
                    class_names=list(class_names), kind="synthetic")


CFG = MemorisationConfig(reference_size=120, ssim_candidates=16, encoder=TINY_ENCODER)


def test_coreset_of_real_patches_is_flagged_as_memorised():
    real = textured_patches(120)
    core = real.subset([3, 10, 57, 90], kind="coreset", meta={"source_indices": [3, 10, 57, 90], "source_size": 120})
    res = analyse_memorisation(core, real, CFG, seed=0)
    for name in ("ssim", "l2", "cosine"):
        r = res.metrics[name]
        assert r.synthetic_nn_index.tolist() == [3, 10, 57, 90], name
        assert r.fraction_closer_than(1.0) == 1.0 and r.fraction_closer_than(5.0) == 1.0, name
    assert np.allclose(res.metrics["ssim"].synthetic_nn, 1.0, atol=1e-5)
    assert np.allclose(res.metrics["l2"].synthetic_nn, 0.0, atol=1e-6)
    assert (res.metrics["l2"].percentile < 1.0).all()
    np.testing.assert_array_equal(res.init_indices, [3, 10, 57, 90])  # the init column: a coreset patch's source
    assert np.allclose(res.metrics["l2"].init_value, 0.0, atol=1e-6)
    risks = find_risks(res, None, GateThresholds())
    assert len(risks) == 3 and "SSIM 1.000 >= threshold 0.95" in risks[0] and "real-real p1" in risks[1]
    assert "keeps the layout" in risks[2] and "structure correlation 1.000" in risks[2]


def test_noise_images_are_not_flagged():
    real = textured_patches(120)
    res = analyse_memorisation(noise_set(6, 16, real.class_names), real, CFG, seed=0)
    for name in ("ssim", "l2"):
        assert res.metrics[name].fraction_closer_than(5.0) == 0.0, name
    assert res.metrics["ssim"].synthetic_nn.max() < 0.5
    assert res.init_indices is None
    assert find_risks(res, None, GateThresholds()) == []


def test_percentile_midrank():
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(percentile_in(ref, [0.5, 2.0, 9.0]), [0.0, 37.5, 100.0])


def test_init_indices_only_for_real_init_and_matching_source():
    real = textured_patches(20)
    syn = real.subset([0, 1], kind="synthetic", meta={"init_source_indices": [4, 5], "config": {"init": "noise"}})
    assert init_indices_from_meta(syn, real) is None  # noise init: recorded indices are not starting points
    syn.meta = {"init_source_indices": [4, 5], "config": {"init": "real"}, "source_num_images": 20}
    np.testing.assert_array_equal(init_indices_from_meta(syn, real), [4, 5])
    syn.meta["source_num_images"] = 99  # distilled from another store
    assert init_indices_from_meta(syn, real) is None


def test_pcam_random_patches_flagged_noise_not():
    root = DATA / "pcam-ai4all" / "train"
    if not root.exists():
        pytest.skip(f"real PCam patches not found at {root}")
    real = load_image_folder(root, size=16, limit_per_class=40, seed=0)
    cfg = MemorisationConfig(reference_size=80, ssim_candidates=16, feature_metric=False)
    core = analyse_memorisation(real.subset([1, 50]), real, cfg, seed=0)
    assert core.metrics["ssim"].synthetic_nn.min() > 0.999 and core.metrics["l2"].fraction_closer_than(1.0) == 1.0
    noise = analyse_memorisation(noise_set(4, 16, real.class_names), real, cfg, seed=0)
    assert find_risks(noise, None, GateThresholds()) == []


def blank_and_textured(n_blank: int = 10, n_tex: int = 2000, size: int = 16, seed: int = 3) -> PatchSet:
    """Textured patches plus a few near-white background patches (each a slightly different blank; under
    1% of the patches, as in PCam's train folder, so the real-real p1 is set by tissue)."""
    tex = textured_patches(n_tex, size, seed)
    rng = np.random.default_rng(seed + 1)
    blank = np.clip(245 + rng.normal(0, 1.5, (n_blank, size, size, 3)), 0, 255).round().astype(np.uint8)
    return PatchSet(images=np.concatenate([tex.images, blank]), labels=np.arange(n_tex + n_blank) % 2,
                    class_names=tex.class_names)


def l2_risks(res) -> list[str]:
    return [r for r in find_risks(res, None, GateThresholds(ssim_block=None, structure_block_percentile=None))
            if "real-real p1" in r]


def test_l2_rule_flags_copies_that_single_out_a_patch_but_not_a_bland_image_near_many_blanks():
    # the attack on the old rule's other side: a near-white image (a synthetic image of background) is as
    # close to dozens of blank real patches as to its nearest one; the L2 rule used to block such sets
    real = blank_and_textured()
    rng = np.random.default_rng(9)
    grey = np.clip(246 + rng.normal(0, 2.0, (1, 16, 16, 3)), 0, 255).round().astype(np.uint8)
    bland = PatchSet(images=grey, labels=np.array([0]), class_names=real.class_names, kind="synthetic")
    cfg = MemorisationConfig(reference_size=1000, ssim_candidates=16, feature_metric=False)
    res = analyse_memorisation(bland, real, cfg, seed=0)
    l2 = res.metrics["l2"]
    assert l2.synthetic_nn[0] < l2.reference_threshold(1.0)          # below the percentile: the old rule fired
    assert l2.synthetic_kth[0] < 1.2 * l2.synthetic_nn[0] and l2.kth_rank == 8
    assert l2_risks(res) == []
    old = find_risks(res, None, GateThresholds(ssim_block=None, structure_block_percentile=None, l2_unique_ratio=None))
    assert any("real-real p1" in r for r in old)
    # copies still fire: an exact copy of a blank patch, and a textured patch with small noise
    noisy = np.clip(real.images[[5]].astype(float) + rng.normal(0, 2.0, (1, 16, 16, 3)), 0, 255).round()
    copies = PatchSet(images=np.concatenate([real.images[[2003]], noisy.astype(np.uint8)]), labels=np.array([0, 1]),
                      class_names=real.class_names, kind="synthetic")
    res = analyse_memorisation(copies, real, cfg, seed=0)
    assert res.metrics["l2"].synthetic_nn_index.tolist() == [2003, 5]
    risks = l2_risks(res)
    assert len(risks) == 1 and "2/2 patches so close" in risks[0] and "8th-nearest distinct real patch" in risks[0]


def test_kth_distinct_counts_duplicates_once():
    import torch

    from histodd_fed.privacy.memorisation import kth_distinct

    d = torch.tensor([[0.0, 0.0, 0.1, 0.1, 0.3, 0.2], [0.5, 0.4, 0.3, 0.2, 0.1, 0.0]])
    np.testing.assert_allclose(kth_distinct(d, 1), [0.0, 0.0])
    np.testing.assert_allclose(kth_distinct(d, 2), [0.1, 0.1])
    np.testing.assert_allclose(kth_distinct(d, 8), [0.3, 0.5])   # fewer distinct values: the largest
    with pytest.raises(ValueError):
        kth_distinct(d, 0)


def test_pcam_white_background_image_passes_the_l2_rule_an_exact_white_copy_does_not():
    # the case that blocked the pcam preset's best candidates: a near-white image in the resize view, about as
    # close to a dozen blank `train` patches as to its nearest one
    from histodd_fed.preprocess import ViewSpec, to_view

    root = DATA / "pcam-ai4all" / "train"
    if not root.exists():
        pytest.skip(f"real PCam patches not found at {root}")
    real = to_view(load_image_folder(root), ViewSpec(source_size=96, crop=None, size=32))
    grey = real.images.reshape(len(real), -1, 3).astype(np.float32).mean(2) / 255
    blank = np.flatnonzero((grey.std(1) < 0.01) & (grey.mean(1) > 0.9))
    assert len(blank) >= 16
    rng = np.random.default_rng(0)
    mean16 = real.images[rng.choice(blank, 16, replace=False)].astype(np.float32).mean(0)
    white = np.clip(mean16 + rng.normal(0, 6, mean16.shape), 0, 255).round().astype(np.uint8)
    syn = PatchSet(images=np.stack([white, real.images[blank[3]]]), labels=np.array([0, 1]),
                   class_names=real.class_names, kind="synthetic")
    res = analyse_memorisation(syn, real, MemorisationConfig(feature_metric=False), seed=0)
    l2 = res.metrics["l2"]
    assert l2.synthetic_nn[0] < l2.reference_threshold(1.0)            # the old rule fired on the white image
    risks = find_risks(res, None, GateThresholds())
    l2r = [r for r in risks if "real-real p1" in r]
    assert len(l2r) == 1 and l2r[0].startswith("synthetic patch 1 is closer to real patch ") and "1/2 patches" in l2r[0]


def test_real_side_reused_across_audits_equals_a_fresh_one(monkeypatch):
    """Auditing two sets against the same real patches (a candidate check, then the export gate) computes the real
    side once - one encoder trained - and each result equals a fresh computation's."""
    from histodd_fed.privacy import memorisation

    real = textured_patches(120)
    a, b = noise_set(6, 16, real.class_names, seed=1), real.subset([3, 10, 57], kind="coreset")
    trained: list = []
    train = memorisation.train_model
    monkeypatch.setattr(memorisation, "train_model", lambda *x, **k: trained.append(1) or train(*x, **k))
    monkeypatch.setattr(memorisation, "_REAL_SIDES", memorisation.OrderedDict())
    warm = [analyse_memorisation(s, real, CFG, seed=5) for s in (a, b)]
    assert len(trained) == 1 and len(memorisation._REAL_SIDES) == 1
    for s, got in zip((a, b), warm):
        memorisation._REAL_SIDES.clear()
        fresh = analyse_memorisation(s, real, CFG, seed=5)
        for name, m in fresh.metrics.items():
            assert np.array_equal(m.synthetic_nn, got.metrics[name].synthetic_nn), name
            assert np.array_equal(m.synthetic_nn_index, got.metrics[name].synthetic_nn_index), name
            assert np.array_equal(m.reference_nn, got.metrics[name].reference_nn), name
    assert len(trained) == 3
    other = textured_patches(120, seed=9)            # other real patches, or another seed: a side of its own
    analyse_memorisation(a, other, CFG, seed=5)
    analyse_memorisation(a, real, CFG, seed=6)
    assert len(trained) == 5 and len(memorisation._REAL_SIDES) == 3
