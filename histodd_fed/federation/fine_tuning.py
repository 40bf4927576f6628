"""A target centre's fine-tune and evaluation: copies of its pre-trained models fine-tuned on received
sets per the preset's protocol (``union`` / ``sequential`` / ``received``), scored on its test split;
the "no transfer" row on own data only.

Cached under the centre's work directory: ``received/<sha256>-....json`` holds the metrics of a row's
bundles already fine-tuned on (replays are answered from here: the bundle ledger would refuse to open
them twice), ``received/own-....json`` the "no transfer" row.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from typing import Any

import numpy as np

from histodd_fed.atomic import atomic_write_json
from histodd_fed.errors import ConfigError, InputError
from histodd_fed.federation.centre_bundles import open_received_bundle, provenance, recheck_senders
from histodd_fed.federation.centre_config import CentreConfig
from histodd_fed.federation.centre_data import Prepared, one_thread, patch_metrics
from histodd_fed.federation.presets import CentrePreset
from histodd_fed.federation.stain_mapping import normalise_to_reference, stain_normalise_to
from histodd_fed.formation import decode_set
from histodd_fed.patchset import PatchSet
from histodd_fed.preprocess import resize_to
from histodd_fed.runconfig import config_hash
from histodd_fed.training.trainer import steps_per_epoch  # the trainer's batching (received_phase_epochs)


def _balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` indices of every class present (without replacement when the class is big enough)."""
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        out.append(idx if per_class == len(idx) else rng.choice(idx, per_class, replace=per_class > len(idx)))
    return np.concatenate(out)


