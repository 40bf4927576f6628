"""Drift from the start: recorded at every checkpoint, a summary in the set's meta, the per-image record (and
the drift to the real patches a mixture was made of) only in a local file - never in a bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from centre_node.cli import app
from histodd_fed.distill import DistillConfig, run_distillation
from histodd_fed.distill.drift import DriftRecorder, pair_drift
from histodd_fed.patchset import PatchSet
from histodd_fed.studies.toy_data import make_toy_patchset

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "distill-tiny.yaml"
SUMMARY_KEYS = {"reference", "structure_pool", "n_images", "steps", "rms_mean", "abs_mean_mean", "ssim_mean",
                "structure_mean"}


def _cfg(**kw) -> DistillConfig:
    return DistillConfig.from_yaml(TINY, **{"outer_steps": 3, "inner_steps": 2, "checkpoint_every": 1, "lr_img": 0.05,
                                            **kw})


def test_pair_drift_of_identical_and_changed_images():
    x = torch.rand(3, 3, 16, 16)
    d = pair_drift(x, x)
    assert np.allclose(d["rms"], 0) and np.allclose(d["ssim"], 1, atol=1e-5) and np.allclose(d["structure"], 1)
    y = (x + 0.1).clamp(0, 1)
    d = pair_drift(y, x)
    assert (d["rms"] > 0.05).all() and (d["structure"] > 0.9).all()     # a brightness shift keeps the layout


def test_drift_recorded_per_checkpoint_summary_in_meta_per_image_local(tmp_path):
    real = make_toy_patchset(10, 16, seed=0)
    res = run_distillation(real, _cfg(init="mixture", init_mix=3), tmp_path, progress=False)
    d = res.patchset.meta["drift"]
    assert set(d) == SUMMARY_KEYS and d["steps"] == [0, 1, 2, 3] and d["n_images"] == 4
    assert d["rms_mean"][0] == 0 and d["ssim_mean"][0] == pytest.approx(1, abs=1e-4)
    assert d["rms_mean"][-1] > 0 and d["ssim_mean"][-1] < 1
    local = res.drift_local
    assert len(local["to_start"]["rms"]) == 4 and len(local["to_start"]["rms"][0]) == 4     # steps x images
    src = np.asarray(local["to_real"]["source_indices"])
    assert src.shape == (4, 3) and (real.labels[src] == np.repeat([0, 1], 2)[:, None]).all()
    # at step 0 an image is the mean of its sources: closer to them than any later step's image
    assert len(local["to_real"]["closest_source"]["ssim"]) == 4
    assert set(local["to_real_summary"]) == {f"{m}_mean" for m in ("rms", "abs_mean", "ssim", "structure")}
    text = json.dumps(res.patchset.meta)
    assert "to_real" not in text and "closest_source" not in text and "to_start" not in text

    # every 2 steps + the last one; real init: to_real is the start itself
    res2 = run_distillation(real, _cfg(checkpoint_every=2), None, progress=False)
    assert res2.patchset.meta["drift"]["steps"] == [0, 2, 3]
    assert isinstance(res2.drift_local["to_real"], str)


def test_drift_survives_a_resume(tmp_path):
    real = make_toy_patchset(10, 16, seed=1)
    full = run_distillation(real, _cfg(), tmp_path / "a", progress=False).patchset.meta["drift"]
    part = run_distillation(real, _cfg(), tmp_path / "b", progress=False, stop_after_steps=2)
    assert part.patchset.meta["drift"]["steps"] == [0, 1, 2]
    rest = run_distillation(real, _cfg(), tmp_path / "b", progress=False).patchset.meta["drift"]
    assert rest == full


def test_a_bundle_carries_the_drift_summary_and_nothing_per_image(tmp_path):
    from histodd_fed.bundle import Ledger, TrustStore, generate_identity, open_bundle, seal

    real = make_toy_patchset(10, 16, seed=2)
    res = run_distillation(real, _cfg(init="mixture", init_mix=3), None, progress=False)
    c1, c2 = generate_identity("C1", tmp_path / "C1"), generate_identity("C2", tmp_path / "C2")
    store = TrustStore.load(tmp_path / "C2")
    store.add(c1.public)
    store.save()
    opened = open_bundle(seal(res.patchset, c1, [c2.public]), c2, TrustStore.load(tmp_path / "C2"),
                         Ledger(tmp_path / "l.json"))
    sent = opened.manifest["distillation_config"]
    assert set(sent["drift"]) == SUMMARY_KEYS and sent["method"] == "histo-dd"
    text = json.dumps(opened.manifest)
    for key in ("to_real", "closest_source", "to_start", "\"source_indices\""):
        assert key not in text


def test_recorder_skips_a_repeated_step():
    r = DriftRecorder(torch.rand(2, 3, 8, 8))
    r.record(0, r.initial)
    r.record(0, r.initial)
    assert r.summary()["steps"] == [0]


def _store(tmp_path: Path) -> Path:
    return make_toy_patchset(10, 16, seed=4).save(tmp_path / "store")


def test_cli_writes_drift_files_inspect_shows_method_and_drift(tmp_path):
    out = tmp_path / "syn"
    r = CliRunner().invoke(app, ["-q", "distill", "--patches", str(_store(tmp_path)), "--out", str(out), "--config",
                                 str(TINY), "--ipc", "1", "--outer-steps", "2", "--inner-steps", "1",
                                 "--limit-per-class", "6", "--no-gate"])
    assert r.exit_code == 0, r.output
    assert "method histo-dd" in r.output and "drift from the start after 2 outer steps" in r.output
    syn = PatchSet.load(out)
    assert syn.meta["source_num_images"] == 12 and syn.meta["drift"]["steps"] == [0, 2]
    assert json.loads((out / "run_config.json").read_text())["config"]["limit_per_class"] == 6
    assert (out / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "to_start" in json.loads((out / "drift.json").read_text())
    r = CliRunner().invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert "method: histo-dd" in r.output and "drift_last: after 2 outer steps" in r.output
    assert "local only" in r.output
    r = CliRunner().invoke(app, ["inspect", str(out), "--json"])
    assert json.loads(r.output)["drift"]["steps"] == [0, 2]


def test_cli_refuses_a_flag_the_recipe_does_not_use(tmp_path):
    r = CliRunner().invoke(app, ["distill", "--patches", str(_store(tmp_path)), "--out", str(tmp_path / "o"),
                                 "--preset", "pcam", "--inner-steps", "5"])
    assert r.exit_code != 0
    msg = str(r.exception)
    assert "--inner-steps is not used" in msg and "\n" not in msg and not (tmp_path / "o").exists()
    r = CliRunner().invoke(app, ["distill", "--patches", str(_store(tmp_path)), "--out", str(tmp_path / "o"),
                                 "--config", str(TINY), "--limit-per-class", "0"])
    assert r.exit_code != 0 and "--limit-per-class" in str(r.exception)
