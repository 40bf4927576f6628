"""`--preset pcam` end to end on a small generated 96-px CLASS/*.jpg folder (issue 12, "Commands
that must work"), with tiny overrides so it runs in seconds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from centre_node.cli import app
from histodd_fed.errors import ConfigError, InputError
from histodd_fed.patchset import PatchSet
from histodd_fed.preprocess import ViewSpec, recorded_view
from histodd_fed.preset import load_preset, preset_names

runner = CliRunner()
CROP = ViewSpec.centre_crop(96, 32)


def ok(*args) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, f"{args}: {r.output} {r.exception!r}"
    return r.output


def make_folder(root, n_per_class: int, seed: int) -> None:
    """96-px jpgs: class 'tumour' has a dark centre 32 px (PCam's label region), 'normal' a light one."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(["normal", "tumour"]):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            img = rng.uniform(0.6, 0.95, (96, 96, 3))
            img[32:64, 32:64] *= 0.45 if c else 1.0
            img += 0.08 * rng.standard_normal(img.shape)
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(root / name / f"{i:03d}.jpg")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pcamlike")
    make_folder(root / "train", 12, 0)
    make_folder(root / "test", 8, 1)
    return root


def test_preset_pcam_loads_and_validates(tmp_path):
    assert "pcam" in preset_names()
    p = load_preset("pcam")
    assert p.view == CROP and p.eval.arch == "convnet" and p.eval.augmentation == "flip_rotate"
    assert p.distill_config().image_size == 32 and p.distill_config(ipc=3).ipc == 3
    assert p.distill_config().candidates == 10 and p.distill_config(candidates=1).candidates == 1
    assert p.distill_config(ipc=50).candidates == 5 and p.distill_config(ipc=20).candidates == 5
    assert p.distill_config().candidate_gate and p.distill_config().privacy_step == 0
    assert p.distill_config(ipc=50).privacy_step > 0      # ipc 50: the privacy term (docs/pcam-tuning.md)
    assert p.distill_config(ipc=20).privacy_step > 0      # ipc 20 too (session 7: 1 of 3 sets blocked without)
    assert p.coreset_config(method="herding", ipc=2).arch == "convnet"
    with pytest.raises(InputError, match="no such preset"):
        load_preset("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("view: {source_size: 96, crop: 32}\nevaluation: {}\n")
    with pytest.raises(ConfigError, match="unknown preset section"):
        load_preset(bad)


def test_distill_by_ipc_changes_the_recipe_for_that_ipc_only_and_flags_still_win(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("distill: {ipc: 10, init: mixture, init_mix: 2, objective: distribution}\n"
                 "distill_by_ipc: {50: {init_mix: 4, privacy_step: 0.01}}\n")
    pre = load_preset(p)
    assert (pre.distill_config().init_mix, pre.distill_config().privacy_step) == (2, 0.0)
    assert (pre.distill_config(ipc=50).init_mix, pre.distill_config(ipc=50).privacy_step) == (4, 0.01)
    assert pre.distill_config(ipc=50, init_mix=8).init_mix == 8       # an explicit flag wins
    assert pre.to_dict()["distill_by_ipc"] == {50: {"init_mix": 4, "privacy_step": 0.01}}
    for body in ("distill_by_ipc: {fifty: {init_mix: 4}}", "distill_by_ipc: {50: {ipc: 20}}",
                 "distill_by_ipc: {50: {init_mix: -1}}"):
        p.write_text("distill: {init: mixture}\n" + body + "\n")
        with pytest.raises(ConfigError, match="distill"):
            load_preset(p)


def test_commands_that_must_work(tmp_path, data):
    train, test = data / "train", data / "test"
    S, H, R = tmp_path / "S", tmp_path / "H", tmp_path / "R"
    # distill: the preset's view and recipe, explicit flags override it (tiny run; noise init so the
    # set is not a copy of real patches and the gate lets it through)
    ok("-q", "distill", "--patches", train, "--preset", "pcam", "--ipc", 2, "--outer-steps", 1,
       "--init", "noise", "--candidates", 1, "--out", S)   # one set (best-of-5: tests/test_distill_options.py)
    syn = PatchSet.load(S)
    assert syn.image_size == 32 and syn.class_counts() == {"normal": 2, "tumour": 2}
    assert recorded_view(syn) == CROP and syn.meta["preset"] == "pcam"
    assert syn.meta["config"]["init"] == "noise" and syn.meta["config"]["outer_steps"] == 1
    assert syn.meta["config"]["model_kwargs"] == {"width": 32, "depth": 3}   # from the preset

    ok("-q", "coreset", "--method", "herding", "--patches", train, "--preset", "pcam", "--ipc", 2,
       "--feature-epochs", 1, "--out", H)
    ok("-q", "coreset", "--method", "random", "--patches", train, "--preset", "pcam", "--ipc", 2, "--out", R)
    for d in (H, R):
        cs = PatchSet.load(d)
        assert cs.image_size == 32 and recorded_view(cs) == CROP and cs.meta["config"]["arch"] == "convnet"

    # export: the view comes from the set; the raw 96-px folder is audited in it (and in the resize view)
    keys = {c: tmp_path / f"keys-{c}" for c in ("C1", "C2")}
    for c, k in keys.items():
        ok("keygen", "--centre-id", c, "--out", k, "--no-passphrase")
    ok("trust", "add", keys["C2"] / "identity.json", "--keys", keys["C1"])
    out = ok("export", "--synthetic", S, "--patches", train, "--to", "C2", "--keys", keys["C1"], "--out",
             tmp_path / "B.hdb")
    assert "privacy gate: passed" in out and (tmp_path / "B.hdb").exists()
    r = runner.invoke(app, ["export", "--synthetic", str(R), "--patches", str(train), "--to", "C2", "--keys",
                            str(keys["C1"]), "--out", str(tmp_path / "R.hdb")])
    assert r.exit_code != 0 and "centre crop 32" in str(r.exception)   # a coreset is a copy: blocked

    # evaluate: the set's recorded view is applied to the raw test folder; the preset's recipe
    J = tmp_path / "J.json"
    ok("-q", "evaluate", "--train", S, "--test", test, "--preset", "pcam", "--seeds", 1, "--epochs", 2, "--json", J)
    s = json.loads(J.read_text())
    assert 0 <= s["accuracy_mean"] <= 1 and s["arch"] == "convnet" and s["augment"] == "flip_rotate"
    assert s["n_test"] == 16 and s["view"] == CROP.to_dict() and s["arch_kwargs"] == {"width": 32, "depth": 3}
    # a raw training folder gets the preset's view (and full_epochs unless --epochs)
    J2 = tmp_path / "J2.json"
    ok("-q", "evaluate", "--train", train, "--test", test, "--preset", "pcam", "--seeds", 1, "--epochs", 1,
       "--json", J2)
    s2 = json.loads(J2.read_text())
    assert s2["image_size"] == 32 and s2["view"] == CROP.to_dict() and s2["n_train"] == 24
    # a test set in another view is refused with one line
    small = PatchSet.load(S)
    small.meta.pop("view")
    small.kind = "real"
    small.save(tmp_path / "viewless")
    r = runner.invoke(app, ["evaluate", "--train", str(S), "--test", str(tmp_path / "viewless"), "--seeds", "1",
                            "--epochs", "1"])
    assert r.exit_code != 0 and isinstance(r.exception, InputError) and "raw 96-px" in str(r.exception)


def test_help_texts_explain_the_preset():
    for cmd in ("distill", "coreset", "evaluate"):
        text = " ".join(ok(cmd, "--help").split())
        assert "--preset" in text and "pcam" in text and "centre" in text and "override" in text, cmd
    text = " ".join(ok("export", "--help").split())
    assert "view" in text and "--preset" in text


def test_distill_takes_a_patch_set_imported_from_a_folder(tmp_path, data):
    # DIR may be a PatchSet: the natural one is `tile --patches FOLDER` (no slides, so no slide splits);
    # distill used to select the empty 'train' split of it and stop with "no patches to distil"
    store, S = tmp_path / "store", tmp_path / "S"
    ok("-q", "tile", "--patches", data / "train", "--out", store)
    assert PatchSet.load(store).meta["slide_splits"] == {}
    ok("-q", "distill", "--patches", store, "--preset", "pcam", "--ipc", 2, "--outer-steps", 1,
       "--init", "noise", "--candidates", 1, "--out", S)
    syn = PatchSet.load(S)
    assert syn.class_counts() == {"normal": 2, "tumour": 2} and recorded_view(syn) == CROP


def test_a_preset_files_per_ipc_recipe_reaches_every_caller_of_from_yaml():
    """The federation builds its sets with ``DistillConfig.from_yaml(preset file)``: the preset's ``distill_by_ipc``
    entry applies there as in ``centre-node distill --preset`` (a hospital source's ipc-50 set is the preset's
    ipc-50 recipe, not its ipc-10 one); other ipcs are untouched, explicit overrides win."""
    from histodd_fed.distill.config import DistillConfig
    from histodd_fed.federation.distil_cache import _distill_config_path
    from histodd_fed.federation.presets import get_preset
    from histodd_fed.preset import load_preset

    pcam = load_preset("pcam")
    path = _distill_config_path(get_preset("pcam-c17-hospitals-fixed"))
    assert pcam.distill_by_ipc[50]    # the shipped preset changes its recipe at ipc 50
    for ipc in (10, 20, 50):
        a = DistillConfig.from_yaml(path, ipc=ipc)
        assert a.to_dict() == pcam.distill_config(ipc=ipc).to_dict(), ipc
    fifty = DistillConfig.from_yaml(path, ipc=50)
    for key, value in pcam.distill_by_ipc[50].items():
        assert getattr(fifty, key) == value
    ten = DistillConfig.from_yaml(path, ipc=10)
    assert ten.to_dict() == DistillConfig.from_dict(pcam.distill, ipc=10).to_dict()
    assert DistillConfig.from_yaml(path, ipc=50, candidates=3).candidates == 3
