"""The export gate: audit a synthetic set before it leaves the centre, block risky exports.

``centre-node bundle export`` calls :func:`check_export` before sealing. The gate runs the
privacy audit (:func:`histodd_fed.privacy.audit.run_audit`) against the centre's real patches and
applies the rules of :mod:`histodd_fed.privacy.risk` (SSIM >= 0.95 to a real patch; normalised L2
below the real-real 1st percentile; membership-attack AUC > 0.6 when held-out patches are known).

- No rule fires: the export passes; the audit summary goes into the bundle manifest.
- A rule fires and ``accept_risk`` is false: :class:`PrivacyRiskError` (one line naming the
  closest pair and the threshold); nothing is exported.
- A rule fires and ``accept_risk`` is true (``--accept-privacy-risk``): the export goes ahead and
  the manifest's privacy report carries ``accepted_risk: true`` and the reasons.

The audit sees the real patches in the set's recorded view (``meta["view"]``: the centre crop and
resize it was distilled or selected from) and in the other plausible view of its size (resize only
/ centre crop; both for legacy sets without a recorded view): the worst view decides, and the
manifest's summary lists every view (``views``). Real patches that cannot be put in the set's view
(already cropped otherwise, another patch size) raise ``InputError``.

The reference comes only from the centre's own data: ``real`` / ``real_dir`` (``--patches``, the node's
data), else ``real_patches`` in the centre's privacy config - never from a path recorded in the set's
meta (a sender could point it at a decoy). No reference, no export: the gate refuses, and
``--accept-privacy-risk`` does not override that.

Two groups of rules (docs/privacy.md, "Which rules are independent"): the *calibrated* rules of
:mod:`histodd_fed.privacy.risk` (SSIM, L2 and structure against the real-real distribution; the
membership threshold attack), which the distillation's privacy term and the gate-aware candidate
choice may read (``independent_rules=False``), and the *independent* rule, the transform-invariant
copy detector (:mod:`histodd_fed.privacy.copies`), which neither reads. The export decision applies
both; ``distill`` reports the same full decision for the set it writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histodd_fed.errors import HistoddError, InputError
from histodd_fed.patchset import PatchSet, load_image_folder

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "privacy.yaml"


class PrivacyRiskError(HistoddError):
    """The export gate refused a synthetic set; ``decision`` holds the details."""

    def __init__(self, message: str, decision: "GateDecision | None" = None) -> None:
        super().__init__(message)
        self.decision = decision


@dataclass
class GateDecision:
    """The gate's verdict. ``passed``: no rule fired. ``blocked``: the export must not happen."""

    passed: bool
    accepted_risk: bool
    reasons: list[str]
    summary: dict[str, Any]
    audited: bool = True
    override_requested: bool = False
    report: Any = field(default=None, repr=False)

    @property
    def blocked(self) -> bool:
        return not self.passed and not self.accepted_risk

    def message(self) -> str:
        """One line: the first reason, how many more, and the override."""
        if self.passed:
            return "privacy gate: passed"
        more = f" (+{len(self.reasons) - 1} more rule(s))" if len(self.reasons) > 1 else ""
        head = "privacy risk accepted (--accept-privacy-risk): " if self.accepted_risk else "export blocked by the privacy gate: "
        tail = "" if self.accepted_risk or not self.audited else (
            "; re-run with --accept-privacy-risk to export anyway (recorded in the manifest)")
        return f"{head}{self.reasons[0]}{more}{tail}"

    def to_dict(self) -> dict[str, Any]:
        """The privacy report sealed into the bundle manifest."""
        return {"gate": {"passed": self.passed, "blocked": self.blocked, "accepted_risk": self.accepted_risk,
                         "audited": self.audited, "override_requested": self.override_requested,
                         "reasons": list(self.reasons)},
                **self.summary, "accepted_risk": self.accepted_risk}


