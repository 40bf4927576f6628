"""Engine options beyond the landed defaults: per-class updates (Algorithm 1), DSA 'S' mode, cosine
image-lr decay, mixture / mosaic initialisation, the privacy term, and the recorded view."""

from pathlib import Path

import numpy as np
import pytest
import torch

from histodd_fed.distill import DistillConfig, run_distillation
from histodd_fed.distill.initialisation import mosaic
from histodd_fed.distill.privacy_term import PrivacyGuard
from histodd_fed.errors import ConfigError
from histodd_fed.preprocess import ViewSpec, apply_view
from tests.test_distill_run import toy_set

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "distill-tiny.yaml"


def test_new_fields_at_defaults_keep_old_result_keys():
    old = DistillConfig.from_yaml(TINY).result_dict()
    for k in ("update", "dsa_mode", "lr_schedule", "privacy_step", "init_mix", "init_grid"):
        assert k not in old
    assert DistillConfig.from_yaml(TINY, update="per_class").result_dict()["update"] == "per_class"
    with pytest.raises(ConfigError, match="update must be one of"):
        DistillConfig.from_yaml(TINY, update="sometimes")
    with pytest.raises(ConfigError, match="dsa_mode"):
        DistillConfig.from_yaml(TINY, dsa_mode="S")


def test_per_class_update_equals_the_joint_step_when_class_losses_are_separable():
    # Class k's matching loss depends only on class k's synthetic images (instance norm, no batch
    # statistics shared across classes), so Algorithm 1's per-class steps and one step on the summed
    # loss are the same update: same images up to float rounding (same draws, lr and momentum).
    real = toy_set(8)
    kw = dict(outer_steps=2, inner_steps=3, augmentation="flip_rotate")
    a = run_distillation(real, DistillConfig.from_yaml(TINY, matching="reference", **kw), progress=False)
    b = run_distillation(real, DistillConfig.from_yaml(TINY, update="per_class", **kw), progress=False)
    assert np.abs(a.patchset.images.astype(int) - b.patchset.images.astype(int)).max() <= 1
    moved = np.abs(b.patchset.images.astype(int) - b.initial_images.astype(int)).reshape(4, -1).max(1)
    assert (moved > 0).all()


def test_dsa_single_mode_and_cosine_schedule_run_and_are_reproducible():
    real = toy_set(8)
    cfg = DistillConfig.from_yaml(TINY, dsa_mode="single", lr_schedule="cosine", augmentation="crop_flip_rotate")
    a = run_distillation(real, cfg, progress=False).patchset
    b = run_distillation(real, cfg, progress=False).patchset
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, run_distillation(real, DistillConfig.from_yaml(TINY, augmentation="crop_flip_rotate"), progress=False)
                              .patchset.images)


def test_mosaic_tiles_come_from_different_real_patches():
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()
    out = mosaic(x, torch.tensor([[0, 1, 2, 3]]), 2)
    assert out[0, 0, 0, 0] == 0 and out[0, 0, 0, 7] == 1 and out[0, 0, 7, 0] == 2 and out[0, 0, 7, 7] == 3


@pytest.mark.parametrize("init", ["mixture", "mosaic"])
def test_mixture_and_mosaic_inits_start_from_no_single_real_patch(init):
    real = toy_set(12)
    res = run_distillation(real, DistillConfig.from_yaml(TINY, init=init, init_mix=6, outer_steps=1, inner_steps=1),
                           progress=False)
    init_imgs = res.initial_images.reshape(len(res.initial_images), -1).astype(int)
    reals = real.images.reshape(len(real), -1).astype(int)
    nearest = np.abs(init_imgs[:, None, :] - reals[None]).mean(-1).min(1)
    assert (nearest > 0).all()
    assert res.patchset.meta["init_source_indices"] == [-1] * len(res.patchset)


def test_privacy_guard_pushes_a_copy_away_from_its_source():
    real = toy_set(16)
    x_real = torch.from_numpy(real.images).permute(0, 3, 1, 2).float() / 255
    cfg = DistillConfig.from_yaml(TINY, privacy_step=0.02)
    guard = PrivacyGuard.build(x_real, cfg)
    x = x_real[:2].clone()
    corr0, l2_0 = guard.violations(x)
    assert (l2_0 < 1e-3).all()
    for _ in range(30):
        guard.push(x, 0.02)
    corr1, l2_1 = guard.violations(x)
    assert (l2_1 > l2_0).all() and (corr1 < corr0).all()


