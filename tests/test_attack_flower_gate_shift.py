"""Attack: on the Flower path a centre's real patches are kept only in the model's view (the central crop), so
the export gate searched shifts only inside that crop. A set holding a real patch's window cut 10 px off-centre
inside the raw patch - outside the crop, inside the patch - passed `gate_report` while `centre-node export
--patches RAW` blocks it. The fix: `prepare` keeps the raw train patches and the Flower gate (and the
gate-aware candidate choice) audit against them, so both paths search the same windows."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from histodd_fed.federation.centre_config import CentreConfig
from histodd_fed.federation.centre_data import prepare
from histodd_fed.federation.presets import get_preset
from histodd_fed.federation.privacy_reports import gate_report
from histodd_fed.patchset import PatchSet
from histodd_fed.preprocess import ViewSpec, apply_view


def _textured(n: int, size: int, seed: int) -> np.ndarray:
    """Blocky random texture: not bland, and no window of one patch explains another."""
    rng = np.random.default_rng(seed)
    base = rng.random((n, size // 2, size // 2, 3))
    img = np.kron(base, np.ones((1, 2, 2, 1)))
    img = 0.5 * img + 0.5 * np.roll(img, 2, axis=1)
    return (40 + 180 * img).clip(0, 255).astype(np.uint8)


def test_attack_off_centre_window_passes_the_flower_gate_no_more(tmp_path):
    raw = PatchSet(images=_textured(24, 48, 0), labels=np.arange(24) % 2, class_names=["normal", "tumour"])
    test = PatchSet(images=_textured(8, 48, 1), labels=np.arange(8) % 2, class_names=["normal", "tumour"])
    raw.save(tmp_path / "data" / "train")
    test.save(tmp_path / "data" / "test")
    preset = replace(get_preset("tiny"), name="tiny-crop", crop_center=16, image_size=16)
    cfg = CentreConfig(centre_id="C1", data=tmp_path / "data", key_dir=tmp_path / "keys", work_dir=tmp_path / "work")
    prepared = prepare(cfg, preset)
    assert prepared.train.image_size == 16 and prepared.gate_reference().image_size == 48

    view = ViewSpec.centre_crop(48, 16)
    # the attacker's set: 4 windows of real raw patches, each 10 px right/down of the centre crop (rows 26:42),
    # recorded in the centre's view like every set distilled on this node
    win = np.stack([raw.images[i, 26:42, 26:42] for i in range(4)])
    fakes = apply_view(PatchSet(images=_textured(4, 48, 7), labels=np.arange(4) % 2,
                                class_names=["normal", "tumour"]), view)
    fakes.images = win
    fakes.kind, fakes.meta = "synthetic", {**fakes.meta, "method": "dm"}

    # before the fix the gate saw only the crops: no window was found (the attack relied on that; any block
    # came from a chance match of the small-sample rules, which names no source)
    _, before, _ = gate_report(fakes, replace(prepared, raw_train_dir=None))
    assert before["copies"]["flagged"] == [], before["copies"]
    # now the raw patches are the reference, as for `centre-node export --patches RAW`: each window is flagged
    # on its own and named with its true source and offset
    blocked, report, message = gate_report(fakes, prepared)
    assert blocked, message
    flagged = {f["synthetic"]: f for f in report["copies"]["flagged_images"]}
    assert sorted(flagged) == [0, 1, 2, 3], report["copies"]
    for i, f in flagged.items():
        assert f["sources"] == [i] and "(+10, +10)" in f["transform"] and f["r2"] > 0.99
