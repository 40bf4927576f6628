"""A centre's own data: its real patches (a patch set, an image folder or slides tiled), their
train/test split at the model input size, and the prepared state (splits + pre-trained models).

Cached under the centre's work directory, keyed by config hashes, so a restarted node never redoes it:

- ``tiles/<hash>/``      slides tiled into a patch set (when the centre's data are slides)
- ``prepared/<hash>/``   train/test patch sets (at the model input size), the pre-trained
  classifier, the CLAM head (``mil/``) and the encoded real test bags (``test_bags/``), ``prepared.json``
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from histodd_fed.atomic import atomic_write_json
from histodd_fed.errors import InputError
from histodd_fed.federation.centre_config import CentreConfig
from histodd_fed.federation.presets import CentrePreset
from histodd_fed.federation.stain_mapping import normalise_to_reference
from histodd_fed.patchset import PatchSet
from histodd_fed.preprocess import resize_to
from histodd_fed.runconfig import config_hash, write_run_config

log = logging.getLogger(__name__)


def one_thread() -> None:
    """One torch thread for this process (called before any torch work of a centre)."""
    import torch

    torch.set_num_threads(1)  # two centres share the machine; 1 thread each is fastest here


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


#: a centre folder's separate slide sets (pseudo-slides, ``make-pcam-centres --hospitals``), beside train/test
SLIDE_SPLITS = ("slides-train", "slides-test")


def has_slide_splits(data: Path) -> bool:
    """True when ``data`` holds a pair of separate slide sets (``slides-train/``, ``slides-test/``)."""
    data = Path(data)
    return data.is_dir() and all((data / s / "patchset.json").exists() for s in SLIDE_SPLITS)


def load_slide_splits(data: Path) -> tuple[PatchSet, PatchSet] | None:
    """A centre folder's separate slide sets ``slides-train/`` and ``slides-test/`` (both with a slide table):
    the slide data of a centre whose patch splits have none; None when the folder has no such pair."""
    from histodd_fed.federation.slide_level import has_slides

    data = Path(data)
    if not has_slide_splits(data):
        return None
    train, test = (PatchSet.load(data / s) for s in SLIDE_SPLITS)
    for name, ps in zip(SLIDE_SPLITS, (train, test)):
        if not has_slides(ps):
            raise InputError(f"{data / name}: a slide set without a labelled slide table")
    return train, test


def _centre_view(ps: PatchSet, preset: CentrePreset) -> PatchSet:
    """``ps`` at the model input size; first its central ``preset.crop_center`` px when the preset says so."""
    from histodd_fed.preprocess import prepare as view

    crop = preset.crop_center if preset.crop_center and ps.image_size > preset.crop_center else None
    return view(ps, crop=crop, size=preset.image_size) if crop else resize_to(ps, preset.image_size)


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
    #: the train patches before the model's view (e.g. 96-px PCam patches when the model sees their central
    #: 32 px): the export gate's reference, so its copy detector searches every window inside the raw patch
    #: exactly as `centre-node export --patches RAW` does; None when the view changes nothing
    raw_train_dir: Path | None = None
    #: the centre's separate slide sets at the model input size (``slides-train`` / ``slides-test`` of its data
    #: folder: pseudo-slides); None: its slide data, if any, are ``train`` / ``test`` themselves
    slide_train: PatchSet | None = None
    slide_test: PatchSet | None = None

    def slide_sets(self) -> tuple[PatchSet, PatchSet] | None:
        """(train, test) slide data: the separate slide sets when the centre has them, else ``train`` / ``test``
        when both carry slide tables; None: no slide level."""
        from histodd_fed.federation.slide_level import has_slides

        if self.slide_train is not None and self.slide_test is not None:
            return self.slide_train, self.slide_test
        if has_slides(self.train) and has_slides(self.test):
            return self.train, self.test
        return None

    @property
    def separate_slides(self) -> bool:
        """True when the slide data are separate sets (a "Full" then sends the slide set as its own part)."""
        return self.slide_train is not None

    def gate_reference(self) -> PatchSet:
        """The real patches the export gate (and the gate-aware candidate choice) audits against."""
        if self.raw_train_dir is not None and (self.raw_train_dir / "patchset.json").exists():
            return PatchSet.load(self.raw_train_dir)
        return self.train

    def summary(self) -> dict[str, Any]:
        return {"class_counts": self.train.class_counts(), "test_class_counts": self.test.class_counts(),
                "class_names": list(self.train.class_names), "n_train": len(self.train),
                "n_train_total": int(self.info.get("n_train_total", len(self.train))),
                "n_test": len(self.test), "prepared_hash": self.config_hash[:16],
                "baseline": self.info.get("baseline", {})}


#: where ``prepare`` keeps the raw train patches (before the view) under a prepared folder
RAW_TRAIN_DIR = "train-raw"


def _prepare_key(cfg: CentreConfig, preset: CentrePreset) -> dict[str, Any]:
    key = {"centre": cfg.centre_id, "data": str(cfg.data.resolve()), "seed": cfg.seed,
           "preset": preset.prepare_dict(), "version": 2}
    if has_slide_splits(cfg.data):  # only then: every other centre keeps its key
        key["slide_sets"] = list(SLIDE_SPLITS)
    return key


def patch_metrics(model, test: PatchSet) -> dict[str, float]:
    """Patch accuracy, balanced accuracy and AUC of ``model`` on ``test``."""
    from histodd_fed.training import evaluate_classifier

    m = evaluate_classifier(model, test, device="cpu")
    return {"patch_accuracy": float(m.accuracy), "patch_balanced_accuracy": float(m.balanced_accuracy),
            "patch_auc": float(m.auc)}


def prepare(cfg: CentreConfig, preset: CentrePreset, *, models: bool = True) -> Prepared:
    """Split the centre's data (cached); with ``models`` also train its classifier and CLAM on its own train
    split (cached; trained the first time a call asks for them).

    A source only sends sets made from its data (``distil``), so its identity and distil replies prepare the
    data alone; the models are trained when a ``train`` request (the target's fine-tunes) needs them. The
    splits, and the models when they come, are the same either way (each seeded by the centre's seed).
    """
    from histodd_fed.federation import slide_level

    key = _prepare_key(cfg, preset)
    h = config_hash(key)
    root = cfg.work_dir / "prepared" / h[:16]
    done = root / "prepared.json"
    raw_dir = root / RAW_TRAIN_DIR
    if done.exists():
        info = json.loads(done.read_text())
        prepared = Prepared(root, PatchSet.load(root / "train"), PatchSet.load(root / "test"), root / "classifier",
                            (root / slide_level.MIL_DIR).exists(), h, info,
                            raw_dir if (raw_dir / "patchset.json").exists() else None,
                            *(load_slide_splits(root) or (None, None)))
        # a prepared.json without "models" predates the split: its models were trained with the data
        return _train_models(prepared, preset, cfg.seed) if models and not info.get("models", True) else prepared
    one_thread()
    t0 = time.perf_counter()
    given = load_real_splits(cfg.data)  # a folder with train/ and test/ patch sets: that split
    train, test = given if given is not None else _split(load_real_patches(cfg, preset), cfg.seed)
    n_total = len(train)
    if preset.max_train_patches and len(train) > preset.max_train_patches:
        idx = np.sort(np.random.default_rng(cfg.seed).choice(len(train), preset.max_train_patches, replace=False))
        train = train.subset(idx)
    raw_train = train
    train = _centre_view(train, preset)
    test = _centre_view(test, preset)
    keep_raw = raw_train.image_size != train.image_size and not preset.stain_normalise_inputs
    if preset.stain_normalise_inputs:  # evaluation-side stain ablation: own data to the reference stains
        train, test = normalise_to_reference(train, train)[0], normalise_to_reference(test, train)[0]
    if len(train) == 0 or len(test) == 0:
        raise InputError(f"{cfg.data}: too little data (train {len(train)}, test {len(test)} patches)")
    root.mkdir(parents=True, exist_ok=True)
    train.save(root / "train")
    test.save(root / "test")
    if keep_raw:
        raw_train.save(raw_dir)
    slide_train = slide_test = None
    separate = load_slide_splits(cfg.data)
    if separate is not None:  # the same view as the patch splits (and the same stain handling)
        slide_train, slide_test = (_centre_view(s, preset) for s in separate)
        if preset.stain_normalise_inputs:
            slide_train = normalise_to_reference(slide_train, train)[0]
            slide_test = normalise_to_reference(slide_test, train)[0]
        slide_train.save(root / SLIDE_SPLITS[0])
        slide_test.save(root / SLIDE_SPLITS[1])
    info = {"key": key, "seconds": round(time.perf_counter() - t0, 2), "baseline": {}, "n_train_total": n_total,
            "models": False, "timing": {"data": round(time.perf_counter() - t0, 2)}}
    write_run_config(root, "federation.prepare", key)
    atomic_write_json(done, info)
    prepared = Prepared(root, train, test, root / "classifier", False, h, info, raw_dir if keep_raw else None,
                        slide_train, slide_test)
    log.info("%s: data prepared in %.1fs", cfg.centre_id, info["seconds"])
    return _train_models(prepared, preset, cfg.seed) if models else prepared


def _train_models(prepared: Prepared, preset: CentrePreset, seed: int) -> Prepared:
    """Train the centre's classifier (and CLAM on its slide data) on its train split; record them (and the
    baseline metrics on its test split) in ``prepared.json``."""
    from histodd_fed.federation import slide_level

    one_thread()
    root = prepared.root
    t1 = time.perf_counter()
    model = pretrain_classifier(prepared.train, preset, seed)
    save_pretrained(model, root / "classifier", preset, prepared.train)
    baseline = patch_metrics(model, prepared.test)
    t2 = time.perf_counter()
    slides = prepared.slide_sets()
    if slides is not None:
        baseline.update(slide_level.pretrain(model, slides[0], slides[1], preset, seed, root))
    timing = {**prepared.info.get("timing", {}), "classifier": round(t2 - t1, 2),
              "mil": round(time.perf_counter() - t2, 2)}
    info = {**prepared.info, "baseline": baseline, "models": True, "timing": timing,
            "seconds": round(sum(timing.values()), 2)}
    atomic_write_json(root / "prepared.json", info)
    log.info("%s: models trained in %.1fs %s", root.name, time.perf_counter() - t1, timing)
    return replace(prepared, has_mil=(root / slide_level.MIL_DIR).exists(), info=info)


def save_pretrained(model, out: Path, preset: CentrePreset, train: PatchSet) -> Path:
    """Save a classifier :func:`pretrain_classifier` made from ``train`` (loadable by ``load_model``)."""
    from histodd_fed.training import save_model

    return save_model(model, out, arch=preset.classifier, num_classes=train.num_classes, image_size=preset.image_size,
                      arch_kwargs=dict(preset.classifier_kwargs), class_names=train.class_names)


def pretrain_classifier(train: PatchSet, preset: CentrePreset, seed: int):
    """The centre's classifier pre-trained on ``train`` by the preset's recipe (what prepare saves)."""
    from histodd_fed.training import build_seeded_model, train_classifier

    model = build_seeded_model(preset.classifier, seed=seed, num_classes=train.num_classes,
                               image_size=preset.image_size, **dict(preset.classifier_kwargs))
    return train_classifier(model, train, epochs=preset.pretrain_epochs, lr=preset.lr * 10,
                            batch_size=preset.batch_size, seed=seed, device="cpu", augmentation=preset.train_augmentation,
                            progress=False, desc="pre-train").model
