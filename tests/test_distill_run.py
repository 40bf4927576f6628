"""End-to-end Histo-DD runs at toy size: shapes, loss decrease, per-slide mode, resume, pool cache."""

from pathlib import Path

import numpy as np
import pytest

from histodd_fed.distill import DistillConfig, distill, run_distillation
from histodd_fed.errors import InputError
from histodd_fed.patchset import PatchSet

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "distill-tiny.yaml"


def toy_set(n_per_class: int = 12, size: int = 16, slides: int = 0, seed: int = 0) -> PatchSet:
    """Two H&E-coloured classes with different textures (pink smooth vs purple dotted)."""
    rng = np.random.default_rng(seed)
    ims, labels = [], []
    for c in range(2):
        base = np.array([225, 150, 195]) if c == 0 else np.array([140, 80, 165])
        x = base + rng.normal(0, 12, size=(n_per_class, size, size, 3))
        if c == 1:
            x[:, ::4, ::4] -= 60
        ims.append(np.clip(x, 0, 255).astype(np.uint8))
        labels += [c] * n_per_class
    ps = PatchSet(images=np.concatenate(ims), labels=np.array(labels), class_names=["normal", "tumour"])
    if slides:
        ps.slide_ids = [f"S{i}" for i in range(slides)]
        ps.slide_index = (np.arange(len(ps)) % slides).astype(np.int32)
        ps.slide_labels = {s: i % 2 for i, s in enumerate(ps.slide_ids)}
    return ps


def test_tiny_distillation_shapes_labels_dtype(tmp_path):
    real = toy_set()
    cfg = DistillConfig.from_yaml(TINY)
    syn = distill(real, cfg, work_dir=tmp_path, progress=False)
    assert syn.kind == "synthetic" and syn.images.dtype == np.uint8
    assert syn.images.shape == (4, 16, 16, 3)
    assert syn.labels.tolist() == [0, 0, 1, 1] and syn.class_names == ["normal", "tumour"]
    assert syn.meta["complete"] and len(syn.meta["loss_curve"]) == cfg.outer_steps
    assert syn.meta["config"]["ipc"] == 2 and len(syn.meta["source_data_sha256"]) == 64
    assert not np.array_equal(syn.images, real.images[syn.meta["init_source_indices"]])  # images moved
    syn.save(tmp_path / "syn")
    assert PatchSet.load(tmp_path / "syn").kind == "synthetic"


def test_matching_loss_decreases_on_a_fixed_model():
    # Fixed model (no augmentation, no model updates, whole class as the real batch): plain
    # gradient descent on the matching objective must lower it.
    real = toy_set(8)
    cfg = DistillConfig.from_yaml(TINY, outer_steps=1, inner_steps=12, net_steps=0, alpha=0.0, augmentation="none",
                                  batch_real=8, lr_img=0.002, momentum_img=0.0)
    res = run_distillation(real, cfg, progress=False)
    row = res.patchset.meta["loss_curve"][0]
    assert row["last"] < 0.8 * row["first"], row


def test_per_slide_mode_keeps_slide_ids():
    real = toy_set(9, slides=3)
    # slide S2 has only class 0 patches
    keep = ~((real.slide_index == 2) & (real.labels == 1))
    real = real.subset(np.flatnonzero(keep))
    cfg = DistillConfig.from_yaml(TINY, per_slide=True, slide_outer_steps=1, inner_steps=2, slide_group_min=0)
    syn = distill(real, cfg, progress=False)
    assert syn.slide_ids == ["S0", "S1", "S2"] and syn.slide_labels == real.slide_labels
    counts = {(syn.slide_of(i), int(syn.labels[i])) for i in range(len(syn))}
    assert counts == {("S0", 0), ("S0", 1), ("S1", 0), ("S1", 1), ("S2", 0)}
    assert len(syn) == 5 * cfg.ipc
    assert len(syn.for_slide("S2")) == cfg.ipc
    # each synthetic image starts from a patch of its own slide and class
    for i, j in enumerate(syn.meta["init_source_indices"]):
        assert real.slide_of(j) == syn.slide_of(i) and real.labels[j] == syn.labels[i]
    with pytest.raises(InputError, match="slide"):
        distill(toy_set(), cfg, progress=False)
    # with the default top-up (slide_group_min 8) each group of 3 borrows its class from other slides
    topped = distill(real, DistillConfig.from_yaml(TINY, per_slide=True, slide_outer_steps=1, inner_steps=2),
                     progress=False)
    for i, j in enumerate(topped.meta["init_source_indices"]):
        assert real.labels[j] == topped.labels[i]
    assert {w["own"] for w in topped.meta["slide_groups_widened"]} == {3}


def test_resume_equals_uninterrupted_and_pool_is_cached(tmp_path):
    real = toy_set()
    cfg = DistillConfig.from_yaml(TINY, outer_steps=3, inner_steps=2, checkpoint_every=1)
    full = distill(real, cfg, work_dir=tmp_path / "a", progress=False)
    assert full.meta["pool"]["reused"] is False
    part = distill(real, cfg, work_dir=tmp_path / "b", progress=False, stop_after_steps=1)
    assert part.meta["complete"] is False and part.meta["steps_done"] == 1
    assert list((tmp_path / "b" / "checkpoints").glob("*.pt"))
    resumed = distill(real, cfg, work_dir=tmp_path / "b", progress=False)
    assert resumed.meta["complete"] and resumed.meta["pool"]["reused"] is True
    assert resumed.meta["timings"]["outer_steps_this_call"] == cfg.outer_steps - 1
    assert np.array_equal(resumed.images, full.images)
    assert [r["mean"] for r in resumed.meta["loss_curve"]] == [r["mean"] for r in full.meta["loss_curve"]]
    # --no-resume discards the checkpoint and redoes every step, with the same result
    distill(real, cfg, work_dir=tmp_path / "c", progress=False, stop_after_steps=1)
    fresh = distill(real, cfg, work_dir=tmp_path / "c", progress=False, resume=False)
    assert fresh.meta["timings"]["outer_steps_this_call"] == cfg.outer_steps
    assert np.array_equal(fresh.images, full.images)
    # a different seed is a different run: no resume, different images
    other_cfg = DistillConfig.from_dict(cfg.to_dict(), seed=1)
    other = distill(real, other_cfg, work_dir=tmp_path / "b", progress=False, stop_after_steps=1)
    assert other.meta["steps_done"] == 1 and other.meta["pool"]["reused"] is False


def test_noise_init_and_cosine_distance():
    cfg = DistillConfig.from_yaml(TINY, init="noise", distance="cosine", outer_steps=1, inner_steps=2, lr_img=0.1)
    syn = distill(toy_set(), cfg, progress=False)
    assert syn.images.shape == (4, 16, 16, 3) and syn.meta["complete"]
