"""Slide-level models of a centre, through :mod:`histodd_fed.mil`.

A centre's slide encoder is one of its patch classifiers (``features()``), per the preset's
``slide_encoder``: ``frozen`` (default) - its own pre-trained classifier, so the real test bags are
encoded once at prepare time and saved, and a received set only needs its own patches encoded;
``fine_tuned`` - each row's own fine-tuned classifier, which re-encodes that row's own train bags,
received bags and test bags (nothing encoded with one row's classifier is reused in another row).

- :func:`pretrain`    CLAM on the centre's own real train bags; saves head + test bags
- :func:`fine_tune`   copy of the pre-trained head fine-tuned on bags of a RECEIVED patch set (plus own bags)
  (per-slide synthetic set, or the source's real train patches for "Full"); evaluated on the
  centre's real test bags
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from histodd_fed.federation.presets import CentrePreset
from histodd_fed.patchset import PatchSet

log = logging.getLogger(__name__)

MIL_DIR = "mil"
TEST_BAGS_DIR = "test_bags"


def has_slides(ps: PatchSet) -> bool:
    """True when ``ps`` has a slide table with labels (so MIL bags can be built)."""
    return bool(ps.slide_labels) and bool((ps.slide_index >= 0).any())


def encoder_for(model, preset: CentrePreset):
    """The centre's patch encoder: its classifier's ``features`` at the preset's input size."""
    from histodd_fed.mil.features import PatchEncoder

    return PatchEncoder(model, batch_size=256, device="cpu", input_size=preset.image_size)


def slide_metrics(head, test_bags: list, calibration_bags: list) -> dict[str, float]:
    """Slide AUC, and accuracy / balanced accuracy at a threshold calibrated on ``calibration_bags``.

    The calibration bags are the centre's own real train bags (never the received ones, never the
    test bags): :func:`histodd_fed.training.calibration.fit_threshold` re-chooses the tumour-score
    threshold on them, which undoes the logit shift tiny synthetic bags cause (AUC 1 but every
    slide called one class). ``*_argmax`` keep the uncalibrated (0.5) numbers. More than two
    classes: argmax only.
    """
    import numpy as np

    from histodd_fed.mil.train import predict_mil
    from histodd_fed.training.calibration import DEFAULT_THRESHOLD, fit_threshold, metrics_at_threshold
    from histodd_fed.training.metrics import compute_metrics

    if not test_bags:
        raise ValueError("slide_metrics: no test bags")
    probs = predict_mil(head, test_bags)
    labels = np.array([b.label for b in test_bags], dtype=np.int64)
    m = compute_metrics(probs, labels, num_classes=probs.shape[1])
    out = {"slide_auc": float(m.auc), "slide_accuracy_argmax": float(m.accuracy),
           "slide_balanced_accuracy_argmax": float(m.balanced_accuracy)}
    if probs.shape[1] != 2:
        out.update(slide_accuracy=float(m.accuracy), slide_balanced_accuracy=float(m.balanced_accuracy))
        return out
    threshold = DEFAULT_THRESHOLD
    if calibration_bags:
        cal = predict_mil(head, calibration_bags)[:, 1]
        threshold = fit_threshold(cal, np.array([b.label for b in calibration_bags]))
    tm = metrics_at_threshold(probs[:, 1], labels, threshold)
    out.update(slide_accuracy=tm.accuracy, slide_balanced_accuracy=tm.balanced_accuracy,
               slide_threshold=round(threshold, 6), slide_calibration_bags=len(calibration_bags))
    return out


def pretrain(model, train: PatchSet, test: PatchSet, preset: CentrePreset, seed: int, root: Path) -> dict[str, Any]:
    """Train CLAM on own train bags, save it and the encoded test bags under ``root``; test metrics."""
    from histodd_fed.mil.bags import bags_from_patchset, save_bags
    from histodd_fed.mil.train import save_mil, train_mil

    enc = encoder_for(model, preset)
    train_bags = bags_from_patchset(train, enc, progress=False)
    test_bags = bags_from_patchset(test, enc, progress=False)
    res = train_mil(train_bags, preset.mil_model, epochs=preset.mil_epochs, lr=preset.mil_lr, seed=seed,
                    progress=False, num_classes=max(2, train.num_classes))
    save_mil(res.model, root / MIL_DIR, extra={"epochs": preset.mil_epochs, "train_slides": len(train_bags)})
    save_bags(test_bags, root / TEST_BAGS_DIR)
    return slide_metrics(res.model, list(test_bags), list(train_bags))


