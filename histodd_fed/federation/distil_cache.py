"""The sets a centre makes to send, cached under its work directory by config hash:

- ``synthetic/<hash>/``  distilled patch sets (one per distillation config: patch-level or per-slide)
- ``coresets/<hash>/``   coresets of REAL train patches (random / herding / forgetting; benchmark baselines)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histodd_fed.errors import ConfigError
from histodd_fed.federation.centre_config import CentreConfig
from histodd_fed.federation.centre_data import Prepared, one_thread
from histodd_fed.federation.presets import CentrePreset
from histodd_fed.patchset import PatchSet
from histodd_fed.runconfig import config_hash, write_run_config

REPO_ROOT = Path(__file__).resolve().parents[2]


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
    class per train slide of the centre's slide data (:meth:`Prepared.slide_sets`: its separate pseudo-slide
    set when it has one), keeping the slide table (slide_index / slide_ids / slide_labels) for MIL; one
    candidate (best-of-K selection is for patch-level sets). The hash covers the slide data through
    ``prepared.config_hash``.
    """
    from histodd_fed.distill import distill
    from histodd_fed.distill.config import DistillConfig

    overrides = dict(preset.distill_overrides)
    overrides.update(ipc=int(ipc), seed=int(seed))
    if int(ipc) in dict(preset.outer_steps_by_ipc):  # K scales with ipc (paper: 200 / 500 / 1000)
        overrides["outer_steps"] = int(dict(preset.outer_steps_by_ipc)[int(ipc)])
    overrides.update(extra_overrides or {})  # a study variant (e.g. another matching augmentation)
    if per_slide:  # one candidate: best-of-K is patch level only (a config that has candidates: 1 keeps its hash)
        overrides.update(ipc=int(preset.slide_ipc), per_slide=True, slide_outer_steps=int(preset.slide_outer_steps),
                         candidates=1)
    dcfg = DistillConfig.from_yaml(_distill_config_path(preset), **overrides)
    slides = prepared.slide_sets() if per_slide else None
    if per_slide and slides is None:
        raise ConfigError("per-slide distillation: this centre has no slide data")
    h = config_hash({"distill": dcfg.cache_dict(), "real": prepared.config_hash})
    out = cfg.work_dir / "synthetic" / h[:16]
    if (out / "patchset.json").exists():
        return DistilResult(PatchSet.load(out), h, True, 0.0)
    one_thread()
    t0 = time.perf_counter()
    from histodd_fed.release.choose import candidate_check

    real = slides[0] if slides is not None else prepared.train  # the slide set: the centre's pseudo-slides if any
    syn = distill(real, dcfg, work_dir=cfg.work_dir / "distill-work" / h[:16], progress=False, workers=cfg.workers,
                  candidate_check=candidate_check(prepared.gate_reference()) if dcfg.candidate_gate else None)
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
    one_thread()
    t0 = time.perf_counter()
    ps = build_coreset(prepared.train, ccfg, progress=False)
    ps.save(out)
    write_run_config(out, "federation.coreset", key)
    return DistilResult(ps, h, False, round(time.perf_counter() - t0, 2))
