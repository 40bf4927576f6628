"""Tiling a tiny generated centre with real OpenSlide: labels, slide table, splits, skips, resume."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from histodd_fed.patchset import PatchSet
from histodd_fed.slides.demo import make_demo_centre
from histodd_fed.slides.manifest import read_manifest, select_split
from histodd_fed.slides.tiling import tile_slides

TINY = dict(width=512, height=384, mpp=0.5, downsamples=(1, 4, 16), tile=128)
TILE = dict(patch_size=16, mpp=2.0)


@pytest.fixture(scope="module")
def centre(tmp_path_factory):
    return make_demo_centre(tmp_path_factory.mktemp("demo") / "C1", "C1", n_slides=4, seed=1, **TINY)


@pytest.fixture(scope="module")
def store(centre, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "C1_patches"
    rep = tile_slides(centre, out, **TILE)
    return out, rep


def test_store_contents(store, centre):
    out, rep = store
    ps = PatchSet.load(out)
    recs = {r.slide_id: r for r in read_manifest(centre)}
    assert ps.kind == "real" and ps.class_names == ["normal", "tumour"]
    assert ps.images.shape[1:] == (16, 16, 3) and len(ps) == rep.n_patches > 40
    assert ps.slide_ids == list(recs)
    assert ps.slide_labels == {s: (1 if r.label == "tumour" else 0) for s, r in recs.items()}
    assert ps.meta["slide_splits"] == {s: r.split for s, r in recs.items()}
    assert ps.meta["centre"] == "C1" and ps.meta["mpp"] == 2.0 and ps.meta["patch_size"] == 16
    assert ps.meta["skipped"] == []
    assert (ps.coords % 64 == 0).all() and ps.coords[:, 0].max() < 512 and ps.coords[:, 1].max() < 384
    for sid, r in recs.items():
        sub = ps.for_slide(sid)
        assert len(sub) > 5
        if r.label == "tumour":
            assert set(sub.labels.tolist()) == {0, 1}, sid  # annotated: both classes
            assert ps.meta["label_source"][sid] == "annotations"
        else:
            assert set(sub.labels.tolist()) == {0}, sid
        assert (out / "thumbnails" / f"{sid}.png").is_file()
    assert (out / "run_config.json").is_file() and (out / "tile_report.json").is_file()
    assert not (out.parent / f".{out.name}.work").exists()  # work folder removed after success


def test_patch_pixels_match_the_slide_and_tumour_is_darker(store):
    import openslide

    out, rep = store
    ps = PatchSet.load(out)
    i = int(np.flatnonzero(ps.labels == 1)[0])
    x, y = ps.coords[i]
    path = rep.per_slide[ps.slide_of(i)]["path"]
    with openslide.OpenSlide(path) as s:
        ref = np.asarray(s.read_region((int(x), int(y)), 1, (16, 16)).convert("RGB"))
    np.testing.assert_array_equal(ps.images[i], ref)
    grey = ps.images.reshape(len(ps), -1).mean(1)
    assert grey[ps.labels == 1].mean() < grey[ps.labels == 0].mean() - 15


def test_select_split(store):
    ps = PatchSet.load(store[0])
    train, test = select_split(ps, "train"), select_split(ps, "test")
    assert len(train) + len(test) == len(ps) and len(train) and len(test)
    assert train.slide_ids == ps.slide_ids  # slide table kept
    for part, name in ((train, "train"), (test, "test")):
        sids = {part.slide_of(i) for i in range(len(part))}
        assert {ps.meta["slide_splits"][s] for s in sids} == {name}
        assert set(part.labels.tolist()) == {0, 1}


def test_corrupt_slide_skipped_and_resume_with_workers(centre, store, tmp_path):
    slides = tmp_path / "slides"
    shutil.copytree(centre.parent / "slides", slides)
    (slides / "C1_bad.tiff").write_bytes(b"II*\x00" + b"\x00garbage" * 100)
    out = tmp_path / "store"
    rep = tile_slides(slides, out, labels_csv=centre, annotations_dir=centre.parent / "annotations",
                      workers=2, keep_work=True, **TILE)
    assert [s["slide_id"] for s in rep.skipped] == ["C1_bad"]
    assert "C1_bad.tiff" in rep.skipped[0]["error"]
    ps = PatchSet.load(out)
    assert ps.meta["skipped"][0]["slide_id"] == "C1_bad" and "C1_bad" not in ps.slide_ids
    ref = PatchSet.load(store[0])
    np.testing.assert_array_equal(ps.images, ref.images)  # same result in worker processes
    np.testing.assert_array_equal(ps.labels, ref.labels)
    # re-run: finished slides come from the shards, the bad one is tried again and skipped again
    rep2 = tile_slides(slides, out, labels_csv=centre, annotations_dir=centre.parent / "annotations", **TILE)
    assert sorted(rep2.reused) == sorted(ref.slide_ids) and rep2.tiled == []
    assert [s["slide_id"] for s in rep2.skipped] == ["C1_bad"]
    np.testing.assert_array_equal(PatchSet.load(out).images, ref.images)


def test_subsample_is_seeded(centre, tmp_path):
    a = tile_slides(centre, tmp_path / "a", max_patches_per_slide=5, seed=7, **TILE)
    b = tile_slides(centre, tmp_path / "b", max_patches_per_slide=5, seed=7, **TILE)
    c = tile_slides(centre, tmp_path / "c", max_patches_per_slide=5, seed=8, **TILE)
    assert a.n_patches == 20
    pa, pb, pc = (PatchSet.load(tmp_path / k) for k in "abc")
    np.testing.assert_array_equal(pa.coords, pb.coords)
    assert not np.array_equal(pa.coords, pc.coords)
