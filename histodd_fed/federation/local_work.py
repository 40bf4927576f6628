"""A centre's local work: prepare its data and models, distil, seal, open, fine-tune, evaluate.

Everything is cached under the centre's work directory, keyed by config hashes, so a restarted
node (or coordinator) never redoes finished work:

- ``prepared/<hash>/``   train/test patch sets (at the model input size), the pre-trained
  classifier, the CLAM head (``mil/``) and the encoded real test bags (``test_bags/``), ``prepared.json``
- ``synthetic/<hash>/``  distilled patch sets (one per distillation config: patch-level or per-slide)
- ``received/<sha256>.json``  metrics of a row's bundles already fine-tuned on (replays are answered
  from here: the bundle ledger would refuse to open them twice)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from histodd_fed.atomic import atomic_write_json
from histodd_fed.errors import ConfigError, InputError
from histodd_fed.federation.centre_config import CentreConfig
from histodd_fed.federation.presets import CentrePreset
from histodd_fed.formation import decode_set
from histodd_fed.patchset import PatchSet
from histodd_fed.preprocess import resize_to
from histodd_fed.runconfig import config_hash, write_run_config
from histodd_fed.training.trainer import steps_per_epoch  # the trainer's batching (received_phase_epochs)

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- identity
_IDENTITIES: dict[tuple, Any] = {}


def load_or_create_identity(cfg: CentreConfig):
    """The centre's identity from its key dir (created on first use), unlocked once per process.

    An ``env:NAME`` passphrase source is removed from ``os.environ`` once read (no process this
    centre starts afterwards inherits it); each key dir's unlocked identity is kept for the process."""
    from histodd_fed.bundle.identity import (IDENTITY_FILE, SIGNING_KEY_FILE, forget_env_passphrase,
                                             generate_identity, load_identity, read_passphrase)

    source = getattr(cfg, "key_passphrase", "") or None   # node config key-passphrase: env:NAME, file:PATH, fd:N
    pw = None
    if not (cfg.key_dir / IDENTITY_FILE).exists():
        log.info("%s: no identity in %s, generating one", cfg.centre_id, cfg.key_dir)
        pw = read_passphrase(source) if source else None
        generate_identity(cfg.centre_id, cfg.key_dir, passphrase=pw)
    f = cfg.key_dir / SIGNING_KEY_FILE
    where = str(cfg.key_dir.resolve())
    memo = (where, source, f.stat().st_mtime_ns if f.exists() else 0)
    ident = _IDENTITIES.get(memo)
    if ident is None:  # unlock once per process (scrypt at login cost)
        ident = (load_identity(cfg.key_dir, pw) if pw is not None
                 else load_identity(cfg.key_dir, passphrase_source=source))
        for old in [m for m in _IDENTITIES if m[0] == where]:
            del _IDENTITIES[old]
        _IDENTITIES[memo] = ident
    forget_env_passphrase(source)
    if ident.centre_id != cfg.centre_id:
        raise ConfigError(f"{cfg.key_dir}: holds the identity of {ident.centre_id!r}, not {cfg.centre_id!r}")
    return ident


