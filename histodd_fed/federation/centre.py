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
              accepted by definition, recorded). Replies the sealed bundles as blobs.
``train``     verify and open every bundle addressed to it; per row (ipc or full) fine-tune its
              pre-trained classifier on the patch-level set and its pre-trained CLAM on bags of
              the received per-slide set; evaluate on its held-out real test split; metrics only.

Every handler returns an :class:`Envelope`; a :class:`HistoddError` becomes a reply with
``ok: false`` and a one-line ``error`` instead of a crashed message.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from histodd_fed.errors import ConfigError, HistoddError
from histodd_fed.federation.envelope import (
    ACTION_DISTIL,
    ACTION_IDENTITY,
    ACTION_TRAIN,
    PROTOCOL_VERSION,
    Envelope,
    ProtocolError,
)
from histodd_fed.federation.faults import FaultInjection
from histodd_fed.federation.presets import CentrePreset, get_preset

log = logging.getLogger(__name__)


@dataclass
class CentreConfig:
    """A centre's node config (Flower ``--node-config`` keys in dash-case)."""

    centre_id: str
    data: Path                       # slides dir, slide manifest, or a patch-set directory
    key_dir: Path
    work_dir: Path
    preset: str = "cpu"
    seed: int = 0
    fault: str = ""                  # fault injection for drills (see faults.py)
    labels_csv: Path | None = None
    preset_overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_node_config(cls, cfg: Mapping[str, Any]) -> "CentreConfig":
        """Build from a Flower node config (``centre-id``, ``data``, ``key-dir``, ``work-dir``...)."""
        def get(key: str, default: Any = None, required: bool = False) -> Any:
            for k in (key, key.replace("-", "_")):
                if k in cfg:
                    return cfg[k]
            if required:
                raise ConfigError(f"node config lacks {key!r} (have: {', '.join(sorted(cfg)) or 'nothing'})")
            return default

        labels = get("labels-csv")
        return cls(
            centre_id=str(get("centre-id", required=True)),
            data=Path(str(get("data", required=True))),
            key_dir=Path(str(get("key-dir", required=True))),
            work_dir=Path(str(get("work-dir", required=True))),
            preset=str(get("preset", "cpu")),
            seed=int(get("seed", 0)),
            fault=str(get("fault", "") or ""),
            labels_csv=Path(str(labels)) if labels else None,
        )

    def to_node_config(self) -> dict[str, str | int]:
        out: dict[str, str | int] = {
            "centre-id": self.centre_id, "data": str(self.data), "key-dir": str(self.key_dir),
            "work-dir": str(self.work_dir), "preset": self.preset, "seed": int(self.seed),
        }
        if self.fault:
            out["fault"] = self.fault
        if self.labels_csv:
            out["labels-csv"] = str(self.labels_csv)
        return out

    def node_config_string(self) -> str:
        """``--node-config`` value for ``flower-supernode`` (quoted strings, bare ints)."""
        parts = []
        for k, v in self.to_node_config().items():
            parts.append(f'{k}={v}' if isinstance(v, int) else f'{k}="{v}"')
        return " ".join(parts)


