"""The synthetic sets one distil request makes, each distilled (cached, :func:`distil_cache.distil_cached`) and put
through the export gate (:func:`privacy_reports.sent_set_report`: the verdict on a set gated before is reused from
the centre's sealed record, :mod:`gate_verdicts`) - before anything is sealed.

A centre with slide data makes two parts per ipc: the patch-level set (best-of-K: its candidates fill
``workers`` processes, then one process chooses, checks and gates) and the per-slide set (one candidate, one
process). With ``workers`` > 1 the per-slide parts are made in a spawned process beside the patch-level parts, so
the second core is not idle while the patch set is chosen and gated. Every part is computed with one torch thread
either way: the sets, verdicts and reports equal a one-process run's (test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from histodd_fed.federation.centre_config import CentreConfig
from histodd_fed.federation.centre_data import Prepared
from histodd_fed.federation.distil_cache import DistilResult
from histodd_fed.federation.presets import CentrePreset
from histodd_fed.worker_pool import result_of, spawn_pool


@dataclass(frozen=True)
class Part:
    """One set a distil request asks for: ``ipc``, patch level or per slide."""

    ipc: int
    per_slide: bool

    @property
    def name(self) -> str:
        return f"ipc{self.ipc}-slides" if self.per_slide else f"ipc{self.ipc}"

    @property
    def kind(self) -> str:
        return "slides" if self.per_slide else "patch"


@dataclass
class MadeSet:
    """A part's set and the export gate's verdict on it (``report`` is what a bundle's manifest seals)."""

    result: DistilResult
    blocked: bool
    report: dict[str, Any]
    message: str


def make_part(cfg: CentreConfig, preset: CentrePreset, part: Part, seed: int, *,
              prepared: Prepared | None = None) -> MadeSet:
    """Distil (or read from the cache) one part and gate it against the centre's own real patches."""
    from histodd_fed.federation import centre_data, distil_cache, privacy_reports

    if prepared is None:  # in a worker process: the centre's data from its cache
        prepared = centre_data.prepare(cfg, preset, models=False)
    res = distil_cache.distil_cached(cfg, preset, prepared, ipc=part.ipc, seed=seed, per_slide=part.per_slide)
    blocked, report, message = privacy_reports.sent_set_report(res.patchset, prepared, cfg)
    return MadeSet(res, blocked, report, message)


def make_parts(cfg: CentreConfig, preset: CentrePreset, prepared: Prepared, parts: list[Part],
               seed: int) -> dict[Part, MadeSet]:
    """Every part's :class:`MadeSet`: per-slide parts in a spawned process beside the patch-level ones when
    ``cfg.workers`` > 1 and both kinds are asked for; otherwise one after the other here."""
    slide_parts = [p for p in parts if p.per_slide]
    patch_parts = [p for p in parts if not p.per_slide]
    if cfg.workers <= 1 or not slide_parts or not patch_parts:
        return {p: make_part(cfg, preset, p, seed, prepared=prepared) for p in parts}
    made: dict[Part, MadeSet] = {}
    with spawn_pool(1) as pool:
        futures = {p: pool.submit(make_part, cfg, preset, p, seed) for p in slide_parts}
        for p in patch_parts:
            made[p] = make_part(cfg, preset, p, seed, prepared=prepared)
        for p, f in futures.items():
            made[p] = result_of(f, f"distil {p.name}")
    return {p: made[p] for p in parts}
