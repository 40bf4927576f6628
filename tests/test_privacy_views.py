"""The gate audits what was distilled: a set made from centre crops of 96-px patches is still
blocked when exported with --patches pointing at the raw 96-px patches (issue 12, section 1)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from centre_node.cli import app
from histodd_fed.errors import InputError
from histodd_fed.patchset import PatchSet, load_image_folder
from histodd_fed.preprocess import ViewSpec, apply_view, crop_images, recorded_view
from histodd_fed.privacy.audit import AuditConfig, audit_inputs, run_audit
from histodd_fed.privacy.gate import PrivacyRiskError, check_export

runner = CliRunner()
CROP = ViewSpec.centre_crop(96, 32)


def tissue96(n: int, seed: int) -> PatchSet:
    """Generated 96-px 'H&E' patches: pink background, purple nuclei (denser in class 1), noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    yy, xx = np.mgrid[0:96, 0:96]
    out = []
    for i in range(n):
        img = np.ones((96, 96, 3)) * np.array([0.92, 0.78, 0.88])
        k = 60 + 40 * int(labels[i])
        for y, x, r in zip(rng.uniform(0, 96, k), rng.uniform(0, 96, k), rng.uniform(1.5, 3.5, k)):
            img[(yy - y) ** 2 + (xx - x) ** 2 < r ** 2] = np.array([0.35, 0.2, 0.55]) * rng.uniform(0.7, 1.1)
        out.append(np.clip(img + 0.04 * rng.standard_normal(img.shape), 0, 1))
    return PatchSet(images=(np.stack(out) * 255).round().astype(np.uint8), labels=labels,
                    class_names=["normal", "tumour"])


def near_copies_of_centre_crops(real: PatchSet, idx: list[int], view: ViewSpec | None = CROP) -> PatchSet:
    """A 'synthetic' set that is the centre 32 px of real patches plus a little noise."""
    rng = np.random.default_rng(1)
    c = crop_images(real.images[idx], 32).astype(float) + rng.normal(0, 4, (len(idx), 32, 32, 3))
    meta = {} if view is None else {"view": view.to_dict()}
    return PatchSet(images=np.clip(c, 0, 255).round().astype(np.uint8), labels=real.labels[idx],
                    class_names=real.class_names, kind="synthetic", meta=meta)


def save_folder(ps: PatchSet, root) -> None:
    for i, (im, y) in enumerate(zip(ps.images, ps.labels)):
        d = root / ps.class_names[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(d / f"p{i:03d}.png")


def fast_config() -> AuditConfig:
    return AuditConfig.from_dict({"memorisation": {"feature_metric": False}, "membership": {"enabled": False}})


@pytest.fixture(scope="module")
def real96() -> PatchSet:
    return tissue96(60, 0)


def test_the_hole_resize_only_view_passes_but_the_gate_blocks(real96):
    syn = near_copies_of_centre_crops(real96, [0, 1, 2, 3])
    # what the gate did before: real patches resized 96 -> 32 px; the near copies pass
    assert not run_audit(syn, apply_view(real96, ViewSpec.resize(96, 32)), None, fast_config()).flagged
    d = check_export(syn, real96, fast_config(), raise_on_block=False)
    assert d.blocked and "centre crop 32" in d.reasons[0] and "near copy" in d.reasons[0]
    views = {v["view_text"]: v for v in d.to_dict()["views"]}
    assert views["96 px -> centre crop 32"]["flagged"] and views["96 px -> centre crop 32"]["ssim"] > 0.95
    assert not views["96 px -> resize 32 (bilinear_aa)"]["flagged"]
    assert d.to_dict()["view"] == CROP.to_dict()   # the summary details the worst view


def test_legacy_set_without_a_view_is_audited_in_both_views(real96):
    legacy = near_copies_of_centre_crops(real96, [4, 5, 6, 7], view=None)
    assert recorded_view(legacy) is None
    assert [v.describe() for v, _, _ in audit_inputs(legacy, real96)] == ["96 px -> resize 32 (bilinear_aa)",
                                                                           "96 px -> centre crop 32"]
    with pytest.raises(PrivacyRiskError, match="centre crop 32"):
        check_export(legacy, real96, fast_config())


def test_real_patches_in_another_view_are_refused(real96):
    syn = near_copies_of_centre_crops(real96, [0, 1])
    resized = apply_view(real96, ViewSpec.resize(96, 32))
    with pytest.raises(InputError, match="give the raw 96-px patches") as err:
        check_export(syn, resized, fast_config())
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="patches are 48 px"):
        check_export(syn, PatchSet(images=np.zeros((4, 48, 48, 3), np.uint8), labels=np.array([0, 1, 0, 1]),
                                   class_names=["normal", "tumour"]), fast_config())
    # the same view, already applied: audited as is
    same = audit_inputs(syn, apply_view(real96, CROP))
    assert len(same) == 1 and same[0][0] == CROP


def test_cli_export_of_centre_crop_copies_with_raw_96px_patches_is_blocked(tmp_path, real96):
    save_folder(real96, tmp_path / "raw96")
    syn = near_copies_of_centre_crops(load_image_folder(tmp_path / "raw96"), [0, 1, 2, 3, 4, 5])
    r = export_as_c1(tmp_path, syn)
    assert r.exit_code != 0 and isinstance(r.exception, PrivacyRiskError), r.output
    assert "centre crop 32" in str(r.exception) and not (tmp_path / "B.hdb").exists()


def export_as_c1(tmp_path, syn: PatchSet):
    """``centre-node export`` of ``syn`` (saved to tmp_path/S) by a fresh centre C1 to C2, against the raw
    patches in tmp_path/raw96, as an attacker at C1 would run it; the CliRunner result (bundle: B.hdb)."""
    syn.save(tmp_path / "S")
    for c in ("C1", "C2"):
        r = runner.invoke(app, ["keygen", "--centre-id", c, "--out", str(tmp_path / f"keys-{c}"), "--no-passphrase"])
        assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["trust", "add", str(tmp_path / "keys-C2" / "identity.json"), "--keys",
                            str(tmp_path / "keys-C1")])
    assert r.exit_code == 0, r.output
    return runner.invoke(app, ["export", "--synthetic", str(tmp_path / "S"), "--patches", str(tmp_path / "raw96"),
                               "--to", "C2", "--keys", str(tmp_path / "keys-C1"), "--out", str(tmp_path / "B.hdb")])


def test_real_pcam_centre_crop_copies_are_blocked(shared_data):
    root = shared_data / "pcam-ai4all" / "train"
    if not root.is_dir():
        pytest.skip(f"real PCam patches not present at {root}")
    real = load_image_folder(root, limit_per_class=40, seed=0)
    assert real.image_size == 96
    syn = near_copies_of_centre_crops(real, [0, 1, 2, 40, 41, 42])
    assert not run_audit(syn, apply_view(real, ViewSpec.resize(96, 32)), None, fast_config()).flagged
    d = check_export(syn, real, fast_config(), raise_on_block=False)
    assert d.blocked and "centre crop 32" in d.reasons[0], d.reasons
