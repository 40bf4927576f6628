"""DP distribution matching (dm-dp, histodd_fed.distill.dm_dp): accounting, clipping, a tiny run, its meta,
the CLI's refusals and that the set does not start from real patches. CPU, toy-sized."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from histodd_fed.distill import DistillConfig
from histodd_fed.distill import dm_dp
from histodd_fed.errors import ConfigError
from histodd_fed.patchset import PatchSet

REPO = Path(__file__).resolve().parents[1]
DP_KEYS = {"epsilon", "delta", "accountant", "noise_multiplier", "clip", "mechanism"}


def toy_real(n_per_class: int = 24, size: int = 16, seed: int = 0) -> PatchSet:
    """Two classes of smooth coloured patterns (class 1 darker, with blobs)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs, labels = [], []
    for c in (0, 1):
        for _ in range(n_per_class):
            f = rng.uniform(1, 4, 2)
            base = 0.5 + 0.3 * np.sin(2 * np.pi * (f[0] * xx + f[1] * yy + rng.uniform()))
            col = np.stack([base * rng.uniform(0.7, 1.0), base * rng.uniform(0.4, 0.7), base * rng.uniform(0.6, 0.9)], -1)
            if c:
                col = col * 0.6 + 0.1 * rng.uniform(size=(size, size, 1))
            imgs.append((np.clip(col, 0, 1) * 255).astype(np.uint8))
            labels.append(c)
    return PatchSet(images=np.stack(imgs), labels=np.array(labels), class_names=["normal", "tumour"])


def tiny_cfg(**over) -> DistillConfig:
    base = dict(objective="distribution", dm_layers="all", model="convnet", model_kwargs={"width": 8, "depth": 2},
                image_size=16, ipc=2, init="noise", outer_steps=30, inner_steps=1, lr_img=1.0, momentum_img=0.5,
                pool_epochs=0, pool_size=1, net_steps=0, augmentation="crop_flip_rotate", dp_epsilon=8.0,
                dp_nets=2, dp_augs=1, dp_clip=1.0, device="cpu", checkpoint_every=0, seed=0)
    base.update(over)
    return DistillConfig.from_dict(base)


# ------------------------------------------------------------------------------------------ accounting
def _analytic_gaussian_delta(sigma: float, eps: float) -> float:
    """Exact delta(eps) of the Gaussian mechanism with sensitivity 1 and noise std sigma (Balle & Wang 2018)."""
    from scipy.stats import norm

    return float(norm.cdf(0.5 / sigma - eps * sigma) - math.exp(eps) * norm.cdf(-0.5 / sigma - eps * sigma))


@pytest.mark.parametrize("eps", [1.0, 8.0])
def test_noise_calibration_meets_and_nearly_spends_the_budget(eps):
    sigma = dm_dp.calibrate_noise(eps, 1e-5)
    spent = dm_dp.accountant_epsilon(sigma, 1e-5)
    assert spent <= eps and spent >= 0.97 * eps, (sigma, spent)
    # independent check: the exact (analytic) Gaussian mechanism's delta at that epsilon is within 1e-5
    assert _analytic_gaussian_delta(sigma, spent) <= 1e-5 * 1.01
    if eps == 1.0:
        assert 3.6 < sigma < 4.0      # analytic optimum 3.73; RDP would need 4.05


def test_clipping_bounds_each_patch_and_the_release_sensitivity():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(50, 300, generator=g) * torch.rand(50, 1, generator=g) * 3
    c = dm_dp.clip_rows(e, 1.5)
    assert (c.norm(dim=1) <= 1.5 + 1e-5).all()
    small = e.norm(dim=1) <= 1.5
    assert torch.allclose(c[small], e[small])
    # add/remove one patch: the (class sum, count coordinate) vector moves by at most sqrt(C^2 + c^2)
    # (no augmentation here: with augmentation the shared patches' secret draws are coupled, see dm_dp)
    cfg = tiny_cfg(dp_clip=0.5, augmentation="none")
    real = toy_real(8)
    x, y = real.to_tensors()
    nets = dm_dp.make_nets(cfg, 2)
    from histodd_fed.augment import build_augmentation

    aug = build_augmentation(cfg.augmentation)
    full = dm_dp.private_class_means(x, y, 2, nets, aug, cfg, None, 0.0, progress=False)
    part = dm_dp.private_class_means(x[:-1], y[:-1], 2, nets, aug, cfg, None, 0.0, progress=False)
    assert float(full["targets"].norm(dim=1).max()) <= 0.5 + 1e-5     # means of vectors clipped to 0.5
    cv = full["count_value"]
    s_full = torch.cat([full["targets"].double() * full["noisy_counts"][:, None], cv * full["noisy_counts"][:, None]], 1)
    s_part = torch.cat([part["targets"].double() * part["noisy_counts"][:, None], cv * part["noisy_counts"][:, None]], 1)
    moved = float((s_full - s_part).norm())
    assert full["sensitivity"] == pytest.approx(math.sqrt(0.5 ** 2 + cv ** 2))
    assert 0 < moved <= full["sensitivity"] + 1e-4


