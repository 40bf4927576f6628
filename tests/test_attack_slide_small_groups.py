"""Attack: per-slide synthetic bags that start from a tumour slide's one or two tumour patches.

A tumour pseudo-slide holds a few % tumour patches (1-6 of 64). Per-slide distillation makes ``ipc`` tumour
images for that slide; when they start from a mixture of only the slide's own 1-2 tumour patches and move for a
handful of steps, each is that patch again, and the per-slide bag is a copy of real tissue. The copy detector
(the export gate's independent rule) is the attacker's yardstick here: it finds the patch in the released image.
``slide_group_min`` (default 8) tops a small (slide, class) group up with that class's patches from other slides
of the same slide label, so no image starts from, or is matched to, a mixture of fewer than 8 patches.
"""

import numpy as np
import pytest

from histodd_fed.distill import DistillConfig, distill
from histodd_fed.distill.initialisation import plan_stages
from histodd_fed.errors import ConfigError
from histodd_fed.patchset import PatchSet
from histodd_fed.privacy.copies import detect_copies

FAST = dict(model="convnet", model_kwargs={"width": 8, "depth": 2}, image_size=16, ipc=2, init="mixture",
            init_mix=8, objective="distribution", outer_steps=1, slide_outer_steps=1, inner_steps=1, lr_img=0.01,
            batch_real=8, pool_size=1, pool_epochs=0, pool_batch=16, batch_net=16, augmentation="flip",
            per_slide=True, checkpoint_every=0, device="cpu", seed=0)


def slides_with_a_lonely_tumour_patch() -> tuple[PatchSet, int]:
    """Four slides of distinct random textures: T0 (tumour) holds ONE tumour patch and 10 normals, T1 and T2
    (tumour) 6 tumour patches and 10 normals each, N3 (normal) 12 normals. Returns the set and the lonely patch."""
    rng = np.random.default_rng(0)
    tumour = {0: 1, 1: 6, 2: 6, 3: 0}
    normal = {0: 10, 1: 10, 2: 10, 3: 12}
    ims, labels, slide = [], [], []
    for s in range(4):
        for c, n in ((0, normal[s]), (1, tumour[s])):
            base = np.array([225, 150, 195]) if c == 0 else np.array([140, 80, 165])
            x = base + rng.normal(0, 40, size=(n, 16, 16, 3))
            ims.append(np.clip(x, 0, 255).astype(np.uint8))
            labels += [c] * n
            slide += [s] * n
    ps = PatchSet(images=np.concatenate(ims), labels=np.array(labels), class_names=["normal", "tumour"],
                  slide_index=np.array(slide, dtype=np.int32), slide_ids=["T0", "T1", "T2", "N3"],
                  slide_labels={"T0": 1, "T1": 1, "T2": 1, "N3": 0})
    lonely = int(np.flatnonzero((ps.slide_index == 0) & (ps.labels == 1))[0])
    return ps, lonely


def tumour_images_of_slide(syn: PatchSet, slide: str) -> list[int]:
    return [i for i in range(len(syn)) if syn.slide_of(i) == slide and syn.labels[i] == 1]


def test_a_lonely_tumour_patch_is_released_as_a_copy_without_the_top_up():
    real, lonely = slides_with_a_lonely_tumour_patch()
    syn = distill(real, DistillConfig(**FAST, slide_group_min=0), progress=False)
    report = detect_copies(syn.images, real.images, [None])
    found = [report.findings[i] for i in tumour_images_of_slide(syn, "T0")]
    assert len(found) == FAST["ipc"]
    for f in found:  # the attack succeeds: each of T0's tumour images IS the slide's one tumour patch
        assert f.flagged and f.kind == "copy" and f.sources[0] == lonely, f.describe(report.threshold)
        assert f.copy_r2 >= 0.97
    assert "slide_groups_widened" in syn.meta and syn.meta["slide_groups_widened"] == []


def test_the_top_up_borrows_from_tumour_slides_and_the_copy_is_gone():
    real, lonely = slides_with_a_lonely_tumour_patch()
    syn = distill(real, DistillConfig(**FAST), progress=False)   # slide_group_min: 8 (the default)
    report = detect_copies(syn.images, real.images, [None])
    for i in tumour_images_of_slide(syn, "T0"):
        f = report.findings[i]
        assert not f.flagged, f.describe(report.threshold)
        assert f.copy_r2 < 0.5   # no real patch explains it as a copy (the lonely one did, R^2 >= 0.97)
    # every small group is named, with what it borrowed; T0's tumour group from the other tumour slides only
    widened = {(w["slide"], w["class"]): w for w in syn.meta["slide_groups_widened"]}
    assert widened[("T0", "tumour")] == {"slide": "T0", "class": "tumour", "own": 1, "borrowed": 7}
    assert widened[("T1", "tumour")]["borrowed"] == 2 and ("N3", "normal") not in widened
    stages = plan_stages(real, DistillConfig(**FAST), np.random.default_rng(0))
    g = next(g for st in stages for g in st if g.slide == 0 and g.label == 1)
    assert lonely in g.real_idx and len(g.real_idx) == 8
    assert set(real.slide_index[g.real_idx].tolist()) <= {0, 1, 2} and (real.labels[g.real_idx] == 1).all()
    assert g.mix_idx.shape[1] == 8   # every start is a mixture of 8 patches, not of the lonely one


def test_slide_group_min_is_validated_and_kept_out_of_patch_level_keys():
    with pytest.raises(ConfigError, match="slide_group_min"):
        DistillConfig(**FAST, slide_group_min=-1)
    assert "slide_group_min" in DistillConfig(**FAST).result_dict()
    patch_level = {**FAST, "per_slide": False}
    assert "slide_group_min" not in DistillConfig(**patch_level).result_dict()   # their caches stay valid
    assert "slide_group_min" not in DistillConfig(**patch_level).cache_dict()    # (federation set cache too)
    assert DistillConfig(**FAST).cache_dict()["slide_group_min"] == 8            # per-slide sets: a new key
