"""The slide stage's encoder (preset ``slide_encoder``): frozen pre-trained classifier or the row's
fine-tuned one. Real tiny training on real PCam patches given a slide table (no fakes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from histodd_fed.errors import ConfigError
from histodd_fed.federation.presets import get_preset
from tests.test_federation_study import with_slides

PCAM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pcam-ai4all"


def test_bad_slide_encoder_is_a_config_error():
    with pytest.raises(ConfigError, match=r"slide_encoder must be one of \('frozen', 'fine_tuned'\), got 'finetuned'"):
        get_preset("tiny", slide_encoder="finetuned")
    tiny, ft = get_preset("tiny"), get_preset("tiny", slide_encoder="fine_tuned")
    assert "slide_encoder" not in tiny.receive_protocol()           # default: cache keys as before
    assert ft.receive_protocol()["slide_encoder"] == "fine_tuned"   # part of every fine-tuning cache key
    assert ft.prepare_dict() == tiny.prepare_dict()                 # preparation (pre-trained CLAM) is shared
    from histodd_fed.federation.fine_tuning import _own_key

    assert _own_key(ft) != _own_key(tiny)                           # "no transfer" is cached per encoder


def _centre(tmp_path: Path):
    """A tiny centre on real PCam patches with 8 slides (5 train, 3 test), prepared with the tiny preset."""
    if not PCAM.exists():
        pytest.skip(f"real PCam patches not found at {PCAM}")
    from histodd_fed.federation import centre_data
    from histodd_fed.federation.centre import CentreConfig
    from histodd_fed.patchset import load_image_folder

    with_slides(load_image_folder(PCAM / "valid", limit_per_class=24, seed=2), first_test=5).save(tmp_path / "data")
    cfg = CentreConfig("C2", tmp_path / "data", tmp_path / "keys", tmp_path / "work", preset="tiny", seed=3)
    preset = get_preset("tiny", fine_tune_protocol="sequential", slide_encoder="fine_tuned")
    return cfg, preset, centre_data.prepare(cfg, preset)


def test_fine_tuned_slide_encoder_reencodes_every_bag_with_the_row_classifier(tmp_path):
    from dataclasses import replace

    import torch

    from histodd_fed.federation import fine_tuning, slide_level
    from histodd_fed.mil.bags import bags_from_patchset, load_bags
    from histodd_fed.training import load_model

    cfg, preset, prepared = _centre(tmp_path)
    assert prepared.has_mil
    received = prepared.train  # a received slide set: real patches with a slide table
    row_model, _ = fine_tuning._fine_tune_classifier(prepared, preset, received, epochs=1, seed=3)

    # the premise: the row's fine-tuned classifier encodes the test slides differently from the frozen one
    saved = load_bags(prepared.root / slide_level.TEST_BAGS_DIR)
    frozen = bags_from_patchset(prepared.test, slide_level.encoder_for(load_model(prepared.classifier_dir), preset),
                                progress=False)
    tuned = bags_from_patchset(prepared.test, slide_level.encoder_for(row_model, preset), progress=False)
    to_t = torch.as_tensor
    assert all(torch.allclose(to_t(a.features), to_t(b.features)) for a, b in zip(saved, frozen))
    assert not all(torch.allclose(to_t(a.features), to_t(b.features), atol=1e-4) for a, b in zip(saved, tuned))

    # fine_tuned with the PRE-TRAINED classifier as the row's model re-encodes every bag (test included)
    # and reproduces the frozen path exactly: the test bags are re-encoded with the model given
    as_frozen = fine_tuning.slide_fine_tune(prepared, replace(preset, slide_encoder="frozen"), received,
                                            row_model=None, epochs=1, seed=3)
    again = fine_tuning.slide_fine_tune(prepared, preset, received, row_model=load_model(prepared.classifier_dir),
                                        epochs=1, seed=3)
    keys = ("slide_auc", "slide_accuracy", "slide_threshold", "slide_bags", "slide_own_bags")
    assert [as_frozen[k] for k in keys] == [again[k] for k in keys]
    assert (as_frozen["slide_encoder"], again["slide_encoder"]) == ("frozen", "fine_tuned")

    # end to end: the row's fine-tuned classifier as the slide encoder
    res = fine_tuning.slide_fine_tune(prepared, preset, received, row_model=row_model, epochs=1, seed=3)
    assert res["slide_encoder"] == "fine_tuned" and 0.0 <= res["slide_auc"] <= 1.0
    assert res["slide_bags"] == len(set(received.slide_index.tolist())) and res["slide_own_bags"] > 0

    # "no transfer": its own fine-tuned classifier encodes its bags
    none = fine_tuning.own_only_fine_tune(prepared, replace(preset, fine_tune_protocol="union"), epochs=1, seed=3)
    assert none["slide_encoder"] == "fine_tuned" and none["slide_bags"] == 0 and none["own_data_only"]