def test_release_noise_is_not_reproducible_from_the_recorded_seed():
    cfg = tiny_cfg()
    real = toy_real(6)
    x, y = real.to_tensors()
    nets = dm_dp.make_nets(cfg, 2)
    from histodd_fed.augment import build_augmentation

    aug = build_augmentation(cfg.augmentation)
    a = dm_dp.private_class_means(x, y, 2, nets, aug, cfg, None, 1.0, progress=False)["targets"]
    b = dm_dp.private_class_means(x, y, 2, nets, aug, cfg, None, 1.0, progress=False)["targets"]
    assert not torch.allclose(a, b)     # OS-entropy noise: same seed, different noise


# --------------------------------------------------------------------------------------------- config
def test_config_refuses_settings_that_leak_or_select_on_real_patches():
    with pytest.raises(ConfigError, match="candidates: 1"):
        tiny_cfg(candidates=3)
    for over, what in (({"init": "mixture"}, "init 'mixture'"), ({"init": "real"}, "init 'real'"),
                       ({"pool_epochs": 2}, "pool_epochs"), ({"objective": "gradient", "dm_layers": "last"}, "objective"),
                       ({"augmentation": "flip_stain"}, "stain"), ({"init": "public"}, "public_dir"),
                       ({"privacy_step": 0.01}, "privacy_step")):
        with pytest.raises(ConfigError, match="dm-dp") as ei:
            tiny_cfg(**over)
        assert what in str(ei.value) and "\n" not in str(ei.value)
    for bad in (-1.0, float("inf")):
        with pytest.raises(ConfigError, match="dp_epsilon"):
            tiny_cfg(dp_epsilon=bad)


def test_pcam_preset_has_a_dp_recipe():
    from histodd_fed.preset import load_preset

    pre = load_preset("pcam")
    cfg = pre.distill_config(dp=True, dp_epsilon=1.0, ipc=50)
    assert cfg.candidates == 1 and cfg.init in ("noise", "public") and cfg.privacy_step == 0
    assert cfg.objective == "distribution" and cfg.dm_layers == "all" and cfg.dp_delta == 1e-5
    assert pre.distill_config().dp_epsilon == 0       # the non-DP recipe is unchanged


# -------------------------------------------------------------------------------------------- the run
@pytest.fixture(scope="module")
def tiny_run():
    real = toy_real(24)
    res = dm_dp.run_dm_dp(real, tiny_cfg(), progress=False)
    return real, res


def test_tiny_run_improves_its_matching_loss(tiny_run):
    _, res = tiny_run
    m = res.patchset.meta
    curve = [r["mean"] for r in m["loss_curve"]]
    assert len(curve) == 30
    assert np.mean(curve[-5:]) < 0.8 * np.mean(curve[:3]), curve
    assert m["final_loss"] < curve[0]


def test_meta_holds_the_dp_record_and_nothing_the_accounting_does_not_cover(tiny_run):
    from histodd_fed.content_hash import data_hash

    real, res = tiny_run
    m = res.patchset.meta
    assert m["method"] == "dm-dp"
    assert DP_KEYS <= set(m["dp"])
    assert m["dp"]["delta"] == 1e-5 and m["dp"]["epsilon"] <= 8.0 and m["dp"]["clip"] == 1.0
    assert m["dp"]["noise_multiplier"] == pytest.approx(dm_dp.calibrate_noise(8.0, 1e-5))
    assert "PRV" in m["dp"]["accountant"]
    for k in ("source_data_sha256", "source_num_images", "source_class_counts", "init_source_indices",
              "selection", "init_herding", "pool", "stain_template", "source"):
        assert k not in m, k
    text = json.dumps(m)
    assert data_hash(real) not in text
    counts = m["dp"]["noisy_class_counts"]
    assert set(counts) == {"normal", "tumour"} and "noisy" in m["dp"]["noisy_counts_note"]
    assert all(isinstance(v, float) for v in counts.values())
    # the set round-trips with its meta
    assert res.patchset.kind == "synthetic" and len(res.patchset) == 4


