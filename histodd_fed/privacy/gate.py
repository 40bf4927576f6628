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

Real patches come from ``real`` / ``real_dir``, else ``real_patches`` in the config, else the
source path recorded in the set's meta (``source``, ``source_dir``, ``real_source``; coresets
record ``source``). When none can be found the set cannot be audited: the gate then blocks if
``require_audit`` is set (the config's ``gate.require_audit``), else passes with
``audited: false`` in the manifest and a warning.
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
META_SOURCE_KEYS = ("real_source", "source_dir", "source")


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
            return "privacy gate: passed" + ("" if self.audited else " (not audited: no real patches found)")
        more = f" (+{len(self.reasons) - 1} more rule(s))" if len(self.reasons) > 1 else ""
        head = "privacy risk accepted (--accept-privacy-risk): " if self.accepted_risk else "export blocked by the privacy gate: "
        tail = "" if self.accepted_risk else "; re-run with --accept-privacy-risk to export anyway (recorded in the manifest)"
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


def resolve_real_source(synthetic: PatchSet, config_path: str | None = None) -> Path | None:
    """Where the set's real patches live: config ``real_patches``, else a path recorded in meta."""
    candidates = [config_path] + [synthetic.meta.get(k) for k in META_SOURCE_KEYS]
    for c in candidates:
        if isinstance(c, (str, Path)) and str(c) and Path(c).exists():
            return Path(c)
    return None


def check_export(synthetic: PatchSet | None = None, real: PatchSet | None = None, config=None,
                 accept_risk: bool = False, *, patchset: PatchSet | None = None, synthetic_dir: str | Path | None = None,
                 real_dir: str | Path | None = None, holdout: PatchSet | None = None, require_audit: bool | None = None,
                 raise_on_block: bool = True) -> GateDecision:
    """Audit ``synthetic`` against ``real`` and decide whether it may be exported.

    ``patchset``/``synthetic_dir`` are accepted as the bundle command passes them (``synthetic``
    wins; the directory is loaded when no set is given). ``config``: an ``AuditConfig``, a YAML
    path, or None for ``configs/privacy.yaml`` (defaults when absent). Raises
    :class:`PrivacyRiskError` when a rule fires and ``accept_risk`` is false (unless
    ``raise_on_block`` is false: then the returned decision has ``blocked`` set).
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
    if require_audit is None:
        require_audit = bool(cfg.gate.require_audit)
    paths = {"synthetic": None if synthetic_dir is None else str(synthetic_dir)}
    if real is None:
        src = Path(real_dir) if real_dir is not None else resolve_real_source(syn, cfg.real_patches)
        if src is None:
            reason = ("no real patches to audit against (give --patches, set real_patches in the privacy config, "
                      "or record the source in the set's meta)")
            decision = GateDecision(passed=not require_audit, accepted_risk=bool(accept_risk and require_audit),
                                    reasons=[] if not require_audit else [reason],
                                    summary={"audited": False, "note": reason}, audited=False,
                                    override_requested=bool(accept_risk))
            if decision.blocked and raise_on_block:
                raise PrivacyRiskError(decision.message(), decision)
            log.warning("privacy gate: %s", reason)
            return decision
        real = _load_real(src)
        paths["real"] = str(src)
    if holdout is None and cfg.holdout_patches:
        hp = Path(cfg.holdout_patches)
        if hp.exists():
            holdout = _load_real(hp)
            paths["holdout"] = str(hp)
    report = run_view_audits(syn, real, holdout, cfg, paths=paths)
    summary = report.summary()
    decision = GateDecision(passed=not report.risks, accepted_risk=bool(accept_risk) and bool(report.risks),
                            reasons=list(report.risks), summary=summary, audited=True,
                            override_requested=bool(accept_risk), report=report)
    if decision.blocked and raise_on_block:
        raise PrivacyRiskError(decision.message(), decision)
    if decision.accepted_risk:
        log.warning("%s", decision.message())
    return decision
