"""The recipe of a released set, rebuilt from its meta: ``make_set(real, seed) -> PatchSet``.

An attack that re-runs the recipe on other data (LiRA's shadow sets, :mod:`histodd_fed.privacy.lira`)
needs the recipe as a function. The privacy layer must not import the distillation, so the function
is built here, above both, and injected:

- a distilled set (``meta["method"]`` ``histo-dd`` or ``dm-dp``) records its whole ``DistillConfig`` in
  ``meta["config"]`` (a best-of-K run: the run's config, ``candidates`` > 1); the recipe is that config
  with only the seed changed, run by :func:`histodd_fed.distill.run_distillation` (which does best-of-K,
  the gate-aware choice and DP exactly as the original run did, on the patches it is given);
- a coreset (``kind == "coreset"``, ``meta["method"]`` random / herding / forgetting) records its
  ``CoresetConfig`` (``meta["config"]``; at least method and ipc); the recipe is the same method.

Sets without such a record (a real store, a set from elsewhere) are refused with one line. The
recipe works on patches in the set's view: :func:`in_set_view` puts raw patches there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from histodd_fed.errors import HistoddError, InputError
from histodd_fed.patchset import PatchSet

#: methods whose ``meta["config"]`` is a DistillConfig that ``run_distillation`` re-runs as recorded (dm-dp:
#: the DP distribution matching, ``dp_epsilon`` > 0; its noise is drawn from OS entropy, so shadows differ
#: from run to run even for a seed). Not ``dm-nodp``: that no-noise control is not reachable from a config.
DISTILL_METHODS = ("histo-dd", "dm", "histo-dd-dp", "dm-dp")
CORESET_METHODS = ("random", "herding", "forgetting")


@dataclass(frozen=True)
class Recipe:
    """A callable ``(real patches, seed) -> released set`` rebuilt from a set's recorded recipe."""

    kind: str                        #: "distill" or "coreset"
    method: str                      #: histo-dd | dm | histo-dd-dp | dm-dp | random | herding | forgetting
    config: dict[str, Any]           #: the recorded config with ``overrides`` applied (seed: per call)
    overrides: dict[str, Any] = field(default_factory=dict)
    progress: bool = False           #: inner progress bars of the distillation / coreset network

    def __call__(self, real: PatchSet, seed: int) -> PatchSet:
        if self.kind == "distill":
            from histodd_fed.distill import run_distillation

            return run_distillation(real, self.distill_config(seed), work_dir=None, progress=self.progress).patchset
        from histodd_fed.coreset import build_coreset

        return build_coreset(real, self.coreset_config(seed), progress=self.progress)

    def distill_config(self, seed: int):
        """The ``DistillConfig`` of one run (the recorded one, seed ``seed``)."""
        from histodd_fed.distill import DistillConfig

        return DistillConfig.from_dict({**self.config, "seed": int(seed)}, where="recorded distill config")

    def coreset_config(self, seed: int):
        """The ``CoresetConfig`` of one run (the recorded one, seed ``seed``)."""
        from histodd_fed.coreset import CoresetConfig

        return CoresetConfig(**{**self.config, "seed": int(seed)})

    def describe(self) -> str:
        c = self.config
        if self.kind == "coreset":
            text = f"coreset {self.method}, ipc {c.get('ipc')}"
        else:
            text = (f"{self.method} {c.get('objective', 'gradient')} matching, {c.get('model')}, ipc {c.get('ipc')}, "
                    f"init {c.get('init')}, {c.get('outer_steps')}x{c.get('inner_steps')} steps, "
                    f"candidates {c.get('candidates', 1)}" + (f", dp_noise {c['dp_noise']}" if c.get("dp_noise") else "")
                    + (f", DP epsilon {c['dp_epsilon']}" if c.get("dp_epsilon") else ""))
        if self.overrides:
            text += " (overridden: " + ", ".join(f"{k}={v}" for k, v in self.overrides.items()) + ")"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "method": self.method, "config": dict(self.config),
                "overrides": dict(self.overrides), "description": self.describe()}


def recipe_from_set(set_or_meta: PatchSet | dict[str, Any], *, overrides: dict[str, Any] | None = None,
                    where: str = "synthetic set", progress: bool = False) -> Recipe:
    """The recipe recorded in a set (a PatchSet or its ``meta``), with ``overrides`` (config fields, e.g.
    ``{"candidates": 1}``) applied; :class:`InputError` (one line) when the set records none."""
    if isinstance(set_or_meta, PatchSet):
        meta, kind = set_or_meta.meta, set_or_meta.kind
    else:
        meta, kind = set_or_meta, None
    meta = meta or {}
    method = meta.get("method")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "seed" in overrides:
        raise InputError("recipe overrides: the seed is chosen per run, not overridden")
    if method in DISTILL_METHODS and isinstance(meta.get("config"), dict):
        cfg = {**meta["config"], **overrides}
        if cfg.get("per_slide"):
            raise InputError(f"{where}: a per-slide set's recipe needs slides; re-running it on a patch pool "
                             "is not supported")
        cfg.pop("seed", None)
        if str(cfg.get("device", "auto")).startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                cfg["device"] = "auto"     # not part of the result (DistillConfig NON_RESULT_FIELDS)
        recipe = Recipe("distill", str(method), cfg, overrides, progress)
        try:
            recipe.distill_config(0)
        except HistoddError as exc:
            raise InputError(f"{where}: its recorded distill config cannot be rebuilt ({exc})") from exc
        return recipe
    if method in CORESET_METHODS and (kind in (None, "coreset")) and meta.get("ipc") is not None:
        from histodd_fed.coreset import CoresetConfig

        recorded = meta.get("config") if isinstance(meta.get("config"), dict) else {"method": method,
                                                                                   "ipc": meta["ipc"]}
        cfg = {**recorded, **overrides}
        cfg.pop("seed", None)
        known = {f.name for f in dataclasses.fields(CoresetConfig)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise InputError(f"{where}: its recorded coreset config has unknown option(s) {unknown}")
        recipe = Recipe("coreset", str(method), cfg, overrides, progress)
        try:
            recipe.coreset_config(0).validate()
        except HistoddError as exc:
            raise InputError(f"{where}: its recorded coreset config cannot be rebuilt ({exc})") from exc
        return recipe
    raise InputError(f"{where}: records no recipe to re-run (meta method {method!r}, kind {kind!r}); LiRA needs a "
                     f"set made by `centre-node distill` or `centre-node coreset`")


def in_set_view(released: PatchSet, patches: PatchSet, where: str = "patches") -> PatchSet:
    """``patches`` (raw, as on disk, or already in the set's view) in the view ``released`` was made in:
    its recorded ``meta["view"]``; a set without one gets the patches resized to its size."""
    from histodd_fed.preprocess import recorded_view, resize_to, to_view

    view = recorded_view(released)
    out = resize_to(patches, released.image_size) if view is None else to_view(patches, view, where=where)
    if out.image_size != released.image_size:
        raise InputError(f"{where}: {out.image_size} px in the set's view, the set is {released.image_size} px")
    return out