def test_dp_set_is_not_initialised_from_real_patches(tiny_run):
    real, res = tiny_run
    xr = real.images.reshape(len(real), -1).astype(np.float32) / 255
    for imgs in (res.initial_images, res.patchset.images):
        xs = imgs.reshape(len(imgs), -1).astype(np.float32) / 255
        d = np.sqrt(((xs[:, None, :] - xr[None]) ** 2).mean(-1))        # RMS pixel distance
        real_nn = np.sqrt(((xr[:, None, :] - xr[None]) ** 2).mean(-1))
        np.fill_diagonal(real_nn, np.inf)
        assert d.min() > np.median(real_nn.min(1)), (d.min(), np.median(real_nn.min(1)))
    assert res.patchset.meta["init"] == "noise" and res.patchset.meta["init_public"] is None


def test_init_public_starts_from_public_patches_only(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    pub = tmp_path / "public"
    pub.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(pub / f"t{i}.png")
    patches, names = dm_dp.load_public_patches(str(pub), 16, 1)
    assert patches.shape == (27, 16, 16, 3)
    cfg = tiny_cfg(init="public", public_dir=str(pub), public_scale=1, outer_steps=2, dp_pool=1)
    nets = dm_dp.make_nets(cfg, 2)
    assert dm_dp.embed(nets, torch.rand(3, 3, 16, 16), "all", 1).shape == (3, 2 * 2 * 8)   # T x blocks x width
    res = dm_dp.run_dm_dp(toy_real(8), cfg, progress=False)
    init = res.initial_images
    assert all(any(np.array_equal(im, p) for p in patches) for im in init)
    assert res.patchset.meta["init_public"]["pick"] == "project" and res.patchset.meta["dp"]["embedding"]["centred_on_public"]


# ---------------------------------------------------------------------------------------------- CLI
def _cli(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "centre_node.cli", "-q", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_refuses_bad_dp_input_with_one_line_and_writes_nothing(tmp_path):
    store = toy_real(4).save(tmp_path / "store")
    cases = [(["--preset", "pcam", "--epsilon", "0"], "--epsilon"),
             (["--preset", "pcam", "--epsilon", "-1"], "--epsilon"),
             (["--preset", "pcam", "--epsilon", "1", "--delta", "1.5"], "--delta"),
             (["--config", str(REPO / "configs" / "distill-tiny.yaml"), "--epsilon", "1"], "dm-dp"),
             (["--preset", "pcam", "--epsilon", "1", "--candidates", "5"], "candidates")]
    for extra, needle in cases:
        out = tmp_path / "dp-out"
        r = _cli(["distill", "--patches", str(store), "--out", str(out), *extra], tmp_path)
        assert r.returncode == 2, (extra, r.stderr)
        assert r.stderr.strip().count("\n") == 0 and needle in r.stderr, (extra, r.stderr)
        assert not out.exists() and not (tmp_path / "dp-out.work").exists()


def test_cli_dp_run_writes_a_dm_dp_set(tmp_path):
    import yaml

    store = toy_real(10).save(tmp_path / "store")
    cfg = tiny_cfg(outer_steps=3).to_dict()
    cfg.pop("dp_epsilon")
    (tmp_path / "dm.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "dp"
    from typer.testing import CliRunner

    from centre_node.cli import app

    r = CliRunner().invoke(app, ["-q", "distill", "--patches", str(store), "--out", str(out), "--config",
                                 str(tmp_path / "dm.yaml"), "--epsilon", "2", "--seed", "4"])
    assert r.exit_code == 0, r.output
    assert "dm-dp" in r.output
    meta = json.loads((out / "patchset.json").read_text())["meta"]
    assert meta["method"] == "dm-dp" and DP_KEYS <= set(meta["dp"]) and meta["dp"]["delta"] == 1e-5
    assert meta["dp"]["epsilon"] <= 2.0 and "source" not in meta and meta["config"]["seed"] == 4