def _oversample(bags: list, n: int) -> list:
    """``bags`` repeated (cyclically) to ``n`` entries (at least once each)."""
    if not bags:
        return []
    return [bags[i % len(bags)] for i in range(max(n, len(bags)))]


def fine_tune(encoder_model, received: PatchSet | None, own_train: PatchSet | None, root: Path,
              preset: CentrePreset, seed: int, *, epochs: int, test: PatchSet | None = None) -> dict[str, Any]:
    """Fine-tune the pre-trained CLAM; metrics on the real test bags (saved, or re-encoded: ``test``).

    Bags come from ``received`` (already stain-normalised by the caller) and, when ``own_train`` is
    given (the "union" protocol), also from the centre's own train slides. Own bags are repeated so
    received bags make up about ``preset.received_share`` of each epoch (never fewer than one pass
    over the own bags); with the "sequential" protocol the head is fine-tuned on the received bags
    alone first (``slide_received_train_seconds``), then on the own bags alone, ``epochs`` each.
    ``received=None`` fine-tunes on own bags only ("no transfer", the same for both protocols). Slide
    accuracy is taken at a threshold calibrated on the own bags (:func:`slide_metrics`).
    ``test=None``: the test bags saved at prepare time, so ``encoder_model`` must be the centre's frozen
    pre-trained classifier (their encoder). ``test`` given (the centre's real test split): its bags are
    encoded with ``encoder_model`` too - every bag of the row, test included, from one encoder (the
    ``fine_tuned`` slide encoder: the row's fine-tuned classifier). The CLAM head fine-tuned is the
    pre-trained one either way.
    """
    from histodd_fed.mil.bags import bags_from_patchset, load_bags
    from histodd_fed.mil.train import load_mil, train_mil

    if received is None and own_train is None:
        raise ValueError("fine_tune needs received and/or own bags")
    head, _ = load_mil(root / MIL_DIR)
    enc = encoder_for(encoder_model, preset)
    test_bags = load_bags(root / TEST_BAGS_DIR) if test is None else bags_from_patchset(test, enc, progress=False)
    rec_bags = list(bags_from_patchset(received, enc, progress=False)) if received is not None else []
    own_bags = list(bags_from_patchset(own_train, enc, progress=False)) if own_train is not None else []
    calibration = list(own_bags)
    timing: dict[str, float] = {}
    if preset.fine_tune_protocol == "sequential" or not own_bags:
        # received bags alone first (timed: the cost of the received data), then own bags alone
        if rec_bags:
            t0 = time.perf_counter()
            head = train_mil(rec_bags, preset.mil_model, epochs=epochs, lr=preset.mil_fine_tune_lr, seed=seed,
                             model=head, progress=False).model
            timing["slide_received_train_seconds"] = round(time.perf_counter() - t0, 2)
        if own_bags:
            head = train_mil(own_bags, preset.mil_model, epochs=epochs, lr=preset.mil_fine_tune_lr, seed=seed,
                             model=head, progress=False).model
    else:  # union: one fine-tune on own + received bags, received about received_share of each epoch
        if rec_bags:
            share = preset.received_share
            own_bags = _oversample(own_bags, int(round(len(rec_bags) * (1.0 - share) / share)))
        head = train_mil(own_bags + rec_bags, preset.mil_model, epochs=epochs, lr=preset.mil_fine_tune_lr,
                         seed=seed, model=head, progress=False).model
    out = slide_metrics(head, list(test_bags), calibration)
    out.update(slide_bags=len(rec_bags), slide_own_bags=len(own_bags),
               slide_images=len(received) if received is not None else 0, **timing)
    return out
