"""The centre node: what a hospital's Flower ClientApp does for each coordinator request.

A :class:`CentreNode` is built from its node config (:class:`CentreConfig`: centre id, data,
key directory, work directory, preset, seed). It answers three actions
(see :mod:`histodd_fed.federation.envelope`):

``identity``  prepare if needed (tile slides, train its own ResNet18 and CLAM, all cached), then
              reply its public identity, centre id and class counts (no patient data).
``distil``    for each requested ipc, distil its train split with Histo-DD twice (cached by config
              hash): ``ipc`` images per class (patch level) and ``slide_ipc`` per class per train
              slide with the slide table (slide level, ``DistillConfig(per_slide=True)``). Each set
              passes the export gate (:func:`histodd_fed.privacy.gate.check_export` against the
              real train patches) whose summary is sealed into the manifest; a blocked set is
              announced ``blocked`` and not sent. ``full`` seals the whole real train split (risk
              accepted by definition, recorded). The seed is the centre's (``ExportPolicy.pick_seed``)
              and every sealed set is checked against and recorded in its release ledger
              (:mod:`histodd_fed.bundle.releases`); a set over budget is announced ``blocked``.
              Replies the sealed bundles as blobs.
``train``     verify and open every bundle addressed to it; per row (ipc or full) fine-tune its
              pre-trained classifier on the patch-level set and its pre-trained CLAM on bags of
              the received per-slide set; evaluate on its held-out real test split; metrics only.

Every handler returns an :class:`Envelope`; a failure becomes a reply with ``ok: false``, an
``error_code`` (the exception's class) and a fixed one-line ``error`` (:mod:`reply_errors`); the
exception's text stays in the centre's log.
"""

from __future__ import annotations

import logging
import re
import time
import traceback
from pathlib import Path
from typing import Any

from histodd_fed.errors import HistoddError
from histodd_fed.federation.centre_config import (  # noqa: F401  (DEFAULT_*, ExportPolicy, PolicyError: re-exported)
    DEFAULT_MAX_EPSILON,
    DEFAULT_MAX_EPSILON_TOTAL,
    DEFAULT_MAX_RELEASES,
    CentreConfig,
    ExportPolicy,
    PolicyError,
)
from histodd_fed.federation.envelope import (
    ACTION_DISTIL,
    ACTION_IDENTITY,
    ACTION_TRAIN,
    PROOF_IDENTITY,
    PROOF_REPLY,
    PROTOCOL_VERSION,
    Envelope,
    ProtocolError,
    bundle_rows,
    reply_digest,
    sign_statement,
    statement,
)
from histodd_fed.federation.faults import FaultInjection
from histodd_fed.federation.presets import CentrePreset, get_preset
from histodd_fed.federation.reply_errors import error_fields

log = logging.getLogger(__name__)

_PATH_RE = re.compile(r"(?<![\w<>.-])(?:~|\.{1,2})?/[^\s'\",;()\[\]{}]+")


def scrub(text: str, cfg: "CentreConfig") -> str:
    """``text`` without this centre's local paths (error replies go to the coordinator)."""
    out = str(text)
    named = [(cfg.work_dir, "<work-dir>"), (cfg.key_dir, "<key-dir>"), (cfg.data, "<data>")]
    if cfg.labels_csv:
        named.append((cfg.labels_csv, "<labels-csv>"))
    pairs = []
    for path, label in named:
        for form in {str(path), str(Path(path).resolve())}:
            if form and form not in (".", "/"):
                pairs.append((form, label))
    for form, label in sorted(pairs, key=lambda x: -len(x[0])):
        out = out.replace(form, label)
    out = _PATH_RE.sub("<path>", out)
    return " ".join(out.split())[:500]


