"""Multi-formation sets (histodd_fed.formation): ipc stored images of S px, each a 2 x 2 grid of S/2-px
tiles decoded into 4 training images. The engine distils them, evaluation and fine-tuning train on
the decoded images, and the privacy gate audits both the decoded images and the tiles (a tile that
is a downscaled copy of a real patch must not pass because upsampling blurs it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from histodd_fed.distill import DistillConfig, run_distillation
from histodd_fed.errors import ConfigError, InputError
from histodd_fed.formation import decode, decode_set, encode, formation_factor, pack_set, tiles
from histodd_fed.patchset import PatchSet, load_image_folder
from histodd_fed.preprocess import crop_images
from histodd_fed.privacy.gate import PrivacyRiskError, check_export
from histodd_fed.training.evaluation import evaluate_sets
from tests.test_distill_run import toy_set
from tests.test_privacy_views import CROP, export_as_c1, fast_config, save_folder, tissue96

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "distill-tiny.yaml"


def packed(x: torch.Tensor, labels: np.ndarray, meta: dict) -> PatchSet:
    """Float NCHW images (4 consecutive per class block) packed 2 x 2 with histodd_fed.formation.pack_set."""
    ps = PatchSet(images=(x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy(), labels=labels,
                  class_names=["normal", "tumour"], kind="synthetic", meta=meta)
    return pack_set(ps, 2)


def test_encode_packs_downscaled_images_row_major_and_decode_upsamples_each_tile():
    x = torch.rand(8, 3, 16, 16)
    e = encode(x, 2)
    assert e.shape == (2, 3, 16, 16)
    small = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    for k in range(4):
        i, j = divmod(k, 2)
        assert torch.equal(e[1, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8], small[4 + k])
    d = decode(e, 2)
    assert d.shape == (8, 3, 16, 16)
    assert torch.allclose(d, F.interpolate(small, size=(16, 16), mode="bilinear", align_corners=False))
    assert decode(x, 1) is x and encode(x, 1) is x
    with pytest.raises(InputError, match="does not divide"):
        decode(torch.rand(1, 3, 15, 15), 2)


def test_decode_set_and_tiles_expand_labels_and_keep_the_view_consistent():
    x = torch.rand(8, 3, 32, 32)
    ps = packed(x, np.array([0, 0, 0, 0, 1, 1, 1, 1]), {"view": CROP.to_dict()})
    assert formation_factor(ps) == 2
    d = decode_set(ps)
    assert d.images.shape == (8, 32, 32, 3) and d.labels.tolist() == [0] * 4 + [1] * 4
    assert formation_factor(d) == 1 and d.meta["decoded_from"] == {"factor": 2, "stored_images": 2}
    assert d.meta["view"] == CROP.to_dict()
    t = tiles(ps)
    assert t.images.shape == (8, 16, 16, 3) and t.meta["view"]["size"] == 16
    assert np.array_equal(t.images[5], ps.images[1, :16, 16:])
    assert decode_set(d) is d
    bad = PatchSet(images=ps.images, labels=ps.labels, class_names=ps.class_names, meta={"formation": {"factor": 0}})
    with pytest.raises(InputError, match="formation"):
        formation_factor(bad)


def test_config_refuses_formation_where_it_is_not_implemented():
    with pytest.raises(ConfigError, match="distribution"):
        DistillConfig.from_yaml(TINY, formation=2)
    with pytest.raises(ConfigError, match="dividing image_size"):
        DistillConfig.from_yaml(TINY, objective="distribution", formation=3)


def test_distillation_with_formation_stores_ipc_images_and_evaluation_trains_on_four_times_as_many():
    real = toy_set(12)
    cfg = DistillConfig.from_yaml(TINY, objective="distribution", pool_epochs=0, net_steps=0, outer_steps=10,
                                  inner_steps=1, lr_img=0.1, augmentation="none", batch_real=12, init="mixture",
                                  init_mix=2, formation=2)
    res = run_distillation(real, cfg, progress=False)
    ps = res.patchset
    assert len(ps) == cfg.ipc * real.num_classes and ps.image_size == cfg.image_size
    assert ps.meta["formation"] == {"factor": 2}
    curve = [r["mean"] for r in ps.meta["loss_curve"]]
    assert curve[-1] < curve[0] and not np.array_equal(ps.images, res.initial_images)
    test = toy_set(6)
    test.images = np.ascontiguousarray(test.images[:, :cfg.image_size, :cfg.image_size])
    ev = evaluate_sets({"s": ps}, test, "convnet", seeds=1, epochs=1, arch_kwargs={"width": 8, "depth": 1},
                       progress=False)["s"]
    assert ev.n_train == 4 * len(ps)


def test_attack_downscaled_copies_packed_as_tiles_are_blocked_by_the_tile_audit(tmp_path):
    """Attack: a centre packs 4 real centre crops per stored image at half resolution and declares
    multi-formation. The gate audits the tiles against the real patches downscaled to the tiles' size
    (not only the decoded, blurred images) and blocks the export in that view."""
    save_folder(tissue96(40, 0), tmp_path / "raw96")
    real = load_image_folder(tmp_path / "raw96")
    idx = np.arange(16)
    x = torch.from_numpy(crop_images(real.images[idx], 32)).permute(0, 3, 1, 2).float() / 255
    order = np.argsort(real.labels[idx], kind="stable")
    syn = packed(x[order], real.labels[idx][order], {"view": CROP.to_dict()})
    tile_view = check_export(syn, real, fast_config(), raise_on_block=False).to_dict()["views"]
    assert any("resize 16" in v["view_text"] and v["flagged"] for v in tile_view), tile_view
    r = export_as_c1(tmp_path, syn)
    assert r.exit_code != 0 and isinstance(r.exception, PrivacyRiskError), r.output
    assert "resize 16" in str(r.exception) and not (tmp_path / "B.hdb").exists()


def test_check_export_decodes_before_auditing():
    real = tissue96(16, 1)
    x = torch.rand(8, 3, 32, 32)
    syn = packed(x, np.array([0, 0, 0, 0, 1, 1, 1, 1]), {"view": CROP.to_dict()})
    d = check_export(syn, real, fast_config(), raise_on_block=False)
    texts = {v["view_text"] for v in d.to_dict()["views"]}
    assert any("resize 16" in t for t in texts) and any(t.endswith("centre crop 32") for t in texts)


def test_a_target_centre_trains_on_the_decoded_images_of_a_received_multi_formation_set():
    from histodd_fed.federation.fine_tuning import prepare_received
    from histodd_fed.federation.presets import get_preset

    syn = packed(torch.rand(8, 3, 32, 32), np.array([0, 0, 0, 0, 1, 1, 1, 1]), {"view": CROP.to_dict()})
    got, info = prepare_received(syn, None, get_preset("tiny"))
    assert len(got) == 8 and got.labels.tolist() == [0] * 4 + [1] * 4
    assert got.meta["decoded_from"] == {"factor": 2, "stored_images": 2}
