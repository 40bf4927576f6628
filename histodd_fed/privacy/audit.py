"""The privacy audit of a synthetic (or coreset) patch set: memorisation + membership inference.

:func:`run_audit` compares a synthetic set with the real patches it was made from (and, when
given, held-out real patches) and returns an :class:`AuditReport`; with ``out_dir`` it also
writes

- ``audit.json``          full results (per-synthetic rows, ROC curves, config, summary)
- ``audit.md``            the human-readable report
- ``closest_pairs.png``   the closest synthetic/real pairs (synthetic | nearest real per metric)
- ``nn_distribution.png`` real-real nearest-neighbour distributions with the synthetic ones
- ``roc.png``             membership-inference ROC curves (when the attack ran)
- ``run_config.json``     the full config of the run

See ``docs/privacy.md`` for what the audit does and does not show (it is not differential privacy).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from histodd_fed.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from histodd_fed.errors import ConfigError, InputError
from histodd_fed.formation import decode_set, formation_factor, tiles
from histodd_fed.patchset import PatchSet
from histodd_fed.preprocess import ViewSpec, apply_view, audit_views, recorded_view, resize_to
from histodd_fed.privacy.classifier import TrainSpec
from histodd_fed.privacy.copies import CopyDetectorConfig, CopyReport, detect_copies
from histodd_fed.privacy.membership import MembershipConfig, MembershipResult, membership_audit
from histodd_fed.privacy.memorisation import MemorisationConfig, MemorisationResult, analyse_memorisation
from histodd_fed.privacy.risk import GateThresholds, find_risks
from histodd_fed.runconfig import to_jsonable, write_run_config

log = logging.getLogger(__name__)

AUDIT_FORMAT = "histodd-privacy-audit"
AUDIT_VERSION = 1


@dataclass
class AuditConfig:
    """Everything the audit and the export gate need (see ``configs/privacy.yaml``)."""

    seed: int = 0
    memorisation: MemorisationConfig = field(default_factory=MemorisationConfig)
    membership: MembershipConfig = field(default_factory=MembershipConfig)
    gate: GateThresholds = field(default_factory=GateThresholds)
    copies: CopyDetectorConfig = field(default_factory=CopyDetectorConfig)
    closest_pairs: int = 12
    num_threads: int | None = None
    real_patches: str | None = None      #: the gate's real patches when the caller gives none
    holdout_patches: str | None = None   #: the gate's held-out patches (enables the attack)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "privacy config") -> "AuditConfig":
        """Build from nested dicts (as in the YAML); unknown keys raise :class:`ConfigError`."""
        def build(kind, d: Any, path: str):
            if d is None:
                return kind()
            if not isinstance(d, dict):
                raise ConfigError(f"{where}: {path} must be a mapping, got {type(d).__name__}")
            known = {f.name for f in fields(kind)}
            unknown = sorted(set(d) - known)
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {unknown} in {path or 'top level'}; known: {sorted(known)}")
            return d

        top = dict(build(cls, data, "") if data is not None else {})
        mem = dict(build(MemorisationConfig, top.pop("memorisation", None) or {}, "memorisation"))
        enc = build(TrainSpec, mem.pop("encoder", None) or {}, "memorisation.encoder")
        mia = dict(build(MembershipConfig, top.pop("membership", None) or {}, "membership"))
        tgt = build(TrainSpec, mia.pop("target", None) or {}, "membership.target")
        if "fprs" in mia:
            mia["fprs"] = tuple(float(f) for f in mia["fprs"])
        gate = build(GateThresholds, top.pop("gate", None) or {}, "gate")
        copies = build(CopyDetectorConfig, top.pop("copies", None) or {}, "copies")
        try:
            cfg = cls(memorisation=MemorisationConfig(**mem, encoder=TrainSpec(**{**asdict(MemorisationConfig().encoder), **enc})),
                      membership=MembershipConfig(**mia, target=TrainSpec(**{**asdict(MembershipConfig().target), **tgt})),
                      gate=GateThresholds(**gate), copies=CopyDetectorConfig(**copies), **top)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        cfg.validate(where)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "AuditConfig":
        """Load ``path`` (YAML); top-level keyword ``overrides`` (e.g. ``seed=3``) win."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: unreadable privacy config ({exc})") from exc
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, where=str(path))

    def validate(self, where: str = "privacy config") -> None:
        m = self.memorisation
        if m.ssim_window < 3 or m.ssim_sigma <= 0:
            raise ConfigError(f"{where}: ssim_window must be >= 3 and ssim_sigma > 0")
        if m.ssim_candidates < 1 or m.reference_size < 2:
            raise ConfigError(f"{where}: ssim_candidates must be >= 1 and reference_size >= 2")
        if self.membership.max_per_side < 1 or not all(0 < f < 1 for f in self.membership.fprs):
            raise ConfigError(f"{where}: membership.max_per_side must be >= 1 and fprs in (0, 1)")
        self.copies.validate(f"{where}: copies")
        g = self.gate
        for name in ("l2_block_percentile", "structure_block_percentile"):
            v = getattr(g, name)
            if v is not None and not 0 < v < 100:
                raise ConfigError(f"{where}: gate.{name} must be in (0, 100)")
        if m.structure_pool < 1:
            raise ConfigError(f"{where}: memorisation.structure_pool must be >= 1")
        for spec, name in ((m.encoder, "memorisation.encoder"), (self.membership.target, "membership.target")):
            if spec.epochs < 0 or spec.lr <= 0 or spec.batch_size < 1:
                raise ConfigError(f"{where}: {name} needs epochs >= 0, lr > 0, batch_size >= 1")


