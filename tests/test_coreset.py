"""Coreset baselines: exact per-class counts, herding order, forgetting event counting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histodd_fed.coreset import (CoresetConfig, build_coreset, count_forgetting_events, forgetting_scores,
                                 forgetting_select, herding_order, herding_select, random_select)
from histodd_fed.errors import InputError
from histodd_fed.patchset import PatchSet
from histodd_fed.studies.toy_data import make_toy_patchset

torch.set_num_threads(1)


def test_forgetting_events_on_crafted_sequence():
    # rows = presentations, columns = samples
    correct = np.array([
        [1, 0, 1, 0, 1],
        [0, 0, 1, 1, 1],
        [1, 0, 0, 0, 1],
        [0, 0, 1, 1, 1],
    ], dtype=bool)
    events, learnt = count_forgetting_events(correct)
    assert events.tolist() == [2, 0, 1, 1, 0]
    assert learnt.tolist() == [True, False, True, True, True]
    scores = forgetting_scores(events, learnt)
    assert np.isinf(scores[1]) and scores[0] == 2
    labels = np.zeros(5, dtype=np.int64)
    # never learnt first, then most forgotten
    assert forgetting_select(scores, labels, 2, 1, seed=0).tolist() == [1, 0]
    # ties (samples 2 and 3 with 1 event) broken by the seed, reproducibly
    picks = {tuple(forgetting_select(scores, labels, 3, 1, seed=s).tolist()) for s in range(20)}
    assert picks == {(1, 0, 2), (1, 0, 3)}


def test_herding_first_pick_is_closest_to_mean_and_greedy():
    f = np.array([[0.0, 0.0], [10.0, 0.0], [-10.0, 0.0], [1.0, 1.0], [4.0, 0.0]])
    # mean = (1, 0.2): closest is (1,1)
    order = herding_order(f, 3)
    assert order[0] == 3
    # second pick makes the mean of the two closest to (1, 0.2): (1,1)+(0,0) -> (0.5,0.5) d=.58;
    # (1,1)+(4,0) -> (2.5,.5) d=1.53; so index 0
    assert order[1] == 0
    assert len(set(order.tolist())) == 3
    labels = np.array([0, 0, 0, 1, 1])
    sel = herding_select(f, labels, 1, 2)
    assert labels[sel].tolist() == [0, 1]


def test_random_select_counts_and_error():
    labels = np.array([0] * 5 + [1] * 3)
    idx = random_select(labels, 3, 2, seed=1)
    assert np.bincount(labels[idx]).tolist() == [3, 3] and len(set(idx.tolist())) == 6
    assert np.array_equal(idx, random_select(labels, 3, 2, seed=1))
    with pytest.raises(InputError, match="only 3"):
        random_select(labels, 4, 2, seed=0)


@pytest.mark.parametrize("method", ["random", "herding", "forgetting"])
def test_build_coreset_exact_ipc_real_samples(method, tmp_path):
    real = make_toy_patchset(10, 16, seed=3)
    cfg = CoresetConfig(method=method, ipc=3, seed=0, feature_epochs=1, forgetting_epochs=2, batch_size=8)
    cs = build_coreset(real, cfg, progress=False)
    assert cs.kind == "coreset" and len(cs) == 6
    assert cs.class_counts() == {"class0": 3, "class1": 3}
    idx = np.asarray(cs.meta["source_indices"])
    assert np.array_equal(cs.images, real.images[idx]) and np.array_equal(cs.labels, real.labels[idx])
    assert cs.meta["method"] == method and cs.meta["ipc"] == 3 and cs.meta["seed"] == 0
    cs.save(tmp_path / "cs")
    again = PatchSet.load(tmp_path / "cs")
    assert again.kind == "coreset" and again.meta["method"] == method


def test_build_coreset_rejects_too_large_ipc():
    with pytest.raises(InputError, match="fewer than ipc"):
        build_coreset(make_toy_patchset(2, 16), CoresetConfig(ipc=5), progress=False)
