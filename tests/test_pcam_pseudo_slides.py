"""Pseudo-slides on the five-hospital pcam-c17 benchmark (issue 23 item 3): construction and slide columns."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from histodd_fed.datasets.pseudo_slides import SlideSpec, bag_range, draw_slides, slide_set, tumour_counts
from histodd_fed.errors import ConfigError
from histodd_fed.patchset import PatchSet

CLASSES = ["normal", "tumour"]


def _split(n_normal: int, n_tumour: int, seed: int = 0) -> PatchSet:
    rng = np.random.default_rng(seed)
    labels = np.array([0] * n_normal + [1] * n_tumour)
    return PatchSet(rng.integers(0, 255, (len(labels), 4, 4, 3), dtype=np.uint8), labels, CLASSES,
                    meta={"files": [f"{CLASSES[y]}/{i}.jpg" for i, y in enumerate(labels)]})


# ---------------------------------------------------------------------------- construction (no data needed)
def test_tumour_share_bag_size_and_normal_slides_tumour_free():
    spec = SlideSpec(patches=(64, 96), tumour_share=(0.02, 0.10), test=20)
    split = _split(250, 250)
    ps, info = slide_set(split, split.meta["files"], 20, spec, seed=3, prefix="H2-target-test")
    assert ps is not None and info["slides"] == 40 and info["normal_slides"] == info["tumour_slides"] == 20
    assert len(ps.slide_ids) == 40 and set(ps.slide_labels.values()) == {0, 1}
    for j, sid in enumerate(ps.slide_ids):
        rows = np.flatnonzero(ps.slide_index == j)
        src = np.asarray(ps.meta["split_indices"])[rows]
        assert len(np.unique(src)) == len(src)                       # no patch twice inside a slide
        assert 64 <= len(rows) <= 96                                  # the bag size range (cap 125)
        share = float((ps.labels[rows] == 1).mean())
        if ps.slide_labels[sid] == 0:
            assert share == 0.0 and sid.startswith("H2-target-test-n")
        else:
            assert 0.02 <= share <= 0.10 and share > 0 and sid.startswith("H2-target-test-t")
        assert (split.labels[src] == ps.labels[rows]).all()          # rows are the split's own patches
        assert (split.images[src] == ps.images[rows]).all()
    assert 0.02 <= info["tumour_share"][0] <= info["tumour_share"][1] <= 0.10
    assert [ps.meta["files"][i] for i in range(3)] == [split.meta["files"][k] for k in ps.meta["split_indices"][:3]]


def test_seeded_and_capped_by_the_split():
    spec = SlideSpec()
    a = draw_slides(np.array([0] * 250 + [1] * 250), CLASSES, 5, spec, seed=7)
    b = draw_slides(np.array([0] * 250 + [1] * 250), CLASSES, 5, spec, seed=7)
    c = draw_slides(np.array([0] * 250 + [1] * 250), CLASSES, 5, spec, seed=8)
    assert all(x[0] == y[0] and (x[1] == y[1]).all() for x, y in zip(a, b))
    assert any(len(x[1]) != len(y[1]) or (x[1] != y[1]).any() for x, y in zip(a, c))
    assert bag_range(spec, 250) == (64, 64)
    assert bag_range(spec, 50) == (25, 25)                          # a target's 50 train normals: 25-patch bags
    assert list(tumour_counts(25, spec.tumour_share)) == [1, 2] and list(tumour_counts(64, spec.tumour_share)) == \
        [2, 3, 4, 5, 6]
    assert isinstance(bag_range(spec, 20), str)                     # too few normals: no slides, a reason
    none, info = slide_set(_split(6, 6), [f"f{i}" for i in range(12)], 3, spec, seed=0, prefix="x")
    assert none is None and info["slides"] == 0 and "normal patches" in info["why_none"]
    with pytest.raises(ConfigError, match="--tumour-share"):
        SlideSpec(tumour_share=(0.2, 0.1))
    with pytest.raises(ConfigError, match="classes"):
        draw_slides(np.array([0, 1]), ["a", "b"], 1, spec, seed=0)


# ---------------------------------------------------------------------------- real hospitals (tiny)
@pytest.fixture(scope="module")
def slide_hospitals(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "pcam-ai4all").is_dir() or not (SHARED_DATA / "camelyon17-stain-tiles").is_dir():
        pytest.skip(f"{SHARED_DATA}/pcam-ai4all or camelyon17-stain-tiles absent: needs ../shared/data")
    out = tmp_path_factory.mktemp("slides") / "centres"
    r = subprocess.run([sys.executable, "-m", "centre_node.cli", "-q", "make-pcam-centres",
                        "--pcam", str(SHARED_DATA / "pcam-ai4all"), "--stains",
                        str(SHARED_DATA / "camelyon17-stain-tiles"), "--out", str(out), "--hospitals", "0,2",
                        "--limit", "80", "--target-train-per-class", "20", "--seed", "1",
                        "--slide-patches", "10", "--tumour-share", "0.05-0.15", "--slides-source-train", "4",
                        "--slides-target-train", "3", "--slides-test", "4"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def test_pseudo_slides_never_cross_splits_or_hospitals(slide_hospitals):
    m = json.loads((slide_hospitals / "manifest.json").read_text())
    assert m["pseudo_slides"]["patches"] == [10, 10] and m["pseudo_slides"]["tumour_share"] == [0.05, 0.15]
    owner: dict[str, str] = {}     # PCam file -> the one split (of one hospital) holding it
    for d in (0, 2):
        h = slide_hospitals / f"H{d}"
        for split in ("source/train", "target/train", "target/test"):
            for f in PatchSet.load(h / split).meta["files"]:
                key = f"{'train' if split.startswith('source') else 'valid'}/{f}"
                assert key not in owner
                owner[key] = f"H{d} {split}"
        assert (h / "source" / "slides-test").resolve() == (h / "target" / "slides-test").resolve()
        for folder, split in (("source/slides-train", "source/train"), ("target/slides-train", "target/train"),
                              ("target/slides-test", "target/test")):
            ps = PatchSet.load(h / folder)
            base = PatchSet.load(h / split)
            rec = m["centres"][f"H{d}"]["pseudo_slides"][folder]
            assert rec["split"] == split and rec["bytes"] > 0 and rec["slides"] == len(ps.slide_ids)
            for f in ps.meta["files"]:       # every slide patch belongs to that split, of that hospital
                key = f"{'train' if split.startswith('source') else 'valid'}/{f}"
                assert owner[key] == f"H{d} {split}", (folder, key, owner[key])
            idx = np.asarray(ps.meta["split_indices"])
            assert (base.images[idx] == ps.images).all() and (base.labels[idx] == ps.labels).all()
            for j, sid in enumerate(ps.slide_ids):
                share = float((ps.labels[ps.slide_index == j] == 1).mean())
                assert share == 0.0 if ps.slide_labels[sid] == 0 else 0.05 <= share <= 0.15


def _local_run_study(cfg, node_cfgs):
    """The benchmark's studies in-process (LocalTransport), as the Flower runtimes would run them. The tiny
    preset's 1-2 distillation steps leave near copies: the sources' export gate is off (recorded)."""
    from histodd_fed.federation.centre import CentreNode
    from histodd_fed.federation.centre_config import CentreConfig
    from histodd_fed.federation.coordinator import LocalTransport, run_transfer_study

    nodes = {10 + i: CentreNode(CentreConfig.from_node_config(dict(nc, **{"export-gate": "off"})))
             for i, nc in enumerate(node_cfgs)}
    return run_transfer_study(LocalTransport(nodes), replace(cfg, runtime="local", discovery_timeout=0))


def test_transfer_fills_the_slide_columns(slide_hospitals, tmp_path, monkeypatch):
    """A tiny H0 -> H2 run: "target alone", "+ ipc 2" and "+ Full" all carry slide AUC and accuracy."""
    from histodd_fed.federation import presets
    from histodd_fed.federation.hospital_benchmark import run_hospitals_benchmark

    monkeypatch.setitem(presets.PRESETS, "tiny-slides", replace(
        presets.PRESETS["tiny"], name="tiny-slides", max_train_patches=0, select_grid=((1, 0.5),)))
    out = tmp_path / "R"
    rep = run_hospitals_benchmark(slide_hospitals, out, sources="0", target="2", ipcs=[2], seeds=1,
                                  run_study=_local_run_study, preset="tiny-slides", epochs=1, say=lambda m: None)
    assert rep["faults"] == [], rep["faults"]
    summary = {r["transfer"]: r for r in csv.DictReader(io.StringIO((out / "summary.csv").read_text()))}
    assert list(summary) == ["target alone", "+ ipc 2", "+ Full"]
    for tr, r in summary.items():
        assert 0.0 <= float(r["slide_auc_mean"]) <= 1.0, (tr, r)
        assert 0.0 <= float(r["slide_acc_mean"]) <= 1.0, (tr, r)
        assert r["slide_note"] == ""
    for tr in ("+ ipc 2", "+ Full"):
        assert summary[tr]["slide_auc_gain_mean"] != ""
    md = (out / "summary.md").read_text()
    assert "pseudo-slides" in md and "slide AUC [95% CI]" in md
    # what the target fine-tuned its MIL head on: per-slide synthetic bags (ipc row), the real slides (Full)
    rows = json.loads((out / "runs" / "H2" / "seed0" / "report.json").read_text())["raw_rows"]
    ipc = next(r for r in rows if r.get("mode") == "synthetic")
    full = next(r for r in rows if r.get("mode") == "full")
    assert ipc["slide_bags"] == 8 and ipc["slide_images"] == 4 + 2 * 4       # 1 per class present per H0 slide
    assert full["slide_bags"] == 8 and full["slide_images"] == 80             # 8 real 10-patch slides
    assert full["images"] == 80                                               # its patch part: all 80 patches
    assert [p["part"] for p in full["slides_received_from"]] == ["slides"]
    # bytes: the whole row and its patch-level part, each against Full's (the "<= 1/100 of Full's bytes")
    assert 0 < ipc["patch_bytes"] < ipc["bytes"] and 0 < full["patch_bytes"] < full["bytes"]
    assert float(summary["+ Full"]["patch_bytes_vs_full"]) == 1.0
    assert float(summary["+ ipc 2"]["patch_bytes_vs_full"]) == pytest.approx(ipc["patch_bytes"] / full["patch_bytes"],
                                                                             abs=1e-5)
    assert "patch set / Full's" in md


def _untimed(report):
    """A gate report without its timings (``seconds`` keys), for comparing two runs."""
    if isinstance(report, dict):
        return {k: _untimed(v) for k, v in report.items() if "seconds" not in k}
    if isinstance(report, list):
        return [_untimed(v) for v in report]
    return report


def test_slide_parts_made_beside_the_patch_parts_equal_one_process(slide_hospitals, tmp_path, monkeypatch):
    """With ``workers: 2`` a source makes its per-slide sets in a spawned process while it makes the patch-level
    ones: the same images, the same gate verdicts and reports as making them one after the other."""
    from histodd_fed.federation import centre_data, outgoing_sets, presets
    from histodd_fed.federation.centre_config import CentreConfig

    preset = replace(presets.PRESETS["tiny"], name="tiny-slides", max_train_patches=0)
    parts = [outgoing_sets.Part(2, False), outgoing_sets.Part(2, True)]
    sent: list = []

    real_spawn_pool = outgoing_sets.spawn_pool

    @contextlib.contextmanager
    def counting_pool(workers, **kwargs):
        with real_spawn_pool(workers, **kwargs) as pool:
            submit = pool.submit

            def counted(fn, *args, **kw):
                sent.append(args[2])
                return submit(fn, *args, **kw)

            pool.submit = counted
            yield pool

    monkeypatch.setattr(outgoing_sets, "spawn_pool", counting_pool)
    made = {}
    for workers in (1, 2):
        cfg = CentreConfig.from_node_config({"centre-id": "H0", "data": str(slide_hospitals / "H0" / "source"),
                                             "key-dir": str(tmp_path / f"w{workers}" / "keys"),
                                             "work-dir": str(tmp_path / f"w{workers}" / "work"), "seed": 3,
                                             "workers": workers})
        prepared = centre_data.prepare(cfg, preset, models=False)
        made[workers] = outgoing_sets.make_parts(cfg, preset, prepared, parts, seed=3)
        assert list(made[workers]) == parts and not any(m.result.cached for m in made[workers].values())
    for p in parts:
        one, two = made[1][p], made[2][p]
        assert one.result.config_hash == two.result.config_hash
        assert np.array_equal(one.result.patchset.images, two.result.patchset.images), p
        assert (one.blocked, one.message) == (two.blocked, two.message)
        assert _untimed(one.report) == _untimed(two.report)
    assert sent == [parts[1]]                             # workers 2: the per-slide part went to the worker
    assert made[2][parts[1]].result.patchset.slide_ids   # the per-slide set keeps its slide table


def test_pooled_slide_sets_keep_every_slide_a_bag():
    """--sources 0,1,3,4 / --target all: each source's slide set of a row pooled into one, slide tables merged."""
    from histodd_fed.federation.envelope import ProtocolError
    from histodd_fed.federation.receive_select import _check_slide_labels, pool_sets

    def one(prefix: str, n: int) -> PatchSet:
        labels = np.array([0, 1] * n)
        return PatchSet(np.zeros((2 * n, 4, 4, 3), np.uint8), labels, CLASSES,
                        slide_index=np.repeat(np.arange(n), 2).astype(np.int32),
                        slide_ids=[f"{prefix}-{k}" for k in range(n)],
                        slide_labels={f"{prefix}-{k}": k % 2 for k in range(n)}, kind="synthetic")

    a, b, dup = one("H0", 3), one("H1", 2), one("H0", 2)
    pooled = pool_sets([a, b, dup], CLASSES, ["H0", "H1", "H3"])
    assert len(pooled) == 14 and len(pooled.slide_ids) == len(set(pooled.slide_ids)) == 7
    assert pooled.slide_ids[:5] == ["H0-0", "H0-1", "H0-2", "H1-0", "H1-1"] and pooled.slide_ids[5] == "2:H0-0"
    assert [int((pooled.slide_index == j).sum()) for j in range(7)] == [2] * 7
    assert pooled.slide_labels["H1-1"] == 1 and pooled.slide_labels["2:H0-1"] == 1
    patch = [{"source": "H0", "row": "ipc10"}, {"source": "H1", "row": "ipc10"}]
    _check_slide_labels(patch, [{"source": "H0", "row": "ipc10"}, {"source": "H1", "row": "ipc10"}])
    with pytest.raises(ProtocolError, match="sealed as row"):
        _check_slide_labels(patch, [{"source": "H0", "row": "full"}])
    with pytest.raises(ProtocolError, match="one per source"):
        _check_slide_labels(patch, [{"source": "H0", "row": "ipc10"}, {"source": "H0", "row": "ipc10"}])
    with pytest.raises(ProtocolError, match="one per source"):
        _check_slide_labels(patch, [{"source": "H4", "row": "ipc10"}])