# ---------------------------------------------------------------------------- data
def _split(ps: PatchSet, seed: int) -> tuple[PatchSet, PatchSet]:
    """(train, test): the slide splits in ``meta`` when present, else 80/20 by slide or patch."""
    if ps.meta.get("slide_splits"):
        from histodd_fed.slides.manifest import select_split

        return select_split(ps, "train"), select_split(ps, "test")
    rng = np.random.default_rng(seed)
    if ps.slide_ids:
        ids = np.array(ps.slide_ids)
        rng.shuffle(ids)
        n_test = max(1, len(ids) // 5)
        test_ids = {ps.slide_ids.index(s) for s in ids[:n_test]}
        is_test = np.isin(ps.slide_index, list(test_ids))
    else:
        is_test = np.zeros(len(ps), dtype=bool)
        is_test[rng.permutation(len(ps))[: max(1, len(ps) // 5)]] = True
    return ps.subset(np.flatnonzero(~is_test)), ps.subset(np.flatnonzero(is_test))


def load_real_patches(cfg: CentreConfig, preset: CentrePreset) -> PatchSet:
    """The centre's real patches: a patch-set/image-folder directory, or slides tiled (cached)."""
    data = cfg.data
    if not data.exists():
        raise InputError(f"{data}: centre data not found")
    if data.is_dir() and ((data / "patchset.json").exists() or _is_image_folder(data)):
        return PatchSet.load(data)
    from histodd_fed.slides.tiling import tile_slides

    tiles = cfg.work_dir / "tiles" / config_hash({"data": str(data), "patch": preset.patch_size,
                                                  "mpp": preset.mpp, "tissue": preset.tissue_threshold,
                                                  "seed": cfg.seed})[:16]
    if not (tiles / "patchset.json").exists():
        log.info("%s: tiling %s", cfg.centre_id, data)
        tile_slides(data, tiles, labels_csv=cfg.labels_csv, patch_size=preset.patch_size, mpp=preset.mpp,
                    tissue_threshold=preset.tissue_threshold, workers=1, seed=cfg.seed)
    return PatchSet.load(tiles)


def load_real_splits(data: Path) -> tuple[PatchSet, PatchSet] | None:
    """A centre folder holding ``train/`` and ``test/`` patch sets (e.g. ``make-pcam-centres``'s C2):
    that split as given; None for any other data."""
    data = Path(data)
    if data.is_dir() and all((data / s / "patchset.json").exists() for s in ("train", "test")):
        return PatchSet.load(data / "train"), PatchSet.load(data / "test")
    return None


def _centre_view(ps: PatchSet, preset: CentrePreset) -> PatchSet:
    """``ps`` at the model input size; first its central ``preset.crop_center`` px when the preset says so."""
    from histodd_fed.preprocess import prepare as view

    crop = preset.crop_center if preset.crop_center and ps.image_size > preset.crop_center else None
    return view(ps, crop=crop, size=preset.image_size) if crop else resize_to(ps, preset.image_size)


def normalise_to_reference(ps: PatchSet, stats_from: PatchSet) -> tuple[PatchSet, dict[str, Any]]:
    """``ps`` mapped to the reference H&E stains, set-level: concentrations under the pooled stain
    matrix of ``stats_from`` (:func:`set_stains`; the centre's own train patches for its own data, the
    received set itself for received data) scaled by one factor per stain (reference / pooled 99th
    percentile) and recomposed with the reference matrix. Background images are left unchanged."""
    from histodd_fed.stain import macenko

    sm, smax, _, _ = set_stains(stats_from.images)
    _, _, ok = macenko.estimate_stains(ps.images)
    scale = macenko.REFERENCE_MAX_CONC / np.maximum(smax, 1e-3)
    out = ps.images.copy()
    h, w = ps.images.shape[1:3]
    for i in np.flatnonzero(ok):
        conc = macenko.concentrations(ps.images[i], sm) * scale
        out[i] = np.round(macenko.od_to_rgb(conc @ macenko.REFERENCE_STAINS.T)).reshape(h, w, 3).astype(np.uint8)
    res = ps.subset(np.arange(len(ps)))
    res.images = out
    res.meta = dict(ps.meta, stain_normalised_to="reference")
    return res, {"input_stain": "macenko->reference", "stain_scale": [round(float(v), 4) for v in scale],
                 "stain_normalised_images": int(ok.sum())}


def _is_image_folder(d: Path) -> bool:
    return any(p.is_dir() and any(p.glob("*.jpg")) or any(p.glob("*.png")) for p in d.iterdir() if p.is_dir())


# ---------------------------------------------------------------------------- prepare
@dataclass
class Prepared:
    """A centre's prepared state: splits and pre-trained models (all on disk)."""

    root: Path
    train: PatchSet
    test: PatchSet
    classifier_dir: Path
    has_mil: bool
    config_hash: str
    info: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {"class_counts": self.train.class_counts(), "test_class_counts": self.test.class_counts(),
                "class_names": list(self.train.class_names), "n_train": len(self.train),
                "n_train_total": int(self.info.get("n_train_total", len(self.train))),
                "n_test": len(self.test), "prepared_hash": self.config_hash[:16],
                "baseline": self.info.get("baseline", {})}


def _prepare_key(cfg: CentreConfig, preset: CentrePreset) -> dict[str, Any]:
    return {"centre": cfg.centre_id, "data": str(cfg.data.resolve()), "seed": cfg.seed,
            "preset": preset.prepare_dict(), "version": 2}


def _threads() -> None:
    import torch

    torch.set_num_threads(1)  # two centres share the machine; 1 thread each is fastest here


def patch_metrics(model, test: PatchSet) -> dict[str, float]:
    """Patch accuracy, balanced accuracy and AUC of ``model`` on ``test``."""
    from histodd_fed.training import evaluate_classifier

    m = evaluate_classifier(model, test, device="cpu")
    return {"patch_accuracy": float(m.accuracy), "patch_balanced_accuracy": float(m.balanced_accuracy),
            "patch_auc": float(m.auc)}


def prepare(cfg: CentreConfig, preset: CentrePreset) -> Prepared:
    """Split the centre's data, train its ResNet18 and CLAM on its own train split (cached)."""
    from histodd_fed.federation import slide_level

    key = _prepare_key(cfg, preset)
    h = config_hash(key)
    root = cfg.work_dir / "prepared" / h[:16]
    done = root / "prepared.json"
    if done.exists():
        info = json.loads(done.read_text())
        return Prepared(root, PatchSet.load(root / "train"), PatchSet.load(root / "test"), root / "classifier",
                        (root / slide_level.MIL_DIR).exists(), h, info)
    _threads()
    t0 = time.perf_counter()
    given = load_real_splits(cfg.data)  # a folder with train/ and test/ patch sets: that split
    train, test = given if given is not None else _split(load_real_patches(cfg, preset), cfg.seed)
    n_total = len(train)
    if preset.max_train_patches and len(train) > preset.max_train_patches:
        idx = np.sort(np.random.default_rng(cfg.seed).choice(len(train), preset.max_train_patches, replace=False))
        train = train.subset(idx)
    train = _centre_view(train, preset)
    test = _centre_view(test, preset)
    if preset.stain_normalise_inputs:  # evaluation-side stain ablation: own data to the reference stains
        train, test = normalise_to_reference(train, train)[0], normalise_to_reference(test, train)[0]
    if len(train) == 0 or len(test) == 0:
        raise InputError(f"{cfg.data}: too little data (train {len(train)}, test {len(test)} patches)")
    root.mkdir(parents=True, exist_ok=True)
    train.save(root / "train")
    test.save(root / "test")
    t1 = time.perf_counter()
    model = _train_classifier(train, preset, cfg.seed)
    from histodd_fed.training import save_model

    save_model(model, root / "classifier", arch=preset.classifier, num_classes=train.num_classes,
               image_size=preset.image_size, arch_kwargs=dict(preset.classifier_kwargs),
               class_names=train.class_names)
    baseline = patch_metrics(model, test)
    t2 = time.perf_counter()
    if slide_level.has_slides(train) and slide_level.has_slides(test):
        baseline.update(slide_level.pretrain(model, train, test, preset, cfg.seed, root))
    info = {"key": key, "seconds": round(time.perf_counter() - t0, 2), "baseline": baseline,
            "n_train_total": n_total,
            "timing": {"data": round(t1 - t0, 2), "classifier": round(t2 - t1, 2),
                       "mil": round(time.perf_counter() - t2, 2)}}
    write_run_config(root, "federation.prepare", key)
    atomic_write_json(done, info)
    log.info("%s: prepared in %.1fs %s", cfg.centre_id, info["seconds"], info["timing"])
    return Prepared(root, train, test, root / "classifier", (root / slide_level.MIL_DIR).exists(), h, info)


def _train_classifier(train: PatchSet, preset: CentrePreset, seed: int):
    from histodd_fed.training import build_seeded_model, train_classifier

    model = build_seeded_model(preset.classifier, seed=seed, num_classes=train.num_classes,
                               image_size=preset.image_size, **dict(preset.classifier_kwargs))
    return train_classifier(model, train, epochs=preset.pretrain_epochs, lr=preset.lr * 10,
                            batch_size=preset.batch_size, seed=seed, device="cpu",
                            progress=False, desc="pre-train").model


# ---------------------------------------------------------------------------- distil
@dataclass
class DistilResult:
    patchset: PatchSet
    config_hash: str
    cached: bool
    seconds: float


def _distill_config_path(preset: CentrePreset) -> Path:
    p = Path(preset.distill_config)
    for cand in (p, REPO_ROOT / p):
        if cand.exists():
            return cand
    raise ConfigError(f"distillation config {preset.distill_config} not found")


def distil_cached(cfg: CentreConfig, preset: CentrePreset, prepared: Prepared, *, ipc: int, seed: int,
                  per_slide: bool = False, extra_overrides: dict[str, Any] | None = None) -> DistilResult:
    """Histo-DD synthetic set from the train split (cached by hash).

    ``per_slide=False``: ``ipc`` images per class. ``per_slide=True``: ``preset.slide_ipc`` images per
    class per train slide, keeping the slide table (slide_index / slide_ids / slide_labels) for MIL.
    """
    from histodd_fed.distill import distill
    from histodd_fed.distill.config import DistillConfig

    overrides = dict(preset.distill_overrides)
    overrides.update(ipc=int(ipc), seed=int(seed))
    if int(ipc) in dict(preset.outer_steps_by_ipc):  # K scales with ipc (paper: 200 / 500 / 1000)
        overrides["outer_steps"] = int(dict(preset.outer_steps_by_ipc)[int(ipc)])
    overrides.update(extra_overrides or {})  # a study variant (e.g. another matching augmentation)
    if per_slide:
        overrides.update(ipc=int(preset.slide_ipc), per_slide=True, slide_outer_steps=int(preset.slide_outer_steps))
    dcfg = DistillConfig.from_yaml(_distill_config_path(preset), **overrides)
    h = config_hash({"distill": dcfg, "real": prepared.config_hash})
    out = cfg.work_dir / "synthetic" / h[:16]
    if (out / "patchset.json").exists():
        return DistilResult(PatchSet.load(out), h, True, 0.0)
    _threads()
    t0 = time.perf_counter()
    from histodd_fed.release.choose import candidate_check

    syn = distill(prepared.train, dcfg, work_dir=cfg.work_dir / "distill-work" / h[:16], progress=False,
                  candidate_check=candidate_check(prepared.train) if dcfg.candidate_gate else None)
    syn.save(out)
    write_run_config(out, "federation.distil", {"distill": dcfg, "real": prepared.config_hash})
    return DistilResult(syn, h, False, round(time.perf_counter() - t0, 2))


def coreset_cached(cfg: CentreConfig, preset: CentrePreset, prepared: Prepared, *, method: str, ipc: int,
                   seed: int) -> DistilResult:
    """A coreset (REAL patches: random / herding / forgetting) of the train split, cached by hash.

    Features / forgetting statistics from a ConvNet-3 w32 as in the PCam studies (configs/study-cpu.yaml).
    """
    from histodd_fed.coreset import CoresetConfig, build_coreset

    ccfg = CoresetConfig(method=method, ipc=int(ipc), seed=int(seed), arch="convnet",
                         arch_kwargs={"width": 32, "depth": 3}, feature_epochs=3, forgetting_epochs=6, device="cpu")
    key = {"coreset": ccfg, "real": prepared.config_hash}
    h = config_hash(key)
    out = cfg.work_dir / "coresets" / h[:16]
    if (out / "patchset.json").exists():
        return DistilResult(PatchSet.load(out), h, True, 0.0)
    _threads()
    t0 = time.perf_counter()
    ps = build_coreset(prepared.train, ccfg, progress=False)
    ps.save(out)
    write_run_config(out, "federation.coreset", key)
    return DistilResult(ps, h, False, round(time.perf_counter() - t0, 2))


# ---------------------------------------------------------------------------- privacy gate
def gate_report(ps: PatchSet, prepared: Prepared) -> tuple[bool, dict[str, Any], str]:
    """Run the export gate on ``ps`` against this centre's real train patches.

    Returns ``(blocked, privacy_report, message)``; the report is what gets sealed into the
    manifest. Nothing is raised for a blocked set: the caller reports it and does not send it.
    """
    from histodd_fed.privacy.gate import check_export

    _threads()
    decision = check_export(synthetic=ps, real=prepared.train, accept_risk=False, require_audit=True,
                            raise_on_block=False)
    summary = decision.to_dict()
    return decision.blocked, summary, decision.message()


def full_privacy_report(prepared: Prepared) -> dict[str, Any]:
    """Privacy report for the "Full" comparison: real patches, risk accepted by definition."""
    from histodd_fed.privacy.gate import GateDecision

    reason = "Full comparison: the source's real train patches (real data by definition)"
    return GateDecision(passed=False, accepted_risk=True, reasons=[reason],
                        summary={"audited": False, "kind": "real", "n_real": len(prepared.train)},
                        audited=False, override_requested=True).to_dict()


# ---------------------------------------------------------------------------- bundles
def seal_for(cfg: CentreConfig, ps: PatchSet, recipients: list[str], label: str,
             privacy_report: dict[str, Any] | None = None, extra: dict[str, Any] | None = None, *,
             seed: int | None = None) -> bytes:
    """Seal ``ps`` from this centre to ``recipients`` (all must be in its trust store).

    The release is checked against the centre's release budget (``cfg.policy``) and recorded per
    recipient in its release ledger (``releases.json`` in the key dir) under one lock;
    :class:`~histodd_fed.bundle.releases.ReleaseBudgetError` when refused (nothing sealed or recorded).
    ``seed``: the distillation seed the centre picked (recorded in the ledger). Slide ids and source
    indices are replaced by per-bundle pseudonyms unless the policy allows them (``export-slide-ids``).
    """
    import os

    from histodd_fed.bundle import seal
    from histodd_fed.bundle.releases import ReleaseBudget, ReleaseLedger, SetRelease
    from histodd_fed.bundle.trust import TrustStore

    ident = load_or_create_identity(cfg)
    trust = TrustStore.load(cfg.key_dir)
    keys = trust.recipients(recipients)
    policy = getattr(cfg, "policy", None)
    budget = policy.budget() if policy is not None else ReleaseBudget()
    release = SetRelease.of(ps, seed=seed, where=f"{cfg.centre_id} set {label}")
    if policy is None or not policy.slide_ids:  # real slide ids / source indices stay home
        from histodd_fed.federation.pseudonyms import pseudonymise

        ps = pseudonymise(ps)
    with ReleaseLedger.in_key_dir(cfg.key_dir).claim(release, recipients, budget,
                                                     who=f"{cfg.centre_id}: {label}") as claim:
        claim.bundle_id = os.urandom(16).hex()
        return seal(ps, ident, keys, privacy_report=privacy_report, release=claim.manifest(),
                    bundle_id=claim.bundle_id,
                    extra_manifest={"transfer": label,
                                    "accepted_privacy_risk": bool((privacy_report or {}).get("accepted_risk")),
                                    **(extra or {})})


def open_received_bundle(cfg: CentreConfig, data: bytes):
    """Verify and open a bundle addressed to this centre (replay-checked by its ledger): OpenedBundle."""
    from histodd_fed.bundle import open_bundle
    from histodd_fed.bundle.ledger import Ledger
    from histodd_fed.bundle.trust import TrustStore

    ident = load_or_create_identity(cfg)
    return open_bundle(data, ident, TrustStore.load(cfg.key_dir), Ledger.in_key_dir(cfg.key_dir))


def open_received(cfg: CentreConfig, data: bytes) -> PatchSet:
    """Verify and open a bundle addressed to this centre (replay-checked by its ledger)."""
    return open_received_bundle(cfg, data).patchset


def provenance(opened) -> dict[str, Any]:
    """What a target knows of a received bundle from its opened, verified manifest (not the relay)."""
    m = opened.manifest
    extra = m.get("extra") or {}
    return {"source": opened.header.source_centre, "sign_key_id": opened.header.sign_key_id,
            "bundle_id": opened.header.bundle_id, "transfer": str(extra.get("transfer", "")),
            "kind": m.get("kind"), "ipc": extra.get("ipc", m.get("ipc")), "num_images": m.get("num_images"),
            "row": extra.get("row"), "part": extra.get("part"), "train_total": extra.get("train_total"),
            "m_per_slide": extra.get("m_per_slide"), "export_policy": extra.get("export_policy")}


def recheck_senders(cfg: CentreConfig, blobs: list[bytes]) -> None:
    """Re-verify bundles against the CURRENT trust store (a revoked sender's cached rows are refused)."""
    from histodd_fed.bundle import verify
    from histodd_fed.bundle.trust import TrustStore

    trust = TrustStore.load(cfg.key_dir)
    for b in blobs:
        verify(b, trust)


# ---------------------------------------------------------------------------- receive: stain + mix
def set_stains(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """One Macenko stain description of a whole patch set: ``(matrix (3, 2), max_conc (2,), n_est, template)``.

    Per-image estimates (:func:`histodd_fed.stain.macenko.estimate_stains`) of the images with enough
    tissue are pooled by their median (columns renormalised to unit length); ``template`` is
    :func:`~histodd_fed.stain.macenko.choose_template`'s image, whose estimate is used when no image
    has enough tissue (and the reference H&E stains when even that one has none).
    """
    from histodd_fed.stain import macenko

    t = macenko.choose_template(images)
    mats, maxc, ok = macenko.estimate_stains(images)
    if not ok.any():
        return mats[t].astype(np.float64), maxc[t].astype(np.float64), 0, t
    m = np.median(mats[ok].astype(np.float64), axis=0)
    m = m / np.maximum(np.linalg.norm(m, axis=0, keepdims=True), 1e-6)
    return m, np.median(maxc[ok].astype(np.float64), axis=0), int(ok.sum()), t


def stain_normalise_to(received: PatchSet, own: PatchSet) -> tuple[PatchSet, dict[str, Any]]:
    """``received`` Macenko-normalised into the colour space of ``own`` (the target's train patches).

    Set-level mapping: the received set's pooled stain matrix and max concentrations
    (:func:`set_stains`) -> the target's pooled ones. Every received image's concentrations under the
    SOURCE matrix are scaled by ``max_target / max_source`` (one factor per stain for the whole set, so
    relative darkness between images - a tumour cue - is kept, unlike per-image max scaling) and
    recomposed with the TARGET matrix. Images without tissue (background) are left unchanged.
    """
    from histodd_fed.stain import macenko

    tm, tmax, t_n, t_idx = set_stains(own.images)
    sm, smax, s_n, _ = set_stains(received.images)
    _, _, ok = macenko.estimate_stains(received.images)
    out = received.images.copy()
    h, w = received.images.shape[1:3]
    scale = tmax / np.maximum(smax, 1e-3)
    for i in np.flatnonzero(ok):
        conc = macenko.concentrations(received.images[i], sm) * scale
        out[i] = np.round(macenko.od_to_rgb(conc @ tm.T)).reshape(h, w, 3).astype(np.uint8)
    res = received.subset(np.arange(len(received)))
    res.images = out
    res.meta = dict(received.meta, stain_normalised_to="target")
    info = {"received_stain": "macenko->target", "stain_target_images": t_n, "stain_template_index": int(t_idx),
            "stain_normalised_images": int(ok.sum()), "stain_unchanged_images": int((~ok).sum()),
            "stain_scale": [round(float(v), 4) for v in scale]}
    return res, info


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
    metrics, info, _ = _fine_tune_scored(prepared, preset, received, epochs=epochs, seed=seed)
    return metrics, info


def _fine_tune_scored(prepared: Prepared, preset: CentrePreset, received: PatchSet | None, *, epochs: int,
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
    """
    from histodd_fed.federation import slide_level
    from histodd_fed.training import load_model

    own = prepared.train if preset.fine_tune_protocol in ("union", "sequential") else None
    if preset.slide_encoder == "frozen":
        encoder, test = load_model(prepared.classifier_dir), None
    else:
        if row_model is None:
            row_model, _ = _fine_tune_classifier(prepared, preset, None, epochs=epochs, seed=seed)
        encoder, test = row_model, prepared.test
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
                      progress=False)
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


# ---------------------------------------------------------------------------- fine-tune
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
    _threads()
    row.update(own_only_fine_tune(prepared, own_only, epochs=epochs, seed=cfg.seed))
    atomic_write_json(cache, row)
    return {**row, "fine_tune_protocol": protocol, "cached": False}


def own_only_fine_tune(prepared: Prepared, preset: CentrePreset, *, epochs: int, seed: int) -> dict[str, Any]:
    """The "no transfer" fine-tune itself (no cache): classifier and, with MIL, CLAM on own data only."""
    t0 = time.perf_counter()
    metrics, info, model = _fine_tune_scored(prepared, preset, None, epochs=epochs, seed=seed)
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
    _threads()
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
        metrics, info, row_model = _fine_tune_scored(prepared, preset, received, epochs=epochs, seed=cfg.seed)
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
