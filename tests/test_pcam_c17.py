"""PCam x Camelyon17 benchmark centres (make-pcam-centres): stain shift, labels and morphology kept."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from histodd_fed.patchset import PatchSet


@pytest.fixture(scope="module")
def centres(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "pcam-ai4all").is_dir() or not (SHARED_DATA / "camelyon17-stain-tiles").is_dir():
        pytest.skip(f"{SHARED_DATA}/pcam-ai4all or camelyon17-stain-tiles absent: needs ../shared/data")
    out = tmp_path_factory.mktemp("pc17") / "centres"
    r = subprocess.run([sys.executable, "-m", "centre_node.cli", "-q", "make-pcam-centres",
                        "--pcam", str(SHARED_DATA / "pcam-ai4all"), "--stains",
                        str(SHARED_DATA / "camelyon17-stain-tiles"), "--out", str(out), "--limit", "30",
                        "--target-train-per-class", "5", "--target-domain", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out, SHARED_DATA


def test_layout_and_counts(centres):
    out, _ = centres
    m = json.loads((out / "manifest.json").read_text())
    assert (out / "run_config.json").exists() and (out / "centres.png").stat().st_size > 10_000
    c1 = PatchSet.load(out / "C1")
    tr, te = PatchSet.load(out / "C2" / "train"), PatchSet.load(out / "C2" / "test")
    assert c1.class_counts() == {"normal": 30, "tumour": 30}
    assert tr.class_counts() == {"normal": 5, "tumour": 5} and te.class_counts() == {"normal": 25, "tumour": 25}
    assert m["centres"]["C2"]["train_class_counts"] == tr.class_counts()
    # patch-disjoint: C1 from PCam train, C2 from PCam valid, no file in both splits of C2
    assert not set(tr.meta["files"]) & set(te.meta["files"])
    assert c1.meta["source"].endswith("train") and tr.meta["source"].endswith("valid")


def test_stain_closer_to_target_than_to_c1(centres):
    from histodd_fed.stain.restain import set_profile, stain_distance

    out, _ = centres
    m = json.loads((out / "manifest.json").read_text())
    target = np.asarray(m["profiles"]["target"]["matrix"])
    c1 = set_profile(PatchSet.load(out / "C1").images).matrix
    c2 = set_profile(np.concatenate([PatchSet.load(out / "C2" / s).images for s in ("train", "test")])).matrix
    assert stain_distance(c2, target) < stain_distance(c2, c1)
    assert stain_distance(c2, target) < stain_distance(c1, target)


def test_labels_and_morphology_kept(centres):
    from histodd_fed.structure import structure_vectors
    from histodd_fed.stain.restain import load_rgb

    out, shared = centres
    te = PatchSet.load(out / "C2" / "test")
    classes = list(te.class_names)
    orig = np.stack([load_rgb(shared / "pcam-ai4all" / "valid" / f) for f in te.meta["files"]])
    labels = np.asarray([classes.index(f.split("/")[0]) for f in te.meta["files"]])
    assert (labels == te.labels).all()
    x = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    corr = (structure_vectors(x(te.images), 2) @ structure_vectors(x(orig), 2).T).numpy()
    same = np.diag(corr)
    other = corr[~np.eye(len(corr), dtype=bool)]
    assert np.median(same) > 0.9, np.median(same)
    assert (same > np.percentile(other, 99)).mean() > 0.95


@pytest.mark.parametrize("args,msg", [
    (["--pcam", "/nonexistent/pcam"], "PCam folder not found"),
    (["--target-domain", "7"], "unknown domain 7"),
])
def test_bad_inputs_one_line(centres, tmp_path, args, msg):
    _, shared = centres
    base = {"--pcam": str(shared / "pcam-ai4all"), "--stains": str(shared / "camelyon17-stain-tiles"),
            "--out": str(tmp_path / "o"), "--limit": "4", "--target-train-per-class": "1"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    r = subprocess.run([sys.executable, "-m", "centre_node.cli", "make-pcam-centres",
                        *[t for kv in base.items() for t in kv]], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0], r.stderr


# ---------------------------------------------------------------------------- federation side (no training)
def test_centre_folder_with_train_test_is_its_split(tmp_path, tiny_patchset):
    from histodd_fed.federation.centre_data import load_real_splits

    assert load_real_splits(tmp_path) is None
    tiny_patchset.save(tmp_path / "train")
    assert load_real_splits(tmp_path) is None          # needs both
    tiny_patchset.subset([0, 1, 2]).save(tmp_path / "test")
    tr, te = load_real_splits(tmp_path)
    assert len(tr) == 12 and len(te) == 3


def test_pcam_presets_keep_old_prepare_keys():
    from histodd_fed.federation.presets import get_preset

    assert "crop_center" not in get_preset("cpu").prepare_dict()          # demo caches stay valid
    assert get_preset("pcam-c17").prepare_dict()["crop_center"] == 32
    assert get_preset("pcam-c17-norm").stain_normalise_inputs


def test_extras_are_checked():
    from histodd_fed.federation.envelope import ProtocolError
    from histodd_fed.federation.extras import _check

    ok = _check({"name": "herding10", "kind": "coreset", "method": "herding", "ipc": 10})
    assert ok["ipc"] == 10
    for bad in ({"name": "../x", "kind": "coreset", "method": "herding", "ipc": 1},
                {"name": "h", "kind": "coreset", "method": "kmeans", "ipc": 1},
                {"name": "v", "kind": "variant", "ipc": 1, "overrides": {"device": "cuda"}},
                {"name": "full", "kind": "coreset", "method": "random", "ipc": 1}):
        with pytest.raises(ProtocolError):
            _check(bad)


def test_benchmark_bad_inputs(tmp_path):
    from histodd_fed.errors import ConfigError, InputError
    from histodd_fed.federation.benchmark_study import check_centres

    with pytest.raises(ConfigError, match="unknown benchmark"):
        check_centres(tmp_path, "nope")
    with pytest.raises(InputError, match="no manifest.json"):
        check_centres(tmp_path, "pcam-c17")


def test_reference_normalisation_keeps_relative_darkness(tiny_patchset):
    from histodd_fed.federation.stain_mapping import normalise_to_reference

    rng = np.random.default_rng(0)
    base = rng.integers(60, 200, size=(8, 32, 32, 3)).astype(np.uint8)
    dark = (base * 0.6).astype(np.uint8)
    ps = PatchSet(np.concatenate([base, dark]), np.array([0] * 8 + [1] * 8), ["normal", "tumour"])
    out, info = normalise_to_reference(ps, ps)
    assert info["input_stain"] == "macenko->reference"
    assert out.images[8:].mean() < out.images[:8].mean()      # one factor per set: darker stays darker


def test_real_coreset_needs_the_centres_export_real_policy(tmp_path):
    from types import SimpleNamespace

    from histodd_fed.federation.centre import CentreConfig, ExportPolicy
    from histodd_fed.federation.extras import distil_extras

    cfg = CentreConfig(centre_id="C1", data=tmp_path, key_dir=tmp_path / "k", work_dir=tmp_path / "w")
    assert not cfg.policy.real                                   # off by default
    node = SimpleNamespace(config=cfg, preset=None)
    items, blobs = distil_extras(node, [{"name": "herding10", "kind": "coreset", "method": "herding", "ipc": 10}],
                                 None, ["C2"], 0, {})
    assert blobs == {} and items[0]["blocked"] and "export-real is off" in items[0]["error"]
    cfg.policy = ExportPolicy(max_ipc=5, real=True)
    items, _ = distil_extras(node, [{"name": "herding10", "kind": "coreset", "method": "herding", "ipc": 10}],
                             None, ["C2"], 0, {})
    assert items[0]["blocked"] and "export-max-ipc 5" in items[0]["error"]


def test_flwr_simulation_run_config_round_trip(tmp_path):
    """The study travels to `flwr run` as a run-config TOML file (extras as JSON) and comes back equal."""
    import tomllib

    from coordinator.cli import run_config_for
    from coordinator.server_app import study_config_from_run_config
    from histodd_fed.federation.coordinator import StudyConfig
    from histodd_fed.federation.local_simulation import _toml_value

    extras = [{"name": "herding10", "kind": "coreset", "method": "herding", "ipc": 10}]
    cfg = StudyConfig(ipcs=[10, 50], extras=extras, study_dir=tmp_path / "s", trust=tmp_path / "t.json",
                      preset="pcam-c17", seed=2)
    rc = dict(run_config_for(cfg), runtime="flwr-simulation")
    text = "".join(f"{k} = {_toml_value(v)}\n" for k, v in rc.items())
    back = study_config_from_run_config(tomllib.loads(text))
    assert back.extras == extras and back.ipcs == [10, 50] and back.seed == 2 and back.preset == "pcam-c17"
    assert back.runtime == "flwr-simulation" and back.study_dir == tmp_path / "s"