def test_per_slide_mixture_init_with_a_few_tumour_patches_per_slide():
    """A tumour pseudo-slide holds 2-6 tumour patches, fewer than init_mix 8: its mixtures use what it has."""
    from histodd_fed.distill import DistillConfig, run_distillation

    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 2 + [0] * 30)                 # slide 0: 2 tumour of 32; slide 1: normal
    ps = PatchSet(rng.integers(0, 255, (62, 16, 16, 3), dtype=np.uint8), labels, CLASSES,
                  slide_index=np.array([0] * 32 + [1] * 30, dtype=np.int32), slide_ids=["t0", "n0"],
                  slide_labels={"t0": 1, "n0": 0})
    cfg = DistillConfig(model="convnet", model_kwargs={"width": 8, "depth": 2}, image_size=16, ipc=2, outer_steps=1,
                        inner_steps=1, batch_real=8, pool_size=1, pool_epochs=0, pool_batch=16, batch_net=16,
                        augmentation="flip", distance="l1", lr_img=0.01, checkpoint_every=0, device="cpu", seed=3,
                        objective="distribution", init="mixture", init_mix=8, init_colour_pool=32, net_steps=0,
                        per_slide=True, slide_outer_steps=1)
    syn = run_distillation(ps, cfg, progress=False).patchset
    assert len(syn) == 6 and syn.slide_ids == ["t0", "n0"] and list(np.bincount(syn.slide_index)) == [4, 2]
