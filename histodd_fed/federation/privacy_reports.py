"""The privacy report sealed into a bundle's manifest: the export gate's decision on a synthetic
set (:func:`gate_report`), or the risk-accepted report of a set of real patches (:func:`full_privacy_report`)."""

from __future__ import annotations

from typing import Any

from histodd_fed.federation.centre_config import CentreConfig
from histodd_fed.federation.centre_data import Prepared, one_thread
from histodd_fed.patchset import PatchSet


def sent_set_report(ps: PatchSet, prepared: Prepared, cfg: CentreConfig) -> tuple[bool, dict[str, Any], str]:
    """:func:`gate_report` on a set this centre is about to send, its verdict reused from the centre's sealed
    record of the same set, reference and code when it has one (:mod:`gate_verdicts`)."""
    from histodd_fed.federation.gate_verdicts import cached_gate

    reference = prepared.gate_reference()
    return cached_gate(ps, reference, work_dir=cfg.work_dir, key_dir=cfg.key_dir,
                       gate=lambda: gate_report(ps, prepared, reference=reference))


def gate_report(ps: PatchSet, prepared: Prepared, *,
                reference: PatchSet | None = None) -> tuple[bool, dict[str, Any], str]:
    """Run the export gate on ``ps`` against this centre's real train patches (the raw ones when the model sees
    a view of them, so the copy detector searches the same windows as ``centre-node export --patches RAW``).

    Returns ``(blocked, privacy_report, message)``; the report is what gets sealed into the
    manifest. Nothing is raised for a blocked set: the caller reports it and does not send it. ``reference``:
    ``prepared.gate_reference()`` when the caller has it loaded already.
    """
    from histodd_fed.privacy.gate import check_export

    one_thread()
    real = prepared.gate_reference() if reference is None else reference
    decision = check_export(synthetic=ps, real=real, accept_risk=False, require_audit=True, raise_on_block=False)
    summary = decision.to_dict()
    return decision.blocked, summary, decision.message()


def full_privacy_report(prepared: Prepared, sent: PatchSet | None = None) -> dict[str, Any]:
    """Privacy report for the "Full" comparison: real patches, risk accepted by definition. ``sent``: the real
    set sealed (default the train split; the centre's real pseudo-slide set for a Full's slide part)."""
    from histodd_fed.privacy.gate import GateDecision

    sent = prepared.train if sent is None else sent
    what = "train patches" if sent is prepared.train else "train slides (pseudo-slides of its train patches)"
    reason = f"Full comparison: the source's real {what} (real data by definition)"
    return GateDecision(passed=False, accepted_risk=True, reasons=[reason],
                        summary={"audited": False, "kind": "real", "n_real": len(sent)},
                        audited=False, override_requested=True).to_dict()