def mixed_training_set(own: PatchSet, received: PatchSet | None, *, share: float, seed: int) -> PatchSet:
    """The fine-tuning set of the "union" protocol (one fixed epoch; the trainer reshuffles it).

    Own part: every own class drawn to the size of the largest own class (minority oversampled, so
    all own patches appear). Received part (when given): class-balanced, oversampled to ``share`` of
    the epoch: ``n_recv = share / (1 - share) * n_own``. Images only (no slide tables).
    """
    rng = np.random.default_rng(seed)
    counts = np.bincount(own.labels, minlength=own.num_classes)
    own_idx = _balanced_indices(own.labels, int(counts.max()), rng)
    images, labels = [own.images[own_idx]], [own.labels[own_idx]]
    if received is not None and len(received):
        n_cls = len(np.unique(received.labels))
        n_recv = int(round(share / (1.0 - share) * len(own_idx)))
        rec_idx = _balanced_indices(received.labels, max(1, n_recv // n_cls), rng)
        images.append(received.images[rec_idx])
        labels.append(received.labels[rec_idx])
    return PatchSet(images=np.concatenate(images), labels=np.concatenate(labels).astype(np.int64),
                    class_names=list(own.class_names), kind="real" if received is None else received.kind,
                    meta={"n_own": int(len(own_idx)), "n_received_draws": int(sum(len(x) for x in labels[1:]))})


def _protocol_key(preset: CentrePreset) -> str:
    return config_hash({"protocol": preset.receive_protocol(), "version": 3})[:8]


def received_phase_epochs(n: int, epochs: int, preset: CentrePreset) -> int:
    """Epochs of the sequential protocol's received phase on ``n`` images: the row's ``epochs``, raised
    so the phase takes at least ``preset.sequential_min_steps`` optimiser steps (0 epochs stay 0)."""
    if epochs <= 0 or not preset.sequential_min_steps:
        return epochs
    per = steps_per_epoch(n, preset.batch_size)
    return max(epochs, -(-int(preset.sequential_min_steps) // max(per, 1)))


def fine_tune_and_score(prepared: Prepared, preset: CentrePreset, received: PatchSet | None, *, epochs: int,
                        seed: int) -> tuple[dict[str, float], dict[str, Any]]:
    """(patch metrics on the test split, fine-tune info) of :func:`_fine_tune_classifier`, repeated with
    ``preset.fine_tune_seeds`` seeds (``seed``, ``seed + 1``, ...) and averaged; per-seed balanced
    accuracies in ``info["patch_balanced_accuracy_by_seed"]``. The info (received-phase seconds included)
    is the first seed's: the cost of one fine-tune."""
    metrics, info, _ = fine_tune_scored_model(prepared, preset, received, epochs=epochs, seed=seed)
    return metrics, info


def fine_tune_scored_model(prepared: Prepared, preset: CentrePreset, received: PatchSet | None, *, epochs: int,
                           seed: int) -> tuple[dict[str, float], dict[str, Any], Any]:
    """:func:`fine_tune_and_score` plus the first seed's fine-tuned classifier (the row's slide encoder
    when ``preset.slide_encoder`` is ``fine_tuned``)."""
    n = int(preset.fine_tune_seeds)
    runs = []
    first = None
    for k in range(n):
        model, info = _fine_tune_classifier(prepared, preset, received, epochs=epochs, seed=seed + k)
        runs.append((patch_metrics(model, prepared.test), info))
        first = model if first is None else first
    metrics = {key: float(np.mean([m[key] for m, _ in runs])) for key in runs[0][0]}
    info = dict(runs[0][1])
    if n > 1:
        info.update(fine_tune_seeds=n, patch_balanced_accuracy_by_seed=[
            round(m["patch_balanced_accuracy"], 4) for m, _ in runs])
    return metrics, info, first


def slide_fine_tune(prepared: Prepared, preset: CentrePreset, received: PatchSet | None, *, row_model: Any,
                    epochs: int, seed: int) -> dict[str, Any]:
    """The row's CLAM fine-tune (:func:`slide_level.fine_tune`) on the encoder ``preset.slide_encoder`` names.

    ``frozen``: the pre-trained classifier (the saved test bags). ``fine_tuned``: ``row_model``, this
    row's fine-tuned classifier, encodes every bag of the row (own train, ``received``, test); with
    ``row_model=None`` (a row without a patch set) the classifier is fine-tuned here by the preset's
    protocol without received patches. ``received``: the row's received slide set, already prepared.
    Own train and test bags: :meth:`Prepared.slide_sets` (the separate pseudo-slide sets when the centre has them).
    """
    from histodd_fed.federation import slide_level
    from histodd_fed.training import load_model

    slides = prepared.slide_sets()
    if slides is None:
        raise InputError("this centre has no slide data (no slide level)")
    own = slides[0] if preset.fine_tune_protocol in ("union", "sequential") else None
    if preset.slide_encoder == "frozen":
        encoder, test = load_model(prepared.classifier_dir), None
    else:
        if row_model is None:
            row_model, _ = _fine_tune_classifier(prepared, preset, None, epochs=epochs, seed=seed)
        encoder, test = row_model, slides[1]
    res = slide_level.fine_tune(encoder, received, own, prepared.root, preset, seed, epochs=epochs, test=test)
    return {**res, "slide_encoder": preset.slide_encoder}


def _fine_tune_classifier(prepared: Prepared, preset: CentrePreset, received: PatchSet | None, *, epochs: int,
                          seed: int):
    """Copy of the pre-trained classifier fine-tuned per the preset's protocol; (model, info).

    ``union``: one fine-tune on own + received draws (:func:`mixed_training_set`). ``sequential``: the
    received set alone first (lr x ``sequential_lr_scale``, timed as ``received_train_seconds``; ``epochs``
    raised to at least ``sequential_min_steps`` optimiser steps, :func:`received_phase_epochs`), then
    the own class-balanced set for ``epochs`` (with the received set replayed at ``sequential_replay`` of
    each epoch when that is > 0); without received data only the own phase runs, which is union's
    own-only fine-tune exactly. ``received``: the received set alone.
    """
    from histodd_fed.training import fine_tune, load_model

    model = load_model(prepared.classifier_dir)
    lr = preset.fine_tune_lr * preset.fine_tune_lr_scale
    protocol = preset.fine_tune_protocol
    info: dict[str, Any] = {"fine_tune_protocol": protocol, "fine_tune_lr": lr}

    def run(train: PatchSet, rate: float, n_epochs: int | None = None) -> float:
        n_epochs = epochs if n_epochs is None else n_epochs
        t0 = time.perf_counter()
        if n_epochs > 0:
            fine_tune(model, train, epochs=n_epochs, lr=rate, batch_size=preset.batch_size, seed=seed, device="cpu",
                      augmentation=preset.train_augmentation, progress=False)
        return round(time.perf_counter() - t0, 2)

    if protocol == "union":
        train = mixed_training_set(prepared.train, received, share=preset.received_share, seed=seed)
        run(train, lr)
        return model, {**info, "received_share": preset.received_share if received is not None else 0.0,
                       "fine_tune_set": len(train)}
    if protocol == "sequential":
        has_received = received is not None and len(received) > 0
        if has_received:
            rate = lr * preset.sequential_lr_scale
            r_epochs = received_phase_epochs(len(received), epochs, preset)
            info.update(received_lr=rate, received_train_seconds=run(received, rate, r_epochs),
                        received_set=len(received), received_epochs=r_epochs)
        replay = preset.sequential_replay if has_received else 0.0
        own = mixed_training_set(prepared.train, received if replay else None, share=replay or 0.5, seed=seed)
        run(own, lr)
        if replay:
            info["sequential_replay"] = replay
        return model, {**info, "fine_tune_set": len(own)}
    if protocol != "received":
        raise ConfigError(f"unknown fine-tuning protocol {protocol!r}")
    if received is None:
        return model, {**info, "fine_tune_set": 0}
    info["received_train_seconds"] = run(received, lr)
    return model, {**info, "fine_tune_set": len(received)}


def prepare_received(received: PatchSet, prepared: Prepared, preset: CentrePreset) -> tuple[PatchSet, dict[str, Any]]:
    """Received set at the model input size, stain-normalised to the target when the preset says so
    (a multi-formation set is first decoded into the images it trains, histodd_fed.formation)."""
    received = resize_to(decode_set(received), preset.image_size)
    if preset.stain_normalise_inputs:  # every input to the reference stains (evaluation-side ablation)
        return normalise_to_reference(received, received)
    if preset.stain_normalise_received:
        return stain_normalise_to(received, prepared.train)
    return received, {"received_stain": "as received"}


def evaluate_baseline(cfg: CentreConfig, preset: CentrePreset, prepared: Prepared, *,
                      epochs: int | None = None) -> dict[str, Any]:
    """The "no transfer" row: the centre's own models fine-tuned on its OWN data only, same protocol.

    Same epochs, lr, class balancing and MIL fine-tune as the transfer rows, without any received
    data, so a transfer row's difference from this row is the received data's effect. The models
    before any fine-tuning (zero epochs) are reported as ``pretrained_*``. ``union`` and
    ``sequential`` without received data are the same own-only fine-tune (one cache entry, the
    row labelled with ``preset``'s protocol). With the "received" protocol the row is the
    pre-trained models themselves (the earlier behaviour).
    """
    b = dict(prepared.info.get("baseline", {}))
    epochs = preset.fine_tune_epochs if epochs is None else int(epochs)
    protocol = preset.fine_tune_protocol
    row: dict[str, Any] = {"name": "none", "mode": "none", "ipc": None, "source": None, "ok": True,
                           "images": 0, "bytes": 0}
    row.update({f"pretrained_{k}": v for k, v in b.items()})
    if protocol not in ("union", "sequential") or epochs == 0:
        return {**row, **b, "fine_tune_seconds": 0.0, "epochs": 0, "fine_tune_protocol": protocol}
    own_only = replace(preset, fine_tune_protocol="union", also_protocols=())
    cache = cfg.work_dir / "received" / f"own-{prepared.config_hash[:8]}-{_own_key(preset)}-e{epochs}.json"
    if cache.exists():
        return {**json.loads(cache.read_text()), "fine_tune_protocol": protocol, "cached": True}
    one_thread()
    row.update(own_only_fine_tune(prepared, own_only, epochs=epochs, seed=cfg.seed))
    atomic_write_json(cache, row)
    return {**row, "fine_tune_protocol": protocol, "cached": False}


def own_only_fine_tune(prepared: Prepared, preset: CentrePreset, *, epochs: int, seed: int) -> dict[str, Any]:
    """The "no transfer" fine-tune itself (no cache): classifier and, with MIL, CLAM on own data only."""
    t0 = time.perf_counter()
    metrics, info, model = fine_tune_scored_model(prepared, preset, None, epochs=epochs, seed=seed)
    out: dict[str, Any] = {**info, **metrics}
    if prepared.has_mil:
        out.update(slide_fine_tune(prepared, preset, None, row_model=model, epochs=epochs, seed=seed))
    return {**out, "fine_tune_seconds": round(time.perf_counter() - t0, 2), "epochs": epochs, "own_data_only": True}


def _own_key(preset: CentrePreset) -> str:
    """Cache key of the own-only fine-tune: only the settings it depends on."""
    own = {"fine_tune_lr": preset.fine_tune_lr, "fine_tune_lr_scale": preset.fine_tune_lr_scale,
           "mil_fine_tune_lr": preset.mil_fine_tune_lr}
    if preset.fine_tune_seeds != 1:  # as before the field existed at its default
        own["fine_tune_seeds"] = preset.fine_tune_seeds
    if preset.slide_encoder != "frozen":  # likewise
        own["slide_encoder"] = preset.slide_encoder
    return config_hash({"own": own, "version": 4})[:8]


def fine_tune_on_bundles(cfg: CentreConfig, preset: CentrePreset, prepared: Prepared, *,
                         patch: bytes | None, slides: bytes | None, epochs: int) -> dict[str, Any]:
    """Open the row's bundles; fine-tune copies of the pre-trained models; evaluate on the test split.

    ``patch``: the set the patch classifier is fine-tuned on. ``slides``: the set (with a slide
    table) whose bags fine-tune the pre-trained CLAM head; the same bytes for "Full". Received
    images are used per the preset's protocol (``union``: with the centre's own train data,
    received at a fixed share; ``sequential``: received alone, then own data). The bundles are
    opened once (the ledger refuses a second opening) and the models fine-tuned once per protocol
    of :meth:`CentrePreset.protocols`: the result is the main protocol's, the others under
    ``by_protocol`` (protocol -> result).
    """
    blobs = [b for b in (patch, slides) if b is not None]
    if not blobs:
        raise InputError("nothing to fine-tune on: no bundle in this row")
    sha = hashlib.sha256(b"".join(hashlib.sha256(b).digest() for b in (patch or b"", slides or b""))).hexdigest()
    cache = cfg.work_dir / "received" / f"{sha[:32]}-{prepared.config_hash[:8]}-{_protocol_key(preset)}-e{epochs}.json"
    if cache.exists():
        recheck_senders(cfg, blobs)  # a sender revoked since: its cached metrics are not served
        out = json.loads(cache.read_text())
        out["cached"] = True
        return out
    one_thread()
    opened: dict[int, PatchSet] = {}
    received_from: list[dict[str, Any]] = []
    for b in blobs:
        if id(b) not in opened:
            ob = open_received_bundle(cfg, b)
            ps = ob.patchset
            if list(ps.class_names) != list(prepared.train.class_names):
                raise InputError(f"received classes {ps.class_names} differ from ours {prepared.train.class_names}")
            opened[id(b)] = ps
            received_from.append(provenance(ob))
    results = [_fine_tune_opened(cfg, preset.for_protocol(proto), prepared,
                                 patch=opened[id(patch)] if patch is not None else None,
                                 slides=opened[id(slides)] if slides is not None else None, epochs=epochs)
               for proto in preset.protocols()]
    out = {**results[0], "received_from": received_from}
    if len(results) > 1:
        out["by_protocol"] = {p: {**r, "received_from": received_from}
                              for p, r in zip(preset.protocols()[1:], results[1:])}
    atomic_write_json(cache, out)
    out["cached"] = False
    return out


def _fine_tune_opened(cfg: CentreConfig, preset: CentrePreset, prepared: Prepared, *, patch: PatchSet | None,
                      slides: PatchSet | None, epochs: int) -> dict[str, Any]:
    """One protocol's fine-tune of copies of the pre-trained models on opened received sets; metrics."""
    from histodd_fed.federation import slide_level

    out: dict[str, Any] = {"epochs": epochs, "fine_tune_protocol": preset.fine_tune_protocol}
    t0 = time.perf_counter()
    received_s = 0.0
    row_model = None  # the row's fine-tuned classifier (its slide encoder under slide_encoder: fine_tuned)
    if patch is not None:
        received, stain_info = prepare_received(patch, prepared, preset)
        out.update(stain_info)
        tp = time.perf_counter()
        metrics, info, row_model = fine_tune_scored_model(prepared, preset, received, epochs=epochs, seed=cfg.seed)
        out.update(info)
        received_s += float(info.get("received_train_seconds") or 0.0)
        out["patch_fine_tune_seconds"] = round(time.perf_counter() - tp, 2)
        out.update(metrics)
        out.update(images=len(received), kind=received.kind)
    if slides is not None and prepared.has_mil:
        if slide_level.has_slides(slides):
            received, stain_info = prepare_received(slides, prepared, preset)
            out.setdefault("received_stain", stain_info["received_stain"])
            ts = time.perf_counter()
            res = slide_fine_tune(prepared, preset, received, row_model=row_model, epochs=epochs, seed=cfg.seed)
            received_s += float(res.get("slide_received_train_seconds") or 0.0)
            out.update(res)
            out["slide_fine_tune_seconds"] = round(time.perf_counter() - ts, 2)
        else:
            out["slide_note"] = "received set has no slide table"
    if "received_train_seconds" in out or "slide_received_train_seconds" in out:
        # the cost of the received data alone: its received-only phase(s), classifier + CLAM
        out["received_seconds"] = round(received_s, 2)
    out["fine_tune_seconds"] = round(time.perf_counter() - t0, 2)
    return out