def test_synthetic_set_records_the_view_it_was_distilled_from():
    real = toy_set(8, size=48)
    viewed = apply_view(real, ViewSpec.centre_crop(48, 32))
    syn = run_distillation(viewed, DistillConfig.from_yaml(TINY, outer_steps=1, inner_steps=1), progress=False).patchset
    assert ViewSpec.from_dict(syn.meta["view"]) == ViewSpec.centre_crop(48, 32, 16)


DP = dict(dp_noise=1.0, dp_clip=1.0, init="noise", pool_epochs=0, augmentation="crop_flip_rotate")


def test_dp_matching_refuses_settings_that_let_real_patches_in():
    with pytest.raises(ConfigError, match="init 'real'"):
        DistillConfig.from_yaml(TINY, **{**DP, "init": "real"})
    with pytest.raises(ConfigError, match="pool_epochs"):
        DistillConfig.from_yaml(TINY, **{**DP, "pool_epochs": 1})
    with pytest.raises(ConfigError, match="stain template"):
        DistillConfig.from_yaml(TINY, **{**DP, "augmentation": "stain"})


def test_dp_matching_runs_and_reports_epsilon_from_the_accountant():
    from histodd_fed.distill.dp import epsilon

    real = toy_set(16)
    cfg = DistillConfig.from_yaml(TINY, **DP)
    res = run_distillation(real, cfg, progress=False)
    dp = res.patchset.meta["dp"]
    steps = cfg.outer_steps * cfg.inner_steps
    assert dp["steps"] == steps and dp["unit"] == "patch"
    rate = cfg.batch_real / 16
    assert dp["epsilon"] == pytest.approx(epsilon(1.0, rate, steps, cfg.dp_delta))
    assert 0 < dp["epsilon"] < epsilon(0.5, rate, steps, cfg.dp_delta)   # more noise, smaller epsilon
    assert not np.array_equal(res.patchset.images, res.initial_images)
    assert run_distillation(real, DistillConfig.from_yaml(TINY), progress=False).patchset.meta["dp"] is None


def test_dp_real_gradient_is_clipped_per_example():
    from histodd_fed.distill.dp import dp_real_gradient
    from histodd_fed.distill.model_aug import matched_weights
    from histodd_fed.models.registry import create_model

    torch.manual_seed(0)
    net = create_model("convnet", num_classes=2, image_size=16, width=8, depth=2)
    x, y = torch.rand(5, 3, 16, 16) * 50, torch.tensor([0, 1, 0, 1, 0])   # large inputs: large gradients
    g = dp_real_gradient(net, matched_weights(net), x, y, clip=0.1, noise=0.0, expected_batch=5.0,
                         gen=torch.Generator().manual_seed(0))
    total = torch.sqrt(sum(t.pow(2).sum() for t in g))
    assert total <= 0.1 + 1e-5          # mean of 5 gradients each of norm <= 0.1


def test_distribution_matching_moves_images_and_lowers_its_loss():
    real = toy_set(12)
    cfg = DistillConfig.from_yaml(TINY, objective="distribution", pool_epochs=0, net_steps=0, outer_steps=6,
                                  inner_steps=1, lr_img=1.0, augmentation="none", batch_real=12, init="noise")
    res = run_distillation(real, cfg, progress=False)
    curve = [r["mean"] for r in res.patchset.meta["loss_curve"]]
    assert not np.array_equal(res.patchset.images, res.initial_images)
    assert curve[-1] < curve[0]
    with pytest.raises(ConfigError, match="gradient matching only"):
        DistillConfig.from_yaml(TINY, objective="distribution", **DP)


def test_best_of_k_keeps_the_candidate_that_trains_best_on_held_out_patches():
    real = toy_set(20)
    cfg = DistillConfig.from_yaml(TINY, objective="distribution", pool_epochs=0, net_steps=0, outer_steps=2,
                                  inner_steps=1, lr_img=0.1, augmentation="none", batch_real=8, init="mixture",
                                  init_mix=2, candidates=3, candidate_holdout=4, candidate_epochs=2,
                                  candidate_eval_seeds=1, candidate_augmentation="flip")
    res = run_distillation(real, cfg, progress=False)
    sel = res.patchset.meta["selection"]
    accs = [c["heldout_accuracy"] for c in sel["candidates"]]
    assert len(accs) == 3 and [c["seed"] for c in sel["candidates"]] == [0, 1, 2]
    assert sel["candidates"][sel["chosen"]]["heldout_accuracy"] == max(accs)
    assert sel["heldout_images"] == 4 * real.num_classes
    assert res.patchset.meta["config"]["candidates"] == 3
    # the chosen set is exactly that candidate's own run
    single = run_distillation(real.subset(np.sort(np.setdiff1d(np.arange(len(real)), _held(real, cfg)))),
                              DistillConfig.from_dict({**cfg.to_dict(), "candidates": 1,
                                                       "seed": sel["chosen_seed"]}), progress=False)
    assert np.array_equal(single.patchset.images, res.patchset.images)
    with pytest.raises(ConfigError, match="per_slide"):
        DistillConfig.from_yaml(TINY, candidates=2, per_slide=True)


