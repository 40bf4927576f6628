"""Membership inference: the ROC written from its definition, and the attack on real trained models."""

import numpy as np
import pytest
import torch

from histodd_fed.patchset import PatchSet
from histodd_fed.privacy.classifier import fit_classifier
from histodd_fed.privacy.membership import attack_model, auc_from_roc, roc_curve, tpr_at_fpr
from histodd_fed.training.metrics import binary_auc


def tinted_patches(n: int, seed: int, size: int = 16) -> PatchSet:
    """Two classes (reddish / bluish) of noisy images: learnable, yet individually random."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    img = rng.random((n, size, size, 3)) * 0.8
    img[labels == 0, :, :, 0] += 0.2
    img[labels == 1, :, :, 2] += 0.2
    return PatchSet(images=(img.clip(0, 1) * 255).astype(np.uint8), labels=labels, class_names=["r", "b"])


def tiny_model(seed: int, size: int = 16):
    from histodd_fed.models import create_model

    torch.manual_seed(seed)
    return create_model("convnet", num_classes=2, image_size=size, width=8, depth=2)


def test_roc_curve_and_auc_from_definition():
    y = np.array([1, 1, 0, 0], bool)
    fpr, tpr, _ = roc_curve(np.array([0.9, 0.8, 0.3, 0.1]), y)
    assert auc_from_roc(fpr, tpr) == 1.0 and tpr_at_fpr(fpr, tpr, 0.0) == 1.0
    fpr, tpr, _ = roc_curve(np.array([0.1, 0.2, 0.3, 0.4]), y)
    assert auc_from_roc(fpr, tpr) == 0.0 and tpr_at_fpr(fpr, tpr, 0.49) == 0.0
    fpr, tpr, _ = roc_curve(np.array([0.5, 0.5, 0.5, 0.5]), y)  # all tied: chance
    assert auc_from_roc(fpr, tpr) == 0.5 and fpr.tolist() == [0, 1] and tpr.tolist() == [0, 1]
    rng = np.random.default_rng(0)
    s, lab = rng.normal(size=300).round(1), rng.random(300) < 0.4
    fpr, tpr, _ = roc_curve(s + lab, lab)
    assert auc_from_roc(fpr, tpr) == pytest.approx(binary_auc(s + lab, lab), abs=1e-12)  # ties count one half
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    with pytest.raises(ValueError):
        roc_curve(np.ones(3), np.ones(3, bool))


def test_attack_scores_near_chance_when_the_model_saw_neither_side():
    train, members, nonmembers = tinted_patches(64, 1), tinted_patches(300, 2), tinted_patches(300, 3)
    model = fit_classifier(tiny_model(0), train, epochs=15, lr=0.05, batch_size=32, seed=0)
    res = attack_model(model, members, nonmembers)
    assert res.member_accuracy > 0.8  # the model learnt the task...
    for name, a in res.attacks.items():  # ...but members and non-members are exchangeable
        assert abs(a.auc - 0.5) < 0.08, (name, a.auc)


def test_attack_detects_memorised_members():
    members, nonmembers = tinted_patches(48, 4, size=8), tinted_patches(48, 5, size=8)
    rng = np.random.default_rng(6)
    members.labels = rng.integers(0, 2, len(members))  # random labels: only memorising fits them
    model = fit_classifier(tiny_model(1, size=8), members, epochs=150, lr=0.05, batch_size=48, seed=1, augment=False,
                           weight_decay=0.0)
    res = attack_model(model, members, nonmembers)
    assert res.member_accuracy > 0.95
    assert res.attacks["loss"].auc > 0.8 and res.max_auc > 0.8
    assert res.attacks["loss"].tpr_at_fpr["1%"] > 0.1
    s = res.summary()
    assert s["n_members"] == 48 and s["loss"]["auc"] == res.attacks["loss"].auc
