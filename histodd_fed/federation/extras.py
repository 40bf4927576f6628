"""Extra sets a source centre sends in benchmark studies (beside Histo-DD ipc sets and Full).

A distil request may carry ``extras``, a list of

- ``{"name": "herding10", "kind": "coreset", "method": "herding", "ipc": 10}``: a coreset of REAL
  train patches. Real data leaves a centre only under its own explicit policy (node config
  ``export-real``, :class:`histodd_fed.federation.centre_config.ExportPolicy`); without it the set is
  announced ``blocked`` and not sent. Sealed with ``accepted_risk`` and ``real_patches: true`` in
  the manifest (as "Full" is), so the target and the report mark it as real.
- ``{"name": "ipc10-stain", "kind": "variant", "ipc": 10, "overrides": {...}}``: Histo-DD with
  distillation config overrides (e.g. another matching augmentation), through the export gate
  exactly like the ipc sets.

The request can only ask; what may leave is decided here, by the centre.
"""

from __future__ import annotations

import re
from typing import Any

from histodd_fed.federation.envelope import ProtocolError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,47}$")
#: distillation fields a request may override (nothing that points at files or devices)
VARIANT_FIELDS = {"augmentation", "distance", "lr_img", "outer_steps", "inner_steps", "init"}


def _check(extra: Any) -> dict[str, Any]:
    if not isinstance(extra, dict):
        raise ProtocolError("distil: every entry of 'extras' must be an object")
    name, kind = str(extra.get("name", "")), extra.get("kind")
    if not NAME_RE.match(name) or name == "full" or name.startswith("ipc") and kind != "variant":
        raise ProtocolError(f"distil: bad extra set name {name!r}")
    if kind not in ("coreset", "variant"):
        raise ProtocolError(f"distil: extra {name!r}: kind must be coreset or variant, got {kind!r}")
    try:
        ipc = int(extra.get("ipc"))
    except (TypeError, ValueError):
        raise ProtocolError(f"distil: extra {name!r}: ipc must be an integer") from None
    if kind == "coreset" and extra.get("method") not in ("random", "herding", "forgetting"):
        raise ProtocolError(f"distil: extra {name!r}: unknown coreset method {extra.get('method')!r}")
    overrides = extra.get("overrides") or {}
    if kind == "variant" and (not isinstance(overrides, dict) or set(overrides) - VARIANT_FIELDS):
        raise ProtocolError(f"distil: extra {name!r}: overrides may only set {sorted(VARIANT_FIELDS)}")
    return {"name": name, "kind": kind, "ipc": ipc, "method": extra.get("method"), "overrides": dict(overrides)}


def distil_extras(node, extras: list[Any], prepared, recipients: list[str], seed: int,
                  decided: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """Build, gate (or policy-check) and seal each extra set: (announced items, sealed blobs)."""
    from histodd_fed.bundle.releases import ReleaseBudgetError
    from histodd_fed.federation import centre_bundles, distil_cache, privacy_reports

    if not isinstance(extras, list):
        raise ProtocolError("distil: 'extras' must be a list")
    cfg, preset = node.config, node.preset
    policy = getattr(cfg, "policy", None)
    items: list[dict[str, Any]] = []
    blobs: dict[str, bytes] = {}
    for raw in extras:
        e = _check(raw)
        name, ipc = e["name"], e["ipc"]
        max_ipc = getattr(policy, "max_ipc", None)
        if max_ipc is not None and not 0 < ipc <= max_ipc:
            items.append({"name": name, "row": name, "ipc": ipc, "blocked": True, "bytes": 0,
                          "error": f"export policy refuses ipc {ipc} (export-max-ipc {max_ipc})"})
            continue
        extra = {"row": name, "part": "patch", "ipc": ipc, **decided}
        if e["kind"] == "coreset":
            item = {"name": name, "row": name, "part": "patch", "ipc": ipc, "mode": "coreset", "real_patches": True,
                    "method": e["method"]}
            if policy is not None and not getattr(policy, "real", False):
                items.append(dict(item, blocked=True, bytes=0,
                                  error=f"{cfg.centre_id}: export policy refuses real patches (export-real is off)"))
                continue
            res = distil_cache.coreset_cached(cfg, preset, prepared, method=e["method"], ipc=ipc, seed=seed)
            report = dict(privacy_reports.full_privacy_report(prepared),
                          reasons=[f"{e['method']} coreset: {len(res.patchset)} of the source's real train patches"],
                          accepted_by=f"centre {cfg.centre_id} policy export-real=true")
            extra.update(real_patches=True, method=e["method"])
        else:
            res = distil_cache.distil_cached(cfg, preset, prepared, ipc=ipc, seed=seed,
                                             extra_overrides=e["overrides"])
            item = {"name": name, "row": name, "part": "patch", "ipc": ipc, "mode": "synthetic",
                    "variant": e["overrides"]}
            blocked, report, message = privacy_reports.sent_set_report(res.patchset, prepared, cfg)
            item["privacy"] = report.get("gate", {})
            if blocked and getattr(policy, "gate", True):
                items.append(dict(item, blocked=True, bytes=0, error=message))
                continue
            extra.update(variant=e["overrides"])
        item.update(images=len(res.patchset), config_hash=res.config_hash, cached=res.cached,
                    distil_seconds=res.seconds)
        try:  # the centre's release budget (per recipient) decides last
            data = centre_bundles.seal_for(cfg, res.patchset, recipients, label=name, privacy_report=report,
                                           extra=extra, seed=seed)
        except ReleaseBudgetError as exc:
            items.append(dict(item, blocked=True, budget=True, bytes=0, error=str(exc)))
            continue
        blobs[name] = data
        items.append(dict(item, bytes=len(data)))
    return items, blobs