def test_best_of_k_with_two_worker_processes_equals_one_process_with_one_thread(tmp_path):
    """``workers=2`` distils candidates in spawned processes (one torch thread each): the same candidates,
    scores, choice and images as the one-process run with one thread; a worker's checkpoints resume."""
    from histodd_fed.errors import InputError

    real = toy_set(20)
    cfg = DistillConfig.from_yaml(TINY, objective="distribution", pool_epochs=0, net_steps=0, outer_steps=3,
                                  inner_steps=1, lr_img=0.1, augmentation="none", batch_real=8, init="mixture",
                                  init_mix=2, candidates=3, candidate_holdout=4, candidate_epochs=2,
                                  candidate_eval_seeds=1, candidate_augmentation="flip", device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_distillation(real, cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    two = run_distillation(real, cfg, tmp_path / "work", progress=False, workers=2)
    s1, s2 = one.patchset.meta["selection"], two.patchset.meta["selection"]
    assert s1["candidates"] == s2["candidates"] and s1["chosen"] == s2["chosen"]
    assert np.array_equal(one.patchset.images, two.patchset.images)
    assert np.array_equal(one.initial_images, two.initial_images)
    assert len(list((tmp_path / "work").rglob("*.pt"))) >= 3     # each candidate checkpointed by its worker
    again = run_distillation(real, cfg, tmp_path / "work", progress=False, workers=2)
    assert np.array_equal(again.patchset.images, two.patchset.images)
    with pytest.raises(InputError, match="workers must be >= 1"):
        run_distillation(real, cfg, progress=False, workers=0)


def _held(real, cfg):
    from histodd_fed.distill.select import holdout_split

    return holdout_split(real, cfg.candidate_holdout, cfg.seed)[1]


def test_dm_layer_and_moment_matching_reduce_to_dm_and_lower_their_loss():
    from histodd_fed.distill.distribution import dm_distance, dm_embedding
    from histodd_fed.models import create_model

    net = create_model("convnet", num_classes=2, image_size=16, width=8, depth=2)
    x, y = torch.rand(6, 3, 16, 16), torch.rand(3, 3, 16, 16)
    last = DistillConfig.from_yaml(TINY, objective="distribution")
    every = DistillConfig.from_yaml(TINY, objective="distribution", dm_layers="all")
    feats = dm_embedding(net, every)(x)
    assert [f.shape[1] for f in feats] == [8 * 8 * 8, 8 * 4 * 4]      # one embedding per block
    # one embedding, first moments: exactly DM's loss
    dm = (net.features(x).mean(0) - net.features(y).mean(0)).pow(2).sum()
    assert torch.allclose(dm_distance(dm_embedding(net, last)(x), dm_embedding(net, last)(y), 1), dm)
    assert dm_distance(feats, dm_embedding(net, every)(y), 2) > dm_distance(feats, dm_embedding(net, every)(y), 1)
    real = toy_set(12)
    cfg = DistillConfig.from_yaml(TINY, objective="distribution", pool_epochs=0, net_steps=0, outer_steps=6,
                                  inner_steps=1, lr_img=1.0, augmentation="none", batch_real=12, init="noise",
                                  dm_layers="all", dm_moments=2)
    res = run_distillation(real, cfg, progress=False)
    curve = [r["mean"] for r in res.patchset.meta["loss_curve"]]
    assert curve[-1] < curve[0]
    assert res.patchset.meta["config"]["dm_layers"] == "all"
    with pytest.raises(ConfigError, match="distribution matching only"):
        DistillConfig.from_yaml(TINY, dm_moments=2)
    with pytest.raises(ConfigError, match="dm_layers"):
        DistillConfig.from_yaml(TINY, objective="distribution", dm_layers="some")


def test_gate_aware_selection_skips_a_candidate_the_export_gate_blocks():
    # Candidate 0 is a copy of real patches (the gate blocks it: SSIM 1.0), candidate 1 is far from every
    # real patch. Even ranked first, the copy is audited, refused, and the next candidate is kept.
    from histodd_fed.distill.engine import DistillResult
    from histodd_fed.distill.select import _first_passing
    from histodd_fed.patchset import PatchSet

    real = toy_set(20)
    copy = real.subset(np.array([0, 1, 20, 21]))
    rng = np.random.default_rng(0)
    far = PatchSet(images=rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8), labels=np.array([0, 0, 1, 1]),
                   class_names=real.class_names)
    results = [DistillResult(copy, copy.images), DistillResult(far, far.images)]
    scores = [{"candidate": 0}, {"candidate": 1}]
    from histodd_fed.release.choose import candidate_check

    check = candidate_check(real)
    chosen, record = _first_passing([0, 1], results, check, scores)
    assert (chosen, record["audited"], record["passed"]) == (1, [0, 1], True)
    assert record["seconds"] >= 0
    assert [s["gate_passed"] for s in scores] == [False, True]
    # nothing passes: the first in order is kept and the record says so
    chosen, record = _first_passing([0], results[:1], check, scores[:1])
    assert (chosen, record["passed"]) == (0, False)
    # through the engine: a gate-aware best-of-3 records its audits; the flag is validated
    cfg = DistillConfig.from_yaml(TINY, objective="distribution", pool_epochs=0, net_steps=0, outer_steps=2,
                                  inner_steps=1, lr_img=0.1, augmentation="none", batch_real=8, init="noise",
                                  candidates=3, candidate_holdout=4, candidate_epochs=2, candidate_eval_seeds=1,
                                  candidate_augmentation="flip", candidate_gate=True)
    sel = run_distillation(real, cfg, progress=False, candidate_check=check).patchset.meta["selection"]
    assert sel["gate"]["audited"][0] == max(range(3), key=lambda i: (sel["candidates"][i]["heldout_accuracy"], -i))
    assert sel["gate"]["passed"] == sel["candidates"][sel["chosen"]]["gate_passed"]
    with pytest.raises(ConfigError, match="candidate_gate"):
        DistillConfig.from_yaml(TINY, candidate_gate="yes")


def test_gate_aware_best_of_with_workers_checks_the_first_finished_candidate_early_and_chooses_the_same():
    """With 2 workers the first candidate to finish is checked in a thread while the others are distilled (the
    gate's real side is then ready): the same checks decide, so choice, record and images equal one process's."""
    import threading

    from histodd_fed.release.choose import candidate_check

    real = toy_set(20)
    cfg = DistillConfig.from_yaml(TINY, objective="distribution", pool_epochs=0, net_steps=0, outer_steps=3,
                                  inner_steps=1, lr_img=0.1, augmentation="none", batch_real=8, init="mixture",
                                  init_mix=2, candidates=3, candidate_holdout=4, candidate_epochs=2,
                                  candidate_eval_seeds=1, candidate_augmentation="flip", device="cpu",
                                  candidate_gate=True)
    gate = candidate_check(real)
    calls: list[tuple[str, bool, bytes]] = []

    def check(ps):
        me = threading.current_thread()
        calls.append((me.name, me is threading.main_thread(), ps.images.tobytes()))
        return gate(ps)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = run_distillation(real, cfg, progress=False, candidate_check=check)
        calls_one, calls[:] = list(calls), []
        two = run_distillation(real, cfg, progress=False, candidate_check=check, workers=2)
    finally:
        torch.set_num_threads(threads)
    s1, s2 = one.patchset.meta["selection"], two.patchset.meta["selection"]
    assert s1["candidates"] == s2["candidates"] and s1["chosen"] == s2["chosen"]
    assert s1["gate"]["audited"] == s2["gate"]["audited"] and s1["gate"]["passed"] == s2["gate"]["passed"]
    assert np.array_equal(one.patchset.images, two.patchset.images)
    assert all(main for _, main, _ in calls_one)                   # one process: every check in order, here
    assert len(calls_one) == len(s1["gate"]["audited"])
    assert calls[0][:2] == ("early-candidate-check", False)         # two workers: the first one early, in a thread
    assert all(main for _, main, _ in calls[1:])
    # no set is checked twice: the early verdict stands in for its turn in the ordered checks
    assert len({images for _, _, images in calls}) == len(calls)
    assert len(calls) in (len(s2["gate"]["audited"]), len(s2["gate"]["audited"]) + 1)
