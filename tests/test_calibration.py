"""Two-class threshold calibration (histodd_fed.training.calibration) and its use for slide metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histodd_fed.training.calibration import fit_threshold, metrics_at_threshold


def test_shifted_scores_get_a_threshold_between_the_classes():
    # every score below 0.5: argmax calls all negative; the ranking is perfect
    scores = np.array([0.05, 0.10, 0.12, 0.30, 0.35, 0.40])
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert metrics_at_threshold(scores, labels, 0.5).balanced_accuracy == 0.5
    t = fit_threshold(scores, labels)
    assert 0.12 < t < 0.30
    m = metrics_at_threshold(scores, labels, t)
    assert m.accuracy == 1.0 and m.balanced_accuracy == 1.0 and m.n == 6


def test_already_separated_keeps_half_and_one_class_returns_half():
    assert fit_threshold(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 0.5
    assert fit_threshold(np.array([0.1, 0.7]), np.array([1, 1])) == 0.5
    assert fit_threshold(np.array([]), np.array([])) == 0.5


def test_imperfect_ranking_maximises_balanced_accuracy():
    scores = np.array([0.1, 0.2, 0.3, 0.25, 0.6, 0.7])
    labels = np.array([0, 0, 0, 1, 1, 1])
    t = fit_threshold(scores, labels)
    best = max(metrics_at_threshold(scores, labels, c).balanced_accuracy for c in np.linspace(0, 1, 1001))
    assert metrics_at_threshold(scores, labels, t).balanced_accuracy == pytest.approx(best)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="two classes"):
        fit_threshold(np.array([0.1, 0.2]), np.array([0, 2]))
    with pytest.raises(ValueError, match="shape"):
        fit_threshold(np.array([0.1, 0.2]), np.array([0]))
    with pytest.raises(ValueError, match="finite"):
        metrics_at_threshold(np.array([np.nan]), np.array([1]), 0.5)


def test_slide_metrics_calibrates_on_own_bags_only():
    from histodd_fed.federation.slide_level import slide_metrics
    from histodd_fed.mil.bags import Bag

    class BiasedHead(torch.nn.Module):
        """Tumour logit = mean feature - 3: ranks bags right but calls everything normal at 0.5."""

        def forward(self, x):
            z = x.mean() - 3.0
            return {"logits": torch.stack([torch.zeros(()), z])[None]}

    def bag(i, label, level):
        return Bag(slide_id=f"s{i}", label=label, features=torch.full((4, 8), float(level)), n_patches=4)

    test = [bag(0, 0, 0.5), bag(1, 0, 1.0), bag(2, 1, 2.0), bag(3, 1, 2.5)]
    own = [bag(4, 0, 0.8), bag(5, 1, 2.2)]
    out = slide_metrics(BiasedHead(), test, own)
    assert out["slide_auc"] == 1.0
    assert out["slide_accuracy_argmax"] == 0.5          # all called normal
    assert out["slide_accuracy"] == 1.0 and out["slide_calibration_bags"] == 2
    assert out["slide_threshold"] < 0.5
    nocal = slide_metrics(BiasedHead(), test, [])
    assert nocal["slide_threshold"] == 0.5 and nocal["slide_accuracy"] == 0.5