@dataclass
class AuditReport:
    """Results of one audit; ``summary()`` is the small JSON that goes into a bundle manifest."""

    memorisation: MemorisationResult
    membership: MembershipResult | None
    config: AuditConfig
    synthetic_info: dict[str, Any]
    real_info: dict[str, Any]
    holdout_info: dict[str, Any] | None
    risks: list[str]
    files: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    #: the view of the real patches this report audited against (None: as given)
    view: dict[str, Any] | None = None
    #: with :func:`run_view_audits`: one summary per audited view (this report is the worst one)
    views: list[dict[str, Any]] = field(default_factory=list)
    #: the transform-invariant copy detector's findings (:mod:`histodd_fed.privacy.copies`), all views
    copies: CopyReport | None = None

    @property
    def flagged(self) -> bool:
        return bool(self.risks)

    def view_summary(self) -> dict[str, Any]:
        """One line of the per-view table: the view, the verdict and the gate's statistics."""
        mem = self.memorisation
        out: dict[str, Any] = {"view": self.view, "view_text": (ViewSpec.from_dict(self.view).describe()
                                                                if self.view else "as given"),
                               "flagged": self.flagged, "risks": list(self.risks)}
        for name in ("ssim", "l2", "structure"):
            if name in mem.metrics:
                out[name] = round(float(mem.metrics[name].summary()["closest_value"]), 6)
        out["membership_auc"] = None if self.membership is None else round(self.membership.max_auc, 4)
        return out

    def summary(self) -> dict[str, Any]:
        """Headline numbers only (a few hundred bytes of JSON)."""
        mem = self.memorisation
        out: dict[str, Any] = {
            "format": AUDIT_FORMAT, "version": AUDIT_VERSION, "seed": self.config.seed,
            "n_synthetic": mem.n_synthetic, "n_real": mem.n_real,
            "flagged": self.flagged, "risks": list(self.risks),
            "thresholds": asdict(self.config.gate),
        }
        for name, r in mem.metrics.items():
            s = r.summary()
            out[name] = {"closest_pair": [s["closest_synthetic"], s["closest_real"]], "closest": round(s["closest_value"], 6),
                         "median": round(s["median_value"], 6), "real_real_p1": round(s["reference_p1"], 6),
                         "fraction_below_p1": s["fraction_below_p1"], "fraction_below_p5": s["fraction_below_p5"]}
        if self.membership is not None:
            m = self.membership
            out["membership"] = {"n_per_side": m.n_members, "max_auc": round(m.max_auc, 4),
                                 **{n: {k: round(v, 4) for k, v in a.summary().items()} for n, a in m.attacks.items()}}
        else:
            out["membership"] = None
        out["view"] = self.view
        if self.views:
            out["views"] = list(self.views)
        if self.copies is not None:
            out["copies"] = self.copies.summary()
            out["copies"]["flagged_images"] = [{"synthetic": f.synthetic, "kind": f.kind, "r2": round(f.r2, 4),
                                                "sources": f.sources, "transform": f.transform, "view": f.view}
                                               for f in self.copies.flagged]
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything: summary, per-synthetic rows, ROC curves, inputs and config."""
        d: dict[str, Any] = {"summary": self.summary(), "synthetic": self.synthetic_info, "real": self.real_info,
                             "holdout": self.holdout_info, "memorisation": self.memorisation.summary(),
                             "per_synthetic": self.memorisation.per_synthetic(), "config": to_jsonable(self.config),
                             "files": self.files, "seconds": self.seconds}
        if self.copies is not None:
            d["copies"] = self.copies.to_dict()
        if self.membership is not None:
            d["membership"] = self.membership.summary()
            d["roc"] = {n: {"fpr": a.fpr.tolist(), "tpr": a.tpr.tolist()} for n, a in self.membership.attacks.items()}
        return to_jsonable(d)

    def to_markdown(self) -> str:
        """The human-readable report."""
        mem, mia, cfg = self.memorisation, self.membership, self.config
        lines = ["# Privacy audit", ""]
        lines += [f"- synthetic set: {self.synthetic_info.get('path') or '(in memory)'} - kind `{self.synthetic_info['kind']}`, "
                  f"{mem.n_synthetic} patches, method `{self.synthetic_info.get('method')}`",
                  f"- real (member) patches: {self.real_info.get('path') or '(in memory)'} - {mem.n_real} patches",
                  f"- held-out (non-member) patches: " + (f"{self.holdout_info.get('path') or '(in memory)'} - "
                                                          f"{self.holdout_info['n']} patches" if self.holdout_info else "none (no attack)"),
                  f"- seed {cfg.seed}; feature encoder: {mem.encoder}", ""]
        verdict = "**FLAGGED**" if self.flagged else "**passes**"
        lines += [f"## Verdict: {verdict}", ""]
        lines += [f"- {r}" for r in self.risks] or ["- no rule fired"]
        if self.views:
            lines += ["", "Real patches audited in every plausible view of the set (the worst decides; this "
                      "report details the worst):", "", "| view | verdict | max SSIM | min L2 | max structure | "
                      "attack AUC |", "|---|---|---|---|---|---|"]
            for v in self.views:
                def f(x):
                    return "-" if x is None else f"{x:.4f}"
                lines.append(f"| {v['view_text']} | {'FLAGGED' if v['flagged'] else 'passes'} | {f(v.get('ssim'))} | "
                             f"{f(v.get('l2'))} | {f(v.get('structure'))} | {f(v.get('membership_auc'))} |")
        elif self.view:
            lines += ["", f"Real patches audited in the set's view: {ViewSpec.from_dict(self.view).describe()}."]
        g = cfg.gate
        rules = [f"SSIM >= {g.ssim_block}" if g.ssim_block is not None else "",
                 (f"normalised L2 below the real-real p{g.l2_block_percentile:g}"
                  + (f" and squared <= {g.l2_unique_ratio:g}x that to the {cfg.memorisation.uniqueness_rank}th-nearest "
                     "distinct real patch" if g.l2_unique_ratio is not None else ""))
                 if g.l2_block_percentile is not None else "",
                 f"structure correlation above the real-real p{100 - g.structure_block_percentile:g}"
                 if g.structure_block_percentile is not None else "",
                 f"attack AUC > {g.auc_block}" if g.auc_block is not None else ""]
        lines += ["", "Rules: " + ("; ".join(r for r in rules if r) or "none (all disabled)") + ".", ""]
        lines += ["## Memorisation (nearest real patch of each synthetic patch)", "",
                  "| metric | closest pair (syn, real) | closest | median syn NN | real-real closest 1% | real-real closest 5% | "
                  "real-real median | syn closer than 1% | syn closer than 5% |", "|---|---|---|---|---|---|---|---|---|"]
        for name, r in mem.metrics.items():
            s = r.summary()
            arrow = "higher = closer" if r.higher_is_closer else "lower = closer"
            lines.append(f"| {name} ({arrow}) | ({s['closest_synthetic']}, {s['closest_real']}) | {s['closest_value']:.4f} | "
                         f"{s['median_value']:.4f} | {s['reference_p1']:.4f} | {s['reference_p5']:.4f} | "
                         f"{s['reference_median']:.4f} | {s['fraction_below_p1']:.2f} | {s['fraction_below_p5']:.2f} |")
        lines += ["", f"Real-real reference: {len(mem.reference_indices)} real patches, each against all {mem.n_real} "
                      "others. Percentiles below are the share of real-real NN values at least as close (midrank); "
                      "0 = closer than any two real patches.", ""]
        cols = list(mem.metrics)
        head = "| syn | label |" + (" init |" if mem.init_indices is not None else "") + \
               "".join(f" {c} NN | {c} | {c} pct |" + (f" {c} to init |" if mem.init_indices is not None else "") for c in cols)
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        labels = self.synthetic_info.get("labels", [])
        for row in mem.per_synthetic():
            s = row["synthetic"]
            cells = [str(s), str(labels[s]) if s < len(labels) else ""]
            if mem.init_indices is not None:
                cells.append(str(row["init_index"]))
            for c in cols:
                cells += [str(row[f"{c}_nn_index"]), f"{row[f'{c}_nn_value']:.4f}", f"{row[f'{c}_percentile']:.1f}"]
                if mem.init_indices is not None:
                    cells.append(f"{row[f'{c}_init_value']:.4f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if "closest_pairs" in self.files:
            lines += [f"![closest pairs]({self.files['closest_pairs']})", ""]
        if "nn_distribution" in self.files:
            lines += [f"![nearest-neighbour distributions]({self.files['nn_distribution']})", ""]
        if self.copies is not None:
            c = self.copies
            lines += ["## Copy detector (transform-invariant)", "",
                      f"Each synthetic image's best explanation by one real patch (any dihedral transform, any position "
                      f"inside the raw patch, an affine RGB colour map) or a pixel mixture of up to {c.config.max_mix}; "
                      f"flagged at R^2 >= {c.threshold:g}. {c.n_real} real patches, views: {', '.join(c.views)}; "
                      f"{c.seconds:.1f} s.", "",
                      "| syn | kind | R^2 | copy R^2 | mixture R^2 (1..k) | sources | transform | flagged |",
                      "|---|---|---|---|---|---|---|---|"]
            for f in c.findings:
                lines.append(f"| {f.synthetic} | {f.kind} | {f.r2:.3f} | {f.copy_r2:.3f} | "
                             f"{', '.join(f'{v:.2f}' for v in f.mixture_r2)} | "
                             f"{', '.join(str(x) for x in f.sources)} | {f.transform} | {'**yes**' if f.flagged else 'no'} |")
            lines.append("")
        lines += ["## Membership inference", ""]
        if mia is None:
            lines += ["Not run (no held-out real patches given, or disabled).", ""]
        else:
            lines += [f"Target: {mia.target}. {mia.n_members} members vs {mia.n_nonmembers} non-members "
                      f"(FPR resolution {1 / max(1, mia.n_nonmembers):.4f}). Target accuracy: members "
                      f"{mia.member_accuracy:.3f}, non-members {mia.nonmember_accuracy:.3f}.", "",
                      "| attack | ROC AUC | " + " | ".join(f"TPR @ {k} FPR" for k in next(iter(mia.attacks.values())).tpr_at_fpr) + " |",
                      "|---|---|" + "---|" * len(next(iter(mia.attacks.values())).tpr_at_fpr)]
            for n, a in mia.attacks.items():
                lines.append(f"| {n} | {a.auc:.4f} | " + " | ".join(f"{v:.4f}" for v in a.tpr_at_fpr.values()) + " |")
            lines.append("")
            if "roc" in self.files:
                lines += [f"![ROC]({self.files['roc']})", ""]
        lines += ["This audit is empirical evidence about these patches and these attacks, not a privacy guarantee "
                  "(it is not differential privacy); see docs/privacy.md.", ""]
        return "\n".join(lines)

    def write(self, out_dir: str | Path, synthetic: PatchSet, real: PatchSet) -> Path:
        """Write JSON, Markdown and PNGs into ``out_dir`` (each file atomically)."""
        from histodd_fed.privacy.figures import closest_pairs_png, nn_distribution_png, roc_png

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "closest_pairs.png", closest_pairs_png(self.memorisation, synthetic, real, self.config.closest_pairs))
        self.files["closest_pairs"] = "closest_pairs.png"
        atomic_write_bytes(out / "nn_distribution.png", nn_distribution_png(self.memorisation))
        self.files["nn_distribution"] = "nn_distribution.png"
        if self.membership is not None:
            atomic_write_bytes(out / "roc.png", roc_png(self.membership))
            self.files["roc"] = "roc.png"
        self.files.update({"json": "audit.json", "markdown": "audit.md"})
        atomic_write_json(out / "audit.json", {"format": AUDIT_FORMAT, "version": AUDIT_VERSION, **self.to_dict()})
        atomic_write_text(out / "audit.md", self.to_markdown())
        write_run_config(out, "privacy audit", {"audit": self.config, "synthetic": self.synthetic_info.get("path"),
                                                 "real": self.real_info.get("path"),
                                                 "holdout": (self.holdout_info or {}).get("path")})
        return out


def _info(ps: PatchSet, path: str | None, labels: bool = False) -> dict[str, Any]:
    info = {"path": path, "kind": ps.kind, "n": len(ps), "image_size": ps.image_size, "class_counts": ps.class_counts(),
            "method": ps.meta.get("method")}
    if labels:
        info["labels"] = [ps.class_names[int(c)] for c in ps.labels]
    return info


def run_audit(synthetic: PatchSet, real: PatchSet, holdout: PatchSet | None, config: AuditConfig | None = None,
              out_dir: str | Path | None = None, *, encoder=None, paths: dict[str, str] | None = None) -> AuditReport:
    """Audit ``synthetic`` against the ``real`` patches it came from (members) and ``holdout`` (non-members).

    ``encoder``: the centre's patch encoder (an ``nn.Module`` with ``features``); without it a
    ``config.memorisation.encoder`` model is trained briefly on ``real``. ``paths`` (keys
    ``synthetic``, ``real``, ``holdout``) only label the report. Real and held-out patches must be
    in the synthetic set's view already (:func:`run_view_audits` puts them there); patches of another
    size are resized to the synthetic size (:func:`histodd_fed.preprocess.resize_to`, a legacy fallback).
    """
    import torch

    cfg = config or AuditConfig()
    cfg.validate()
    paths = paths or {}
    synthetic = decode_set(synthetic)   # a multi-formation set is audited as the images it trains
    if len(synthetic) == 0:
        raise InputError(f"{paths.get('synthetic', 'synthetic set')}: no patches to audit")
    if len(real) < 2:
        raise InputError(f"{paths.get('real', 'real patches')}: need at least 2 real patches, got {len(real)}")
    for other, key in ((real, "real"), (holdout, "holdout")):
        if other is not None and list(other.class_names) != list(synthetic.class_names):
            raise InputError(f"{paths.get(key, key + ' patches')}: classes {other.class_names} differ from the synthetic "
                             f"set's {synthetic.class_names}")
    size = synthetic.image_size
    if real.image_size != size:
        log.info("resizing real patches %d -> %d px to match the synthetic set", real.image_size, size)
    real_r = resize_to(real, size)
    hold_r = None if holdout is None else resize_to(holdout, size)
    prev_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    seconds: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        mem = analyse_memorisation(synthetic, real_r, cfg.memorisation, encoder=encoder, seed=cfg.seed)
        seconds["memorisation"] = round(time.perf_counter() - t0, 3)
        mia = None
        if cfg.membership.enabled and hold_r is not None and len(hold_r):
            t0 = time.perf_counter()
            mia = membership_audit(synthetic, real_r, hold_r, cfg.membership, seed=cfg.seed)
            seconds["membership"] = round(time.perf_counter() - t0, 3)
    finally:
        torch.set_num_threads(prev_threads)
    report = AuditReport(mem, mia, cfg, _info(synthetic, paths.get("synthetic"), labels=True), _info(real, paths.get("real")),
                         None if holdout is None else _info(holdout, paths.get("holdout")),
                         find_risks(mem, mia, cfg.gate), seconds=seconds,
                         view=recorded_view(real_r).to_dict() if recorded_view(real_r) else None)
    if out_dir is not None:
        report.write(out_dir, synthetic, real_r)
    return report


# ---------------------------------------------------------------------------- views
def _severity(report: AuditReport) -> tuple:
    mem = report.memorisation.metrics
    ssim = float(mem["ssim"].summary()["closest_value"]) if "ssim" in mem else 0.0
    st = float(mem["structure"].summary()["closest_value"]) if "structure" in mem else 0.0
    return (len(report.risks), ssim, st)


def audit_inputs(synthetic: PatchSet, real: PatchSet, holdout: PatchSet | None = None,
                 paths: dict[str, str] | None = None) -> list[tuple[ViewSpec | None, PatchSet, PatchSet | None]]:
    """The (view, real, holdout) triples ``synthetic`` must be audited against.

    Raw real patches (no view recorded) are put in every view of
    :func:`histodd_fed.preprocess.audit_views`: the set's recorded view, and the other plausible view
    of its size (resize only / centre crop), so a set distilled from centre crops cannot pass
    because the gate looked at downscaled patches. Real patches already in a view are used as they
    are when that is the set's view; otherwise (another view, or raw patches of another size than the
    set was made from) an :class:`InputError` says which patches to give.
    """
    paths = paths or {}
    where = paths.get("real") or "real patches"
    spec = recorded_view(synthetic)
    if spec is not None and spec.out_size != synthetic.image_size:
        raise InputError(f"{paths.get('synthetic') or 'synthetic set'}: records view {spec.describe()} but its "
                         f"patches are {synthetic.image_size} px")
    have = recorded_view(real)
    if have is not None and not have.is_identity:
        # the same crop of the same patches: resizing them to the set's size is the set's view (a
        # multi-formation set's tiles are smaller than the view their real patches were given in)
        same = spec is not None and (have.source_size, have.crop or have.source_size) == (
            spec.source_size, spec.crop or spec.source_size) and have.out_size >= spec.out_size
        if not same and (spec is not None and not spec.is_identity):
            raise InputError(f"{where}: patches are in view {have.describe()}, the set was made from "
                             f"{spec.describe()}; give the raw {spec.source_size}-px patches it came from")
        size = synthetic.image_size
        return [(recorded_view(resize_to(real, size)), resize_to(real, size),
                 None if holdout is None else resize_to(holdout, size))]
    if spec is not None and not spec.is_identity and real.image_size != spec.source_size:
        raise InputError(f"{where}: patches are {real.image_size} px; the set was made from {spec.describe()}; "
                         f"give the raw {spec.source_size}-px patches it came from")
    out = []
    for v in audit_views(spec, real.image_size, synthetic.image_size):
        hold_v = None
        if holdout is not None:
            hv = recorded_view(holdout)
            if hv is not None and not hv.is_identity:
                same = (hv.source_size, hv.crop, hv.out_size) == (v.source_size, v.crop, v.out_size)
                hold_v = holdout if same else None  # held out in another view: no attack in this one
            elif holdout.image_size == v.source_size:
                hold_v = apply_view(holdout, v)
            else:
                raise InputError(f"{paths.get('holdout') or 'held-out patches'}: patches are {holdout.image_size} "
                                 f"px, the real ones {v.source_size} px; give both raw")
        out.append((v, apply_view(real, v), hold_v))
    return out


def run_view_audits(synthetic: PatchSet, real: PatchSet, holdout: PatchSet | None, config: AuditConfig | None = None,
                    out_dir: str | Path | None = None, *, encoder=None,
                    paths: dict[str, str] | None = None, copies: bool = True) -> AuditReport:
    """:func:`run_audit` in every view of :func:`audit_inputs`; the worst report, with ``views`` set.

    The worst view decides: a rule that fires in any view flags the set (its reasons carry the view
    when more than one was audited). ``out_dir`` receives the worst view's report. With ``copies`` (and
    ``config.copies.enabled``) the copy detector (:func:`copy_audit`) runs too and its flagged images
    join the risks, one line each.
    """
    # a multi-formation set (histodd_fed.formation) is audited twice: as the decoded training images, and
    # as its small tiles against the real patches downscaled to the tiles' size (where a tile that copies a
    # real patch at low resolution shows; upsampling blurs it out of the full-size comparison)
    candidates = [decode_set(synthetic)] + ([tiles(synthetic)] if formation_factor(synthetic) > 1 else [])
    triples = [(syn_c, v, real_v, hold_v) for syn_c in candidates
               for v, real_v, hold_v in audit_inputs(syn_c, real, holdout, paths)]
    reports = []
    for syn_c, v, real_v, hold_v in triples:
        if len(triples) > 1:
            log.info("auditing against the real patches in view %s", "as given" if v is None else v.describe())
        rep = run_audit(syn_c, real_v, hold_v, config, encoder=encoder, paths=paths)
        rep.view = None if v is None else v.to_dict()
        reports.append(rep)
    worst_i = max(range(len(reports)), key=lambda i: _severity(reports[i]))
    worst = reports[worst_i]
    if len(reports) > 1:
        worst.views = [r.view_summary() for r in reports]
        tagged = []
        for i in [worst_i] + [j for j in range(len(reports)) if j != worst_i]:
            text = reports[i].view_summary()["view_text"]
            tagged += [f"{r} [real patches as {text}]" for r in reports[i].risks]
        worst.risks = tagged
    cfg = config or AuditConfig()
    if copies and cfg.copies.enabled:
        worst.copies = copy_audit(synthetic, real, cfg, num_threads=cfg.num_threads)
        worst.risks = list(worst.risks) + worst.copies.reasons()
    if out_dir is not None:
        worst.write(out_dir, triples[worst_i][0], triples[worst_i][2])
    return worst


def copy_audit(synthetic: PatchSet, real: PatchSet, config: AuditConfig | None = None, *,
               num_threads: int | None = None) -> CopyReport:
    """The copy detector on ``synthetic`` (decoded) against ``real``: raw patches are searched in every view of
    :func:`histodd_fed.preprocess.audit_views` (windows anywhere inside the raw patch at each view's scale);
    patches already in a view are searched as they are."""
    cfg = config or AuditConfig()
    syn = decode_set(synthetic)
    have = recorded_view(real)
    if have is not None and not have.is_identity:
        ref = resize_to(real, syn.image_size)
        views: list[ViewSpec | None] = [None]
    else:
        ref = real
        views = list(audit_views(recorded_view(syn), real.image_size, syn.image_size))
    if list(ref.class_names) != list(syn.class_names):
        raise InputError(f"real patches: classes {ref.class_names} differ from the synthetic set's {syn.class_names}")
    return detect_copies(syn.images, ref.images, views, cfg.copies, num_threads=num_threads)