def _load_real(path: Path) -> PatchSet:
    """Real patches as they sit on disk (raw: the audit puts them in the set's views)."""
    if (path / "patchset.json").exists():
        return PatchSet.load(path)
    if path.is_dir():
        return load_image_folder(path)
    raise InputError(f"{path}: not a patch set directory or image folder")


def resolve_real_source(config_path: str | None = None) -> Path | None:
    """The centre's own reference named in its privacy config (``real_patches``); never the set's meta."""
    if isinstance(config_path, (str, Path)) and str(config_path) and Path(config_path).exists():
        return Path(config_path)
    return None


def check_export(synthetic: PatchSet | None = None, real: PatchSet | None = None, config=None,
                 accept_risk: bool = False, *, patchset: PatchSet | None = None, synthetic_dir: str | Path | None = None,
                 real_dir: str | Path | None = None, holdout: PatchSet | None = None, require_audit: bool | None = None,
                 raise_on_block: bool = True, independent_rules: bool = True) -> GateDecision:
    """Audit ``synthetic`` against ``real`` and decide whether it may be exported.

    ``patchset``/``synthetic_dir`` are accepted as the bundle command passes them (``synthetic``
    wins; the directory is loaded when no set is given). ``config``: an ``AuditConfig``, a YAML
    path, or None for ``configs/privacy.yaml`` (defaults when absent). Raises
    :class:`PrivacyRiskError` when a rule fires and ``accept_risk`` is false (unless
    ``raise_on_block`` is false: then the returned decision has ``blocked`` set). Without a reference
    (``real``, ``real_dir`` or the config's ``real_patches``) the decision is a refusal that
    ``accept_risk`` cannot override (``require_audit`` is kept for old callers and has no effect).
    ``independent_rules=False`` leaves out the copy detector: only for choosing among candidates
    (the rule must stay unread by the optimisation); an export always applies every rule.
    """
    from histodd_fed.privacy.audit import AuditConfig, run_view_audits

    syn = synthetic if synthetic is not None else patchset
    if syn is None:
        if synthetic_dir is None:
            raise InputError("check_export: no synthetic set given")
        syn = PatchSet.load(synthetic_dir)
    if config is None:
        cfg = AuditConfig.from_yaml(DEFAULT_CONFIG) if DEFAULT_CONFIG.exists() else AuditConfig()
    elif isinstance(config, (str, Path)):
        cfg = AuditConfig.from_yaml(config)
    else:
        cfg = config
    paths = {"synthetic": None if synthetic_dir is None else str(synthetic_dir)}
    if real is None:
        src = Path(real_dir) if real_dir is not None else resolve_real_source(cfg.real_patches)
        if src is None:
            reason = ("no reference: the gate audits against the centre's own real patches only (give --patches, "
                      "or set real_patches in the centre's privacy config); a path in the set's meta is not used")
            decision = GateDecision(passed=False, accepted_risk=False, reasons=[reason],
                                    summary={"audited": False, "note": reason}, audited=False,
                                    override_requested=bool(accept_risk))
            if raise_on_block:
                raise PrivacyRiskError(decision.message(), decision)
            return decision
        real = _load_real(src)
        paths["real"] = str(src)
    if holdout is None and cfg.holdout_patches:
        hp = Path(cfg.holdout_patches)
        if hp.exists():
            holdout = _load_real(hp)
            paths["holdout"] = str(hp)
    report = run_view_audits(syn, real, holdout, cfg, paths=paths, copies=independent_rules)
    summary = report.summary()
    decision = GateDecision(passed=not report.risks, accepted_risk=bool(accept_risk) and bool(report.risks),
                            reasons=list(report.risks), summary=summary, audited=True,
                            override_requested=bool(accept_risk), report=report)
    if decision.blocked and raise_on_block:
        raise PrivacyRiskError(decision.message(), decision)
    if decision.accepted_risk:
        log.warning("%s", decision.message())
    return decision
