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


def test_resume_after_interrupted_run_gives_the_same_store(centre, store, tmp_path, monkeypatch):
    """Kill the run (KeyboardInterrupt) while the third slide is read, leave stale temp files as a
    SIGKILL would, re-run: finished slides are reused and the store is identical."""
    import json

    import histodd_fed.slides.tiling as tiling

    real = tiling.tile_one_slide
    calls = []

    def interrupt_on_third(record, cfg, ann_dirs, images_path=None):
        calls.append(record.slide_id)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user's Ctrl-C in the middle of slide 3
        return real(record, cfg, ann_dirs, images_path=images_path)

    out = tmp_path / "store"
    monkeypatch.setattr(tiling, "tile_one_slide", interrupt_on_third)
    with pytest.raises(KeyboardInterrupt):
        tile_slides(centre, out, **TILE)
    monkeypatch.undo()
    assert not out.exists()  # nothing half-written
    work = tmp_path / ".store.work"
    assert sorted(p.name for p in work.glob("*.json")) == [f"{s}.json" for s in calls[:2]]
    assert not list(work.glob("*.tmp"))  # the interrupted slide's temp shard was removed
    # what a SIGKILL could leave: a temp file and a shard without its done-marker
    (work / f".{calls[2]}.images.npy.999.tmp").write_bytes(b"partial")
    (work / f"{calls[2]}.npz").write_bytes(b"partial")
    rep = tile_slides(centre, out, **TILE)
    assert sorted(rep.reused) == sorted(calls[:2]) and len(rep.tiled) == 2
    a, b = PatchSet.load(out), PatchSet.load(store[0])
    for k in ("images", "labels", "coords", "slide_index"):
        np.testing.assert_array_equal(getattr(a, k), getattr(b, k))
    assert a.slide_ids == b.slide_ids and a.slide_labels == b.slide_labels
    assert json.dumps(a.meta, sort_keys=True) == json.dumps(b.meta, sort_keys=True)
    assert not work.exists()


def test_thumbnail_is_read_in_strips(centre):
    """The strip-wise thumbnail (bounded memory) equals the one-strip thumbnail."""
    from histodd_fed.slides.reader import open_slide

    path = read_manifest(centre)[0].path
    with open_slide(path) as s:
        whole, ds = s.thumbnail(8.0)
        strips, ds2 = s.thumbnail(8.0, max_strip_bytes=s.level_dimensions[0][0] * 4 * 3)  # few rows a strip
        assert whole.shape == (48, 64, 3) and ds == ds2 == 8.0
        assert np.abs(whole.astype(int) - strips.astype(int)).max() <= 1


def test_patches_folder_becomes_the_same_store(tmp_path):
    """`tile --patches DIR` (ImageFolder / PCam layout) writes a PatchSet store like slide tiling."""
    from PIL import Image
    from typer.testing import CliRunner

    from centre_node.cli import app

    rng = np.random.default_rng(0)
    src = tmp_path / "pcam"
    for c, base in (("normal", 200), ("tumour", 90)):
        (src / c).mkdir(parents=True)
        for i in range(3 if c == "normal" else 2):
            a = np.clip(base + rng.normal(0, 5, (24, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(src / c / f"p{i}.png")
    r = CliRunner().invoke(app, ["-q", "tile", "--patches", str(src), "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert "patches: 5 (normal 3, tumour 2)" in r.stdout
    ps = PatchSet.load(tmp_path / "s")
    assert ps.kind == "real" and ps.class_names == ["normal", "tumour"] and ps.images.shape == (5, 24, 24, 3)
    assert ps.labels.tolist() == [0, 0, 0, 1, 1] and ps.meta["input"] == "patches"
    assert (tmp_path / "s" / "run_config.json").is_file() and (tmp_path / "s" / "tile_report.json").is_file()
    r = CliRunner().invoke(app, ["-q", "tile", "--patches", str(src), "--out", str(tmp_path / "r"), "--patch-size", "16"])
    assert r.exit_code == 0 and PatchSet.load(tmp_path / "r").images.shape == (5, 16, 16, 3)
    r = CliRunner().invoke(app, ["-q", "tile", "--patches", str(src), "--slides", str(src), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "exactly one of --slides" in str(r.exception)


def test_real_pcam_folder_imports(tmp_path):
    from pathlib import Path

    from histodd_fed.slides.tiling import tile_patches

    pcam = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pcam-ai4all" / "valid"
    if not pcam.is_dir():
        pytest.skip(f"{pcam} absent: needs ../shared/data next to the checkout")
    rep = tile_patches(pcam, tmp_path / "p", limit_per_class=10, seed=0)
    ps = PatchSet.load(tmp_path / "p")
    assert rep.n_patches == 20 and ps.images.shape[1:] == (96, 96, 3) and ps.class_names == ["normal", "tumour"]