class CentreNode:
    """One centre's request handlers (plain Python; the Flower ClientApp is a thin wrapper)."""

    def __init__(self, config: CentreConfig):
        self.config = config
        self.preset: CentrePreset = get_preset(config.preset, **config.preset_overrides)
        self.faults = FaultInjection.parse(config.fault)

    # ------------------------------------------------------------------ dispatch
    def handle(self, action: str, request: Envelope, *, run_id: Any = 0, node_id: Any = 0) -> Envelope:
        """Run ``action``; errors become ``{"ok": False, "error": ...}`` replies.

        ``run_id`` / ``node_id``: the Flower run and node this message reached (the ClientApp's
        Context). When the request carries a ``nonce``, the reply is signed over them
        (:func:`~histodd_fed.federation.envelope.sign_statement`): identity replies prove the
        centre id, every other reply is attributable to this centre's key.
        """
        t0 = time.perf_counter()
        try:
            self.faults.before_reply(action)
            if action == ACTION_IDENTITY:
                reply = self.identity(request)
            elif action == ACTION_DISTIL:
                reply = self.distil(request)
            elif action == ACTION_TRAIN:
                reply = self.train(request)
            else:
                raise ProtocolError(f"unknown action {action!r}")
            reply.body.setdefault("ok", True)
        except HistoddError as exc:  # a code and a fixed message leave; the detail stays in the log
            reply = Envelope(body={"ok": False, **error_fields(exc, self.config.centre_id, action)})
        except Exception as exc:  # noqa: BLE001 - report, never crash the node
            log.error("%s: %s crashed:\n%s", self.config.centre_id, action, traceback.format_exc())
            reply = Envelope(body={"ok": False, **error_fields(exc, self.config.centre_id, action)})
        reply.body["centre_id"] = self.config.centre_id
        reply.body["protocol"] = PROTOCOL_VERSION
        reply.body["seconds"] = round(time.perf_counter() - t0, 3)
        self._sign(action, request, reply, run_id, node_id)
        return reply

    def _sign(self, action: str, request: Envelope, reply: Envelope, run_id: Any, node_id: Any) -> None:
        nonce = request.body.get("nonce")
        if not nonce:
            return
        from histodd_fed.federation.centre_identity import load_or_create_identity

        try:
            ident = load_or_create_identity(self.config)
        except HistoddError as exc:  # cannot prove anything: the coordinator will refuse the reply
            log.warning("%s: cannot sign the %s reply: %s", self.config.centre_id, action, exc)
            return
        purpose = PROOF_IDENTITY if action == ACTION_IDENTITY else PROOF_REPLY
        st = statement(purpose, str(nonce), self.config.centre_id, run_id, node_id, ident.public.sign_key_id,
                       reply_digest(reply.body))
        reply.body["proof"] = sign_statement(ident, st)

    # ------------------------------------------------------------------ actions
    def identity(self, request: Envelope) -> Envelope:
        from histodd_fed.federation import centre_data
        from histodd_fed.federation.centre_identity import load_or_create_identity

        nonce = str(request.body.get("nonce", ""))
        if len(nonce) < 32:
            raise ProtocolError("identity request lacks a fresh nonce (at least 128 bits)")
        ident = load_or_create_identity(self.config)
        body: dict[str, Any] = {"identity": ident.public.to_dict(), "preset": self.preset.name,
                                "export_policy": self.config.policy.summary()}
        if request.body.get("prepare", True):   # the data; models wait for a train request (baseline {} till then)
            prepared = centre_data.prepare(self.config, self.preset, models=False)
            body.update(prepared.summary())
        return Envelope(body=body)

    def distil(self, request: Envelope) -> Envelope:
        from histodd_fed.bundle.releases import ReleaseBudgetError
        from histodd_fed.bundle.trust import TrustStore
        from histodd_fed.federation import centre_bundles, centre_data, outgoing_sets, privacy_reports

        raw = request.require("recipients")
        if not isinstance(raw, list):
            raise ProtocolError("distil: 'recipients' must be a list of centre ids")
        recipients = [str(r) for r in raw]
        try:
            ipcs = [int(i) for i in request.body.get("ipcs", [])]
        except (TypeError, ValueError):
            raise ProtocolError("distil: 'ipcs' must be a list of integers") from None
        full = request.body.get("full", False) is not False
        policy = self.config.policy
        # the centre's own policy decides; a request can only ask for less (checked before any work)
        policy.check(self.config.centre_id, recipients, ipcs, full, set(TrustStore.load(self.config.key_dir).centres))
        extras = request.body.get("extras") or []
        for e in extras if isinstance(extras, list) else []:  # every override within the policy, before any work
            if isinstance(e, dict) and e.get("overrides"):
                policy.check_overrides(self.config.centre_id, e["overrides"])
        seed = policy.pick_seed(self.config.centre_id, request.body.get("seed"), self.config.seed)
        prepared = centre_data.prepare(self.config, self.preset, models=False)   # sets come from the data alone
        with_slides = prepared.slide_sets() is not None
        blobs: dict[str, bytes] = {}
        items: list[dict[str, Any]] = []
        decided = {"export_policy": policy.summary(), "decided_by": f"centre {self.config.centre_id}"}
        parts = [outgoing_sets.Part(ipc, per_slide) for ipc in ipcs for per_slide in (False, True)
                 if with_slides or not per_slide]
        made = outgoing_sets.make_parts(self.config, self.preset, prepared, parts, seed)  # distilled and gated
        for p in parts:
            res, blocked, report, message = made[p].result, made[p].blocked, made[p].report, made[p].message
            ipc, part, name = p.ipc, p.kind, p.name
            item = {"name": name, "row": f"ipc{ipc}", "part": part, "ipc": ipc, "mode": "synthetic",
                    "images": len(res.patchset), "config_hash": res.config_hash, "cached": res.cached,
                    "distil_seconds": res.seconds}
            extra = {"row": f"ipc{ipc}", "part": part, "ipc": ipc, **decided}
            if p.per_slide:
                item["m_per_slide"] = extra["m_per_slide"] = self.preset.slide_ipc
            item["privacy"] = report.get("gate", {})
            if blocked and policy.gate:  # never sealed, never sent; the coordinator reports it
                items.append(dict(item, blocked=True, error=scrub(message, self.config), bytes=0))
                continue
            if blocked:  # gate off by the centre's own policy: sealed, the decision recorded
                report = dict(report, accepted_risk=True,
                              accepted_by=f"centre {self.config.centre_id} policy export-gate=off")
            try:  # the release budget (per recipient, the centre's release ledger) decides last
                data = centre_bundles.seal_for(self.config, res.patchset, recipients, label=name,
                                               privacy_report=report, extra=extra, seed=seed)
            except ReleaseBudgetError as exc:
                items.append(dict(item, blocked=True, budget=True, error=scrub(str(exc), self.config), bytes=0))
                continue
            blobs[name] = self.faults.on_bundle(data)
            items.append(dict(item, bytes=len(data)))
        if request.body.get("extras"):  # benchmark extras: coreset baselines, distillation variants
            from histodd_fed.federation.extras import distil_extras

            more, more_blobs = distil_extras(self, request.body["extras"], prepared, recipients, seed, decided)
            items += more
            blobs.update({k: self.faults.on_bundle(v) for k, v in more_blobs.items()})
        if full:
            total = prepared.summary()["n_train_total"]
            # the real train split; a centre whose slide data are separate sets (pseudo-slides) sends its
            # real slide set as the row's own "slides" part
            sets = [("full", "both" if not prepared.separate_slides else "patch", prepared.train)]
            if prepared.separate_slides and with_slides:
                sets.append(("full-slides", "slides", prepared.slide_sets()[0]))
            for name, part, ps in sets:
                report = dict(privacy_reports.full_privacy_report(prepared, ps),
                              accepted_by=f"centre {self.config.centre_id} policy export-real=true")
                item = {"name": name, "row": "full", "part": part, "ipc": None, "mode": "full",
                        "images": len(ps), "train_total": total,
                        "config_hash": prepared.config_hash, "cached": True, "distil_seconds": 0.0,
                        "privacy": report.get("gate", {})}
                try:
                    data = centre_bundles.seal_for(self.config, ps, recipients, label=name, privacy_report=report,
                                                   extra={"row": "full", "part": part, "train_total": total,
                                                          **decided})
                except ReleaseBudgetError as exc:
                    items.append(dict(item, blocked=True, budget=True, error=scrub(str(exc), self.config), bytes=0))
                else:
                    blobs[name] = self.faults.on_bundle(data)
                    items.append(dict(item, bytes=len(data)))
        return Envelope(body={"bundles": items, "recipients": recipients}, blobs=blobs)

    def train(self, request: Envelope) -> Envelope:
        """Fine-tune per row; every row's labels come from the opened, verified manifests.

        The coordinator's listing only groups blobs into rows; source, mode, ipc and the row name
        are read from what the bundles' signers sealed, and a listing that disagrees with them is
        refused for that row.
        """
        from histodd_fed.federation import centre_data, fine_tuning

        epochs = self.config.policy.check_epochs(self.config.centre_id,
                                                 request.body.get("epochs", self.preset.fine_tune_epochs))
        prepared = centre_data.prepare(self.config, self.preset)
        from histodd_fed.federation import receive_select

        if receive_select.applies(self.preset, request):  # pooled sources / protocol chosen on a val split
            return Envelope(body={"rows": receive_select.train_rows(self.config, self.preset, prepared, request,
                                                                    epochs), "epochs": epochs})
        rows: list[dict[str, Any]] = []
        if request.body.get("baseline", True):  # one "no transfer" row per reported protocol
            rows.extend(fine_tuning.evaluate_baseline(self.config, self.preset.for_protocol(p), prepared)
                        for p in self.preset.protocols())
        for row_name, items in bundle_rows(request).items():
            row: dict[str, Any] = {"name": row_name, **receive_select.row_bytes(request, items),
                                   "bundles": [str(i["name"]) for i in items]}
            by_part = {str(i.get("part") or "both"): request.blobs[str(i["name"])] for i in items}
            patch = by_part.get("patch", by_part.get("both"))
            slides = by_part.get("slides", by_part.get("both"))
            try:
                res = fine_tuning.fine_tune_on_bundles(self.config, self.preset, prepared, patch=patch,
                                                       slides=slides, epochs=epochs)
                labels = _labels_from_manifests(res.get("received_from") or [], patch, slides)
                others = res.pop("by_protocol", None) or {}
                rows.append({**row, **res, **labels, "ok": True})
                rows.extend({**row, **r, **labels, "ok": True} for r in others.values())
            except HistoddError as exc:
                row.update(ok=False, **error_fields(exc, self.config.centre_id, f"train row {row_name}"))
                rows.append(row)
        return Envelope(body={"rows": rows, "epochs": epochs})


