"""Distil -> choose -> audit: one gate for the candidate choice, ``distill``'s verdict and ``export``.

The export gate (:func:`histodd_fed.privacy.gate.check_export`) is called here with the centre's *raw*
reference patches - the same patches, views and config ``centre-node export --patches DIR`` uses - so a
set that ``distill`` reports as passing exports, and one it reports as blocked is refused:

- :func:`candidate_check` - for the gate-aware best-of-K choice (``candidate_gate``): the gate's
  *calibrated* rules only (SSIM / L2 / structure against the real-real distribution). The copy
  detector is left out on purpose: the optimisation never reads the independent rule.
- :func:`release_verdict` - every rule, once, on the set that is written (``meta["gate"]``).
"""

from __future__ import annotations

from typing import Any, Callable

from histodd_fed.patchset import PatchSet


def candidate_check(reference: PatchSet, config=None) -> Callable[[PatchSet], tuple[bool, str]]:
    """``check(set) -> (passed, first reason)`` by the export gate's calibrated rules against ``reference``."""
    from histodd_fed.privacy.gate import check_export

    def check(ps: PatchSet) -> tuple[bool, str]:
        d = check_export(synthetic=ps, real=reference, config=config, raise_on_block=False, independent_rules=False)
        return bool(d.passed), (d.reasons[0] if d.reasons else "")
    return check


def release_verdict(ps: PatchSet, reference: PatchSet, config=None) -> dict[str, Any]:
    """The full export gate on ``ps`` against ``reference`` (what ``export`` will decide), as a small record."""
    from histodd_fed.privacy.gate import check_export

    d = check_export(synthetic=ps, real=reference, config=config, raise_on_block=False)
    summary = d.summary
    return {"passed": bool(d.passed), "reasons": list(d.reasons), "message": d.message(),
            "copies": summary.get("copies"), "views": [v.get("view_text") for v in summary.get("views", [])]}
