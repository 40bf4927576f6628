"""How a target uses received data: stain normalisation to its own colour space, the union protocol."""

from __future__ import annotations

import numpy as np
import pytest

from histodd_fed.errors import ConfigError
from histodd_fed.federation.fine_tuning import mixed_training_set
from histodd_fed.federation.stain_mapping import set_stains, stain_normalise_to
from histodd_fed.federation.presets import get_preset
from histodd_fed.patchset import PatchSet
from histodd_fed.stain import macenko

C1_STAINS = np.array([[0.62, 0.36], [0.73, 0.90], [0.29, 0.22]])
C2_STAINS = np.array([[0.47, 0.34], [0.76, 0.85], [0.45, 0.40]])


def _stained(n: int, matrix: np.ndarray, h_max: float, e_max: float, seed: int, size: int = 16) -> np.ndarray:
    """Tissue-like uint8 patches: random H (blobs) and E (background) concentrations under ``matrix``."""
    rng = np.random.default_rng(seed)
    m = matrix / np.linalg.norm(matrix, axis=0, keepdims=True)
    h = rng.uniform(0, h_max, (n, size, size, 1)) * (rng.random((n, size, size, 1)) < 0.3)
    e = rng.uniform(0.3 * e_max, e_max, (n, size, size, 1))
    od = np.concatenate([h, e], -1) @ m.T
    return np.round(macenko.od_to_rgb(od)).astype(np.uint8)


def _ps(images: np.ndarray, labels) -> PatchSet:
    return PatchSet(images=images, labels=np.asarray(labels, dtype=np.int64), class_names=["normal", "tumour"])


def test_stain_normalisation_moves_received_into_the_targets_colour_space():
    own = _ps(_stained(40, C2_STAINS, 2.0, 0.6, seed=1), [0, 1] * 20)
    received = _ps(_stained(10, C1_STAINS, 1.5, 0.9, seed=2), [0, 1] * 5)
    white = np.full((2, 16, 16, 3), 250, dtype=np.uint8)  # background: no Macenko estimate
    received = _ps(np.concatenate([received.images, white]), [0, 1] * 6)
    out, info = stain_normalise_to(received, own)
    assert info["received_stain"] == "macenko->target"
    assert info["stain_normalised_images"] == 10 and info["stain_unchanged_images"] == 2
    np.testing.assert_array_equal(out.images[10:], white)           # background left as it was
    assert out.images.dtype == np.uint8 and out.labels.tolist() == received.labels.tolist()
    tm, _, _, _ = set_stains(own.images)
    before, _, _, _ = set_stains(received.images[:10])
    after, _, _, _ = set_stains(out.images[:10])
    # the received set's estimated stain vectors move to the target's
    assert np.abs(after - tm).max() < 0.5 * np.abs(before - tm).max()
    own_mean = own.images.reshape(-1, 3).mean(0)
    assert np.abs(out.images[:10].reshape(-1, 3).mean(0) - own_mean).sum() < \
        np.abs(received.images[:10].reshape(-1, 3).mean(0) - own_mean).sum()


def test_union_set_is_class_balanced_and_gives_received_its_share():
    own = _ps(np.zeros((30, 4, 4, 3), np.uint8), [0] * 27 + [1] * 3)   # imbalanced own data
    received = _ps(np.full((4, 4, 4, 3), 7, np.uint8), [0, 1, 0, 1])
    only_own = mixed_training_set(own, None, share=0.5, seed=0)
    assert np.bincount(only_own.labels).tolist() == [27, 27]
    assert (only_own.images == 0).all()
    for share in (0.25, 0.5):
        mixed = mixed_training_set(own, received, share=share, seed=0)
        is_rec = mixed.images.reshape(len(mixed), -1)[:, 0] == 7
        assert abs(is_rec.mean() - share) < 0.03
        assert np.bincount(mixed.labels[is_rec]).tolist()[0] == np.bincount(mixed.labels[is_rec]).tolist()[1]
        assert np.bincount(mixed.labels[~is_rec]).tolist() == [27, 27]


def test_receive_protocol_settings_are_validated_and_do_not_touch_preparation():
    p = get_preset("tiny")
    assert p.fine_tune_protocol == "union" and not p.stain_normalise_received  # off: validation said so
    assert get_preset("tiny", received_share=0.25).prepare_dict() == p.prepare_dict()
    with pytest.raises(ConfigError):
        get_preset("tiny", received_share=1.0)
    with pytest.raises(ConfigError):
        get_preset("tiny", fine_tune_protocol="mine")