def _labels_from_manifests(received: list[dict[str, Any]], patch: bytes | None,
                           slides: bytes | None) -> dict[str, Any]:
    """Row labels (source, mode, ipc, name) from the opened manifests; ProtocolError when they disagree."""
    if not received:
        raise ProtocolError("row has no opened bundle to take its labels from")
    sources = {r.get("source") for r in received}
    rows = {r.get("row") or r.get("transfer") for r in received}
    if len(sources) != 1 or len(rows) != 1:
        raise ProtocolError(f"one row mixes bundles of {sorted(map(str, sources))} / rows {sorted(map(str, rows))}")
    src, sealed_row = sources.pop(), rows.pop()
    # received_from follows the blobs in order (patch, then slides when a different blob)
    roles = ([("patch", ("patch", "both"))] if patch is not None else []) + \
        ([("slides", ("slides", "both"))] if slides is not None and slides is not patch else [])
    for (role, ok), r in zip(roles, received):
        if r.get("part") is not None and r["part"] not in ok:
            raise ProtocolError(f"coordinator relayed {src}'s {r['part']!r} bundle as the {role} part")
    kinds = {r.get("kind") for r in received}
    mode = "full" if "real" in kinds else ("coreset" if "coreset" in kinds else "synthetic")
    patch_like = [r for r in received if r.get("part") in ("patch", "both", None)]
    out: dict[str, Any] = {"source": src, "mode": mode, "name": f"{src}-{sealed_row}",
                           "ipc": None if mode == "full" else (patch_like or received)[0].get("ipc"),
                           "sign_key_ids": sorted({str(r.get("sign_key_id")) for r in received}),
                           "bundle_ids": [r.get("bundle_id") for r in received]}
    for k in ("train_total", "m_per_slide"):
        for r in received:
            if r.get(k) is not None:
                out[k] = r[k]
    return out