class CentreNode:
    """One centre's request handlers (plain Python; the Flower ClientApp is a thin wrapper)."""

    def __init__(self, config: CentreConfig):
        self.config = config
        self.preset: CentrePreset = get_preset(config.preset, **config.preset_overrides)
        self.faults = FaultInjection.parse(config.fault)

    # ------------------------------------------------------------------ dispatch
    def handle(self, action: str, request: Envelope) -> Envelope:
        """Run ``action``; errors become ``{"ok": False, "error": ...}`` replies."""
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
        except HistoddError as exc:
            log.warning("%s: %s failed: %s", self.config.centre_id, action, exc)
            reply = Envelope(body={"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        except Exception as exc:  # noqa: BLE001 - report, never crash the node
            log.error("%s: %s crashed:\n%s", self.config.centre_id, action, traceback.format_exc())
            reply = Envelope(body={"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        reply.body["centre_id"] = self.config.centre_id
        reply.body["protocol"] = PROTOCOL_VERSION
        reply.body["seconds"] = round(time.perf_counter() - t0, 3)
        return reply

    # ------------------------------------------------------------------ actions
    def identity(self, request: Envelope) -> Envelope:
        from histodd_fed.federation import local_work

        ident = local_work.load_or_create_identity(self.config)
        body: dict[str, Any] = {"identity": ident.public.to_dict(), "preset": self.preset.name}
        if request.body.get("prepare", True):
            prepared = local_work.prepare(self.config, self.preset)
            body.update(prepared.summary())
        return Envelope(body=body)

    def distil(self, request: Envelope) -> Envelope:
        from histodd_fed.federation import local_work, slide_level

        recipients = [str(r) for r in request.require("recipients")]
        ipcs = [int(i) for i in request.body.get("ipcs", [])]
        full = bool(request.body.get("full", False))
        seed = int(request.body.get("seed", self.config.seed))
        prepared = local_work.prepare(self.config, self.preset)
        with_slides = slide_level.has_slides(prepared.train)
        blobs: dict[str, bytes] = {}
        items: list[dict[str, Any]] = []
        for ipc in ipcs:
            parts = [("patch", f"ipc{ipc}", False)] + ([("slides", f"ipc{ipc}-slides", True)] if with_slides else [])
            for part, name, per_slide in parts:
                res = local_work.distil_cached(self.config, self.preset, prepared, ipc=ipc, seed=seed,
                                               per_slide=per_slide)
                item = {"name": name, "row": f"ipc{ipc}", "part": part, "ipc": ipc, "mode": "synthetic",
                        "images": len(res.patchset), "config_hash": res.config_hash, "cached": res.cached,
                        "distil_seconds": res.seconds}
                if per_slide:
                    item["m_per_slide"] = self.preset.slide_ipc
                blocked, report, message = local_work.gate_report(res.patchset, prepared)
                item["privacy"] = report.get("gate", {})
                if blocked:  # never sealed, never sent; the coordinator reports it for this row
                    items.append(dict(item, blocked=True, error=message, bytes=0))
                    continue
                data = local_work.seal_for(self.config, res.patchset, recipients, label=name, privacy_report=report)
                blobs[name] = self.faults.on_bundle(data)
                items.append(dict(item, bytes=len(data)))
        if full:
            report = local_work.full_privacy_report(prepared)
            data = local_work.seal_for(self.config, prepared.train, recipients, label="full", privacy_report=report)
            blobs["full"] = self.faults.on_bundle(data)
            items.append({"name": "full", "row": "full", "part": "both", "ipc": None, "mode": "full",
                          "images": len(prepared.train), "train_total": prepared.summary()["n_train_total"],
                          "config_hash": prepared.config_hash, "cached": True, "distil_seconds": 0.0,
                          "bytes": len(data), "privacy": report.get("gate", {})})
        return Envelope(body={"bundles": items, "recipients": recipients}, blobs=blobs)

    def train(self, request: Envelope) -> Envelope:
        from histodd_fed.federation import local_work

        epochs = int(request.body.get("epochs", self.preset.fine_tune_epochs))
        prepared = local_work.prepare(self.config, self.preset)
        rows: list[dict[str, Any]] = []
        if request.body.get("baseline", True):
            rows.append(local_work.evaluate_baseline(self.config, self.preset, prepared))
        groups: dict[str, list[dict[str, Any]]] = {}
        for item in request.body.get("bundles", []):
            name = str(item["name"])
            if name not in request.blobs:
                raise ProtocolError(f"train request names bundle {name!r} but does not carry it")
            groups.setdefault(str(item.get("row") or name), []).append(item)
        for row_name, items in groups.items():
            first = items[0]
            row = {"name": row_name, "source": first.get("source"), "ipc": first.get("ipc"),
                   "mode": first.get("mode"), "bytes": sum(len(request.blobs[str(i["name"])]) for i in items),
                   "bundles": [str(i["name"]) for i in items]}
            for k in ("train_total", "m_per_slide"):
                for i in items:
                    if i.get(k) is not None:
                        row[k] = i[k]
            by_part = {str(i.get("part") or "both"): request.blobs[str(i["name"])] for i in items}
            patch = by_part.get("patch", by_part.get("both"))
            slides = by_part.get("slides", by_part.get("both"))
            try:
                row.update(local_work.fine_tune_on_bundles(self.config, self.preset, prepared, patch=patch,
                                                           slides=slides, epochs=epochs))
                row["ok"] = True
            except HistoddError as exc:
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            rows.append(row)
        return Envelope(body={"rows": rows, "epochs": epochs})
