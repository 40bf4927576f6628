"""Training, evaluation, metrics and checkpoints (real torch training on tiny generated patches)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from histodd_fed.errors import InputError
from histodd_fed.models import create_model
from histodd_fed.studies.toy_data import make_toy_patchset
from histodd_fed.training import (binary_auc, compute_metrics, evaluate_classifier, evaluate_sets, fine_tune,
                                  load_model, roc_auc, save_model, train_classifier)

torch.set_num_threads(1)


def test_auc_known_cases():
    assert binary_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert binary_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert binary_auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    # 3 positives x 2 negatives = 6 pairs, counted by hand:
    scores = [0.1, 0.35, 0.4, 0.35, 0.8]
    labels = [0, 0, 1, 1, 1]
    # pairs (pos, neg): (0.4>0.1)1 (0.4>0.35)1 (0.35>0.1)1 (0.35=0.35)0.5 (0.8>0.1)1 (0.8>0.35)1 -> 5.5/6
    assert binary_auc(scores, labels) == pytest.approx(5.5 / 6)
    assert math.isnan(binary_auc([0.1, 0.2], [1, 1]))
    # multi-class: macro one-vs-rest, perfect ranking gives 1
    probs = np.eye(3)[[0, 1, 2, 0]] * 0.9 + 0.05
    assert roc_auc(probs, np.array([0, 1, 2, 0])) == 1.0


def test_metrics_confusion_and_balanced_accuracy():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]])
    m = compute_metrics(probs, np.array([0, 0, 0, 1]))
    assert m.confusion == [[3, 0], [0, 1]]
    assert m.accuracy == 1.0 and m.balanced_accuracy == 1.0
    m = compute_metrics(probs, np.array([0, 1, 1, 1]))  # predicts 0,0,0,1
    assert m.confusion == [[1, 0], [2, 1]]
    assert m.accuracy == 0.5
    assert m.balanced_accuracy == pytest.approx((1.0 + 1 / 3) / 2)


def test_train_separable_toy_reaches_full_accuracy(tmp_path):
    train = make_toy_patchset(16, 16, seed=0)
    test = make_toy_patchset(16, 16, seed=1)
    model = create_model("resnet18", num_classes=2, image_size=16)
    res = train_classifier(model, train, epochs=4, lr=0.01, batch_size=16, seed=0, progress=False, val=test)
    assert len(res.epoch_seconds) == 4 and len(res.losses) == 4
    assert res.val_metrics.accuracy >= 0.95 and res.val_metrics.auc >= 0.99
    # save / load round trip gives identical predictions
    save_model(res.model, tmp_path / "ck", arch="resnet18", num_classes=2, image_size=16, class_names=train.class_names)
    again = load_model(tmp_path / "ck")
    x = torch.rand(3, 3, 16, 16)
    assert torch.allclose(res.model.cpu().eval()(x), again(x), atol=1e-5)
    # fine-tuning with a frozen backbone leaves the backbone untouched
    before = [p.clone() for p in again.backbone.parameters()]
    fine_tune(again, train, epochs=1, seed=1, progress=False, freeze_backbone=True)
    assert all(torch.equal(a, b) for a, b in zip(before, again.backbone.parameters()))


def test_weights_path_mismatch_is_a_clear_error(tmp_path):
    m = create_model("resnet18", num_classes=2, image_size=16)
    torch.save(m.state_dict(), tmp_path / "r18.pt")
    m2 = create_model("resnet18", num_classes=2, image_size=16, weights_path=tmp_path / "r18.pt")
    assert torch.equal(m2.head.weight, m.head.weight)
    with pytest.raises(InputError, match="r18.pt.*shape"):
        create_model("resnet18", num_classes=3, image_size=16, weights_path=tmp_path / "r18.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="junk.pt"):
        create_model("resnet18", num_classes=2, image_size=16, weights_path=tmp_path / "junk.pt")


def test_small_models_features():
    x = torch.rand(2, 3, 16, 16)
    for name, kw in [("densenet121", dict(growth_rate=8, block_config=(1, 1, 1, 1), num_init_features=16)),
                     ("vit", dict(variant="tiny", num_layers=1))]:
        m = create_model(name, num_classes=2, image_size=16, **kw)
        assert m(x).shape == (2, 2)
        assert m.features(x).shape == (2, m.feature_dim)


def test_evaluate_sets_mean_std_and_shape_check():
    train = make_toy_patchset(8, 16, seed=0)
    test = make_toy_patchset(8, 16, seed=1)
    res = evaluate_sets({"a": train}, test, "resnet18", seeds=2, epochs=2, batch_size=16, progress=False)
    s = res["a"].summary()
    assert s["n_train"] == 16 and len(s["accuracy_per_seed"]) == 2
    assert s["accuracy_mean"] == pytest.approx(np.mean(s["accuracy_per_seed"]))
    assert s["accuracy_std"] == pytest.approx(np.std(s["accuracy_per_seed"]))
    with pytest.raises(InputError, match="patch shape"):
        evaluate_sets({"b": make_toy_patchset(4, 32)}, test, "resnet18", seeds=1, epochs=1, progress=False)


def test_evaluate_classifier_rejects_empty():
    m = create_model("resnet18", num_classes=2, image_size=16)
    with pytest.raises(InputError):
        evaluate_classifier(m, make_toy_patchset(1, 16).subset([]))


def test_center_crop_keeps_the_central_region(tmp_path):
    from histodd_fed.patchset import PatchSet
    from histodd_fed.preprocess import recorded_view
    from histodd_fed.training.data import load_patches

    imgs = np.zeros((2, 96, 96, 3), np.uint8)
    imgs[:, 32:64, 32:64] = 200  # PCam: the label is defined by the central 32 x 32 px
    ps = PatchSet(images=imgs, labels=np.array([0, 1]), class_names=["a", "b"])
    ps.save(tmp_path / "ps")
    out = load_patches(tmp_path / "ps", crop_center=32)
    assert out.images.shape == (2, 32, 32, 3) and (out.images == 200).all()
    assert recorded_view(out).describe() == "96 px -> centre crop 32"
    with pytest.raises(InputError, match="centre crop"):
        load_patches(tmp_path / "ps", crop_center=128)


def test_stain_augmentation_normalises_train_and_test_alike_with_the_datas_template(tmp_path):
    """The evaluation trainer's `stain` op: the training data's template (not the reference H&E) and the
    same normalisation when the model predicts (issue 12: it trained on normalised, tested on raw)."""
    from histodd_fed.stain.normalize import ImageStains, StainContext, normalize_stain
    from histodd_fed.training import load_model, predict_probs, save_model, train_classifier
    from histodd_fed.training.trainer import INPUT_TRANSFORM_ATTR

    train = make_toy_patchset(8, 16, seed=0)
    model = create_model("convnet", num_classes=2, image_size=16, width=8, depth=2)
    res = train_classifier(model, train, epochs=1, augmentation="flip_stain", seed=0, device="cpu", progress=False)
    tf = getattr(res.model, INPUT_TRANSFORM_ATTR)
    data_ctx = StainContext.from_images(train.images)
    assert torch.allclose(tf.stain.template_matrix, data_ctx.template_matrix)
    assert not torch.allclose(tf.stain.template_matrix, StainContext.reference().template_matrix)
    x = torch.from_numpy(train.images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        want = torch.softmax(res.model(normalize_stain(x, ImageStains.from_tensor(x), data_ctx)), 1).numpy()
        raw = torch.softmax(res.model(x), 1).numpy()
    got = predict_probs(res.model, train.images, device="cpu")
    assert np.allclose(got, want, atol=1e-5) and not np.allclose(got, raw, atol=1e-5)
    save_model(res.model, tmp_path / "m", arch="convnet", num_classes=2, image_size=16,
               arch_kwargs={"width": 8, "depth": 2})
    assert np.allclose(predict_probs(load_model(tmp_path / "m"), train.images, device="cpu"), got, atol=1e-5)
    # without a stain op: neither side is normalised
    res2 = train_classifier(res.model, train, epochs=1, augmentation="flip", seed=0, device="cpu", progress=False)
    assert getattr(res2.model, INPUT_TRANSFORM_ATTR) is None
