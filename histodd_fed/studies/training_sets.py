"""Building (and caching) the training sets a study compares: coresets, Histo-DD sets, the full set.

Every built set is saved under ``<out>/sets/<method>-ipc<N>[-<tag>]/`` as a PatchSet directory, so
the study's inputs can be inspected; a later run with the same data and options reuses it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from histodd_fed.errors import ConfigError
from histodd_fed.patchset import PatchSet
from histodd_fed.runconfig import config_hash
from histodd_fed.studies.presets import StudyPreset

log = logging.getLogger(__name__)

COMPRESSED_METHODS = ("random", "herding", "forgetting", "histodd", "histodd_herding")
ALL_METHODS = COMPRESSED_METHODS + ("full",)
#: ``histodd_herding`` is an extra option, not the paper's: Histo-DD started from the herding coreset
#: (the same feature net and options as the Herding row) instead of random real patches.
METHOD_LABELS = {"random": "Random", "herding": "Herding", "forgetting": "Forgetting", "histodd": "Histo-DD",
                 "histodd_herding": "Histo-DD (herding init)", "full": "Full"}


@dataclass
class StudyData:
    """The real training set and the test set of a study, already resized and capped."""

    train: PatchSet
    test: PatchSet
    fingerprint: str  # identifies the data (for set caching)


def check_methods(methods: list[str]) -> None:
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise ConfigError(f"unknown method(s) {bad}; known: {', '.join(ALL_METHODS)}")


def distill_config(preset: StudyPreset, ipc: int, augmentation: str | None = None, herding_init: bool = False):
    """The ``DistillConfig`` of the preset for ``ipc`` (and an optional augmentation strategy).

    ``herding_init``: start from the herding coreset, picked with the preset's coreset options and
    batch size (so the initial images are the Herding row's set).
    """
    try:
        from histodd_fed.distill.config import DistillConfig
    except ImportError as exc:  # pragma: no cover - distill is part of the package
        raise ConfigError(f"method histodd needs histodd_fed.distill ({exc})") from exc
    overrides = {"ipc": ipc, "image_size": preset.image_size, "seed": preset.seed, "device": preset.device}
    if ipc in preset.outer_steps_by_ipc:   # K scales with ipc (the paper: 200 / 500 / 1000 for 10 / 20 / 50)
        overrides["outer_steps"] = int(preset.outer_steps_by_ipc[ipc])
    if augmentation is not None:
        overrides["augmentation"] = augmentation
    if herding_init:
        from histodd_fed.coreset import CoresetConfig
        from histodd_fed.distill.config import INIT_CORESET_KEYS

        herding_row = CoresetConfig(**{"batch_size": preset.eval.batch_size, **preset.coreset})
        overrides["init"] = "herding"
        overrides["init_coreset"] = {k: getattr(herding_row, k) for k in INIT_CORESET_KEYS}
    if preset.distill_config:
        from histodd_fed.studies.presets import CONFIG_DIR

        path = Path(preset.distill_config)
        path = path if path.is_absolute() or path.exists() else CONFIG_DIR.parent / path
        return DistillConfig.from_yaml(path, **{**dict(preset.distill), **overrides})
    return DistillConfig.from_dict(dict(preset.distill), where=f"preset {preset.name} distill", **overrides)


def _key(method: str, ipc: int, options: dict, fingerprint: str) -> str:
    return config_hash({"method": method, "ipc": ipc, "options": options, "data": fingerprint})[:16]


def build_set(method: str, ipc: int, data: StudyData, preset: StudyPreset, out_dir: Path, *,
              augmentation: str | None = None, tag: str = "", progress: bool = True) -> PatchSet:
    """The training set of ``method`` at ``ipc`` images per class (``full`` ignores ipc)."""
    check_methods([method])
    if method == "full":
        return data.train
    if method in ("histodd", "histodd_herding"):
        cfg = distill_config(preset, ipc, augmentation, herding_init=method == "histodd_herding")
        options = cfg.result_dict()
    else:
        from histodd_fed.coreset import CoresetConfig

        ccfg = CoresetConfig(**{"batch_size": preset.eval.batch_size, "device": preset.device, **preset.coreset,
                                "method": method, "ipc": ipc, "seed": preset.seed})
        options = ccfg.__dict__
    key = _key(method, ipc, options, data.fingerprint)
    name = f"{method}-ipc{ipc}" + (f"-{tag}" if tag else "")
    set_dir = out_dir / "sets" / name
    if (set_dir / "patchset.json").exists():
        cached = PatchSet.load(set_dir)
        if cached.meta.get("study_key") == key:
            log.info("reusing %s", set_dir)
            return cached
    local_drift = None
    if method in ("histodd", "histodd_herding"):
        from histodd_fed.distill import run_distillation

        res = run_distillation(data.train, cfg, work_dir=out_dir / "distill-work", progress=progress)
        local_drift = res.drift_local
        ps = res.patchset
        initial = PatchSet(images=res.initial_images, labels=ps.labels.copy(), class_names=ps.class_names,
                           kind="real", meta={"role": "initialisation of " + name})
        initial.save(out_dir / "sets" / f"{name}-initial")
    else:
        from histodd_fed.coreset import build_coreset

        ps = build_coreset(data.train, ccfg, progress=progress)
    ps.meta = {**ps.meta, "study_key": key, "study_method": method, "ipc": ipc}
    ps.save(set_dir)
    if local_drift is not None:   # per-image drift (to real patches): next to the set, never in its meta
        from histodd_fed.atomic import atomic_write_json

        atomic_write_json(set_dir / "drift.json", local_drift)
    return ps
