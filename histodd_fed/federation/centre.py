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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from histodd_fed.errors import ConfigError, HistoddError
from histodd_fed.federation.envelope import (
    ACTION_DISTIL,
    ACTION_IDENTITY,
    ACTION_TRAIN,
    PROOF_IDENTITY,
    PROOF_REPLY,
    PROTOCOL_VERSION,
    Envelope,
    ProtocolError,
    digest,
    sign_statement,
    statement,
)
from histodd_fed.federation.faults import FaultInjection
from histodd_fed.federation.presets import CentrePreset, get_preset
from histodd_fed.federation.reply_errors import error_fields

log = logging.getLogger(__name__)

DEFAULT_MAX_IPC = 50
#: release budget defaults (= histodd_fed.bundle.releases.DEFAULT_*, literal so this module stays light)
DEFAULT_MAX_EPSILON = 8.0
DEFAULT_MAX_EPSILON_TOTAL = 16.0
DEFAULT_MAX_RELEASES = 10
#: limits on what a request may override (node config export-max-outer-steps, -inner-steps, -epochs)
DEFAULT_MAX_OUTER_STEPS = 2000
DEFAULT_MAX_INNER_STEPS = 50
DEFAULT_MAX_EPOCHS = 100
MAX_LR_IMG = 100.0
_OVERRIDE_WORD = re.compile(r"^[A-Za-z0-9_+,.-]{1,64}$")


class PolicyError(HistoddError):
    """A request the centre's own export policy does not allow; ``rule``: which rule refused it
    (the reply carries only that rule's fixed message, :mod:`histodd_fed.federation.reply_errors`)."""

    def __init__(self, message: str, rule: str = ""):
        super().__init__(message)
        self.rule = rule


def _as_bool(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    s = str(v).strip().lower()
    if s in ("true", "on", "yes", "1"):
        return True
    if s in ("false", "off", "no", "0", ""):
        return False
    raise ConfigError(f"node config {key!r}: expected true/false, got {v!r}")


def _as_number(get, key: str, default: float) -> float:
    import math

    v = get(key, default)
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"node config {key!r}: expected a number, got {v!r}") from None
    if isinstance(v, bool) or not math.isfinite(x) or x < 0:
        raise ConfigError(f"node config {key!r} must be a finite number >= 0, got {v!r}")
    return x


def _as_count(get, key: str, default: int) -> int:
    v = get(key, default)
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ConfigError(f"node config {key!r}: expected an integer, got {v!r}") from None
    if isinstance(v, bool) or (isinstance(v, float) and v != n) or n < 0:
        raise ConfigError(f"node config {key!r} must be an integer >= 0, got {v!r}")
    return n


def _as_seeds(v: Any) -> tuple[int, ...]:
    items = v if isinstance(v, (list, tuple)) else str(v or "").split(",")
    try:
        return tuple(dict.fromkeys(int(str(x).strip()) for x in items if str(x).strip()))
    except ValueError:
        raise ConfigError(f"node config 'export-seeds': expected comma-separated integers, got {v!r}") from None


@dataclass(frozen=True)
class ExportPolicy:
    """What this centre lets leave it: set by the centre (node config), never widened by a request.

    ``recipients``: centres a bundle may be sealed to (empty tuple: any centre in this centre's own
    trust store). ``max_ipc``: the largest images-per-class a request may ask for. ``real``:
    whether real patches (the "Full" comparison) may ever leave; off by default. ``gate``: the
    privacy export gate on synthetic sets (on by default; off is recorded in every manifest).

    Release budget per recipient (:mod:`histodd_fed.bundle.releases`, the centre's ``releases.json``):
    ``max_epsilon`` caps the epsilon of one DP set, ``max_epsilon_total`` the sum of the epsilons of
    all DP sets released to one recipient (basic composition), ``max_releases`` the number of
    distinct sets (DP or not) one recipient may receive. ``seeds``: the distillation seeds a request
    may ask for (empty: only the centre's own ``seed``); the centre, not the coordinator, decides how
    many differently seeded sets exist.
    """

    recipients: tuple[str, ...] = ()
    max_ipc: int = DEFAULT_MAX_IPC
    real: bool = False
    gate: bool = True
    max_epsilon: float = DEFAULT_MAX_EPSILON
    max_epsilon_total: float = DEFAULT_MAX_EPSILON_TOTAL
    max_releases: int = DEFAULT_MAX_RELEASES
    seeds: tuple[int, ...] = ()
    slide_ids: bool = False   # real slide ids / source indices may leave (else per-bundle pseudonyms)
    max_outer_steps: int = DEFAULT_MAX_OUTER_STEPS   # request overrides: distillation outer steps
    max_inner_steps: int = DEFAULT_MAX_INNER_STEPS   # ... inner steps
    max_epochs: int = DEFAULT_MAX_EPOCHS             # ... fine-tuning epochs of a train request

    @classmethod
    def from_node_config(cls, get) -> "ExportPolicy":
        rec = get("export-recipients", "")
        if isinstance(rec, (list, tuple)):
            recipients = tuple(str(r).strip() for r in rec if str(r).strip())
        else:
            recipients = tuple(r.strip() for r in str(rec or "").split(",") if r.strip())
        try:
            max_ipc = int(get("export-max-ipc", DEFAULT_MAX_IPC))
        except (TypeError, ValueError):
            raise ConfigError(f"node config 'export-max-ipc': expected an integer, got "
                              f"{get('export-max-ipc')!r}") from None
        if max_ipc < 0:
            raise ConfigError(f"node config 'export-max-ipc' must be >= 0, got {max_ipc}")
        return cls(recipients=recipients, max_ipc=max_ipc,
                   real=_as_bool(get("export-real", False), "export-real"),
                   gate=_as_bool(get("export-gate", True), "export-gate"),
                   max_epsilon=_as_number(get, "export-max-epsilon", DEFAULT_MAX_EPSILON),
                   max_epsilon_total=_as_number(get, "export-max-epsilon-total", DEFAULT_MAX_EPSILON_TOTAL),
                   max_releases=_as_count(get, "export-max-releases", DEFAULT_MAX_RELEASES),
                   seeds=_as_seeds(get("export-seeds", "")),
                   slide_ids=_as_bool(get("export-slide-ids", False), "export-slide-ids"),
                   max_outer_steps=_as_count(get, "export-max-outer-steps", DEFAULT_MAX_OUTER_STEPS),
                   max_inner_steps=_as_count(get, "export-max-inner-steps", DEFAULT_MAX_INNER_STEPS),
                   max_epochs=_as_count(get, "export-max-epochs", DEFAULT_MAX_EPOCHS))

    def to_node_config(self) -> dict[str, str | int]:
        out: dict[str, str | int] = {"export-max-ipc": int(self.max_ipc),
                                     "export-real": "true" if self.real else "false",
                                     "export-gate": "on" if self.gate else "off",
                                     "export-max-epsilon": f"{float(self.max_epsilon):g}",
                                     "export-max-epsilon-total": f"{float(self.max_epsilon_total):g}",
                                     "export-max-releases": int(self.max_releases)}
        if self.recipients:
            out["export-recipients"] = ",".join(self.recipients)
        if self.seeds:
            out["export-seeds"] = ",".join(str(x) for x in self.seeds)
        if self.slide_ids:
            out["export-slide-ids"] = "true"
        for key, value, default in (("export-max-outer-steps", self.max_outer_steps, DEFAULT_MAX_OUTER_STEPS),
                                    ("export-max-inner-steps", self.max_inner_steps, DEFAULT_MAX_INNER_STEPS),
                                    ("export-max-epochs", self.max_epochs, DEFAULT_MAX_EPOCHS)):
            if value != default:
                out[key] = int(value)
        return out

    def summary(self) -> dict[str, Any]:
        """What the coordinator (and every manifest) is told of the policy."""
        return {"recipients": list(self.recipients) or "trust-store", "max_ipc": self.max_ipc,
                "real": self.real, "gate": self.gate, "max_epsilon": self.max_epsilon,
                "max_epsilon_total": self.max_epsilon_total, "max_releases": self.max_releases,
                "seeds": list(self.seeds) or "own", "slide_ids": self.slide_ids,
                "max_outer_steps": self.max_outer_steps, "max_inner_steps": self.max_inner_steps,
                "max_epochs": self.max_epochs}

    def budget(self):
        """The release budget (:class:`histodd_fed.bundle.releases.ReleaseBudget`) this policy sets."""
        from histodd_fed.bundle.releases import ReleaseBudget

        return ReleaseBudget(max_epsilon=float(self.max_epsilon), max_epsilon_total=float(self.max_epsilon_total),
                             max_releases=int(self.max_releases))

    def pick_seed(self, centre_id: str, requested: Any, own_seed: int) -> int:
        """The distillation seed for a request: the centre's own unless the request names one this
        policy lists (``export-seeds``); any other seed is refused (each new seed is a new set, i.e.
        a new release)."""
        if requested is None:
            return int(own_seed)
        if isinstance(requested, bool):
            raise PolicyError(f"{centre_id}: request seed must be an integer, got {requested!r}", "seed")
        try:
            seed = int(requested)
        except (TypeError, ValueError):
            raise PolicyError(f"{centre_id}: request seed must be an integer, got {str(requested)[:40]!r}",
                              "seed") from None
        if isinstance(requested, float) and requested != seed:
            raise PolicyError(f"{centre_id}: request seed must be an integer, got {requested!r}", "seed")
        allowed = self.seeds or (int(own_seed),)
        if seed not in allowed:
            why = "export-seeds " + ",".join(map(str, self.seeds)) if self.seeds else f"its own seed {own_seed}"
            raise PolicyError(f"{centre_id}: export policy refuses seed {seed} (the centre picks its seeds: {why}; "
                              "every new seed is a new release)", "seed")
        return seed

    def check_overrides(self, centre_id: str, overrides: Any) -> None:
        """Refuse (``PolicyError``, rule ``override``) a distillation override outside this policy's limits."""
        import math

        if not isinstance(overrides, dict):
            raise PolicyError(f"{centre_id}: overrides must be an object", "override")
        ints = {"outer_steps": self.max_outer_steps, "inner_steps": self.max_inner_steps}
        for key, value in overrides.items():
            if key in ints:
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ints[key]:
                    raise PolicyError(f"{centre_id}: override {key}={str(value)[:40]} outside 1..{ints[key]}",
                                      "override")
            elif key == "lr_img":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or not 0 < value <= MAX_LR_IMG:
                    raise PolicyError(f"{centre_id}: override lr_img={str(value)[:40]} outside (0, {MAX_LR_IMG}]",
                                      "override")
            elif not isinstance(value, str) or not _OVERRIDE_WORD.match(value):
                raise PolicyError(f"{centre_id}: override {str(key)[:40]} is not a short plain word", "override")

    def check_epochs(self, centre_id: str, epochs: Any) -> int:
        """The fine-tuning epochs a train request asks for, within ``1..max_epochs``."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= self.max_epochs:
            raise PolicyError(f"{centre_id}: train epochs {str(epochs)[:40]} outside 1..{self.max_epochs}", "override")
        return epochs

    def check(self, centre_id: str, recipients: list[str], ipcs: list[int], full: bool,
              trusted: set[str]) -> None:
        """Refuse a distil request this policy does not allow (before any work is done)."""
        if not recipients:
            raise PolicyError(f"{centre_id}: the request names no recipient", "recipient")
        allowed = set(self.recipients) if self.recipients else trusted
        for r in recipients:
            if r == centre_id:
                raise PolicyError(f"{centre_id}: export policy refuses sealing to itself", "recipient")
            if r not in allowed:
                why = ("export-recipients " + ",".join(self.recipients)) if self.recipients \
                    else "its trust store"
                raise PolicyError(f"{centre_id}: export policy refuses recipient {r!r} (not in {why})", "recipient")
        for i in ipcs:
            if i <= 0 or i > self.max_ipc:
                raise PolicyError(f"{centre_id}: export policy refuses ipc {i} (export-max-ipc {self.max_ipc})", "ipc")
        if full and not self.real:
            raise PolicyError(f"{centre_id}: export policy refuses real patches (export-real is off)", "real")


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
    policy: ExportPolicy = field(default_factory=ExportPolicy)
    key_passphrase: str = ""         # where the key passphrase comes from: env:NAME, file:PATH, fd:N

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
            policy=ExportPolicy.from_node_config(get),
            key_passphrase=str(get("key-passphrase", "") or ""),
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
        out.update(self.policy.to_node_config())
        if self.key_passphrase:
            out["key-passphrase"] = self.key_passphrase
        return out

    def node_config_string(self) -> str:
        """``--node-config`` value for ``flower-supernode`` (quoted strings, bare ints)."""
        parts = []
        for k, v in self.to_node_config().items():
            parts.append(f'{k}={v}' if isinstance(v, int) else f'{k}="{v}"')
        return " ".join(parts)


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
        from histodd_fed.federation import local_work

        try:
            ident = local_work.load_or_create_identity(self.config)
        except HistoddError as exc:  # cannot prove anything: the coordinator will refuse the reply
            log.warning("%s: cannot sign the %s reply: %s", self.config.centre_id, action, exc)
            return
        purpose = PROOF_IDENTITY if action == ACTION_IDENTITY else PROOF_REPLY
        st = statement(purpose, str(nonce), self.config.centre_id, run_id, node_id, ident.public.sign_key_id,
                       reply_digest(reply.body))
        reply.body["proof"] = sign_statement(ident, st)

    # ------------------------------------------------------------------ actions
    def identity(self, request: Envelope) -> Envelope:
        from histodd_fed.federation import local_work

        nonce = str(request.body.get("nonce", ""))
        if len(nonce) < 32:
            raise ProtocolError("identity request lacks a fresh nonce (at least 128 bits)")
        ident = local_work.load_or_create_identity(self.config)
        body: dict[str, Any] = {"identity": ident.public.to_dict(), "preset": self.preset.name,
                                "export_policy": self.config.policy.summary()}
        if request.body.get("prepare", True):
            prepared = local_work.prepare(self.config, self.preset)
            body.update(prepared.summary())
        return Envelope(body=body)

    def distil(self, request: Envelope) -> Envelope:
        from histodd_fed.bundle.releases import ReleaseBudgetError
        from histodd_fed.bundle.trust import TrustStore
        from histodd_fed.federation import local_work, slide_level

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
        prepared = local_work.prepare(self.config, self.preset)
        with_slides = slide_level.has_slides(prepared.train)
        blobs: dict[str, bytes] = {}
        items: list[dict[str, Any]] = []
        decided = {"export_policy": policy.summary(), "decided_by": f"centre {self.config.centre_id}"}
        for ipc in ipcs:
            parts = [("patch", f"ipc{ipc}", False)] + ([("slides", f"ipc{ipc}-slides", True)] if with_slides else [])
            for part, name, per_slide in parts:
                res = local_work.distil_cached(self.config, self.preset, prepared, ipc=ipc, seed=seed,
                                               per_slide=per_slide)
                item = {"name": name, "row": f"ipc{ipc}", "part": part, "ipc": ipc, "mode": "synthetic",
                        "images": len(res.patchset), "config_hash": res.config_hash, "cached": res.cached,
                        "distil_seconds": res.seconds}
                extra = {"row": f"ipc{ipc}", "part": part, "ipc": ipc, **decided}
                if per_slide:
                    item["m_per_slide"] = extra["m_per_slide"] = self.preset.slide_ipc
                blocked, report, message = local_work.gate_report(res.patchset, prepared)
                item["privacy"] = report.get("gate", {})
                if blocked and policy.gate:  # never sealed, never sent; the coordinator reports it
                    items.append(dict(item, blocked=True, error=scrub(message, self.config), bytes=0))
                    continue
                if blocked:  # gate off by the centre's own policy: sealed, the decision recorded
                    report = dict(report, accepted_risk=True,
                                  accepted_by=f"centre {self.config.centre_id} policy export-gate=off")
                try:  # the release budget (per recipient, the centre's release ledger) decides last
                    data = local_work.seal_for(self.config, res.patchset, recipients, label=name,
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
            report = dict(local_work.full_privacy_report(prepared),
                          accepted_by=f"centre {self.config.centre_id} policy export-real=true")
            total = prepared.summary()["n_train_total"]
            item = {"name": "full", "row": "full", "part": "both", "ipc": None, "mode": "full",
                    "images": len(prepared.train), "train_total": total,
                    "config_hash": prepared.config_hash, "cached": True, "distil_seconds": 0.0,
                    "privacy": report.get("gate", {})}
            try:
                data = local_work.seal_for(self.config, prepared.train, recipients, label="full",
                                           privacy_report=report,
                                           extra={"row": "full", "part": "both", "train_total": total, **decided})
            except ReleaseBudgetError as exc:
                items.append(dict(item, blocked=True, budget=True, error=scrub(str(exc), self.config), bytes=0))
            else:
                blobs["full"] = self.faults.on_bundle(data)
                items.append(dict(item, bytes=len(data)))
        return Envelope(body={"bundles": items, "recipients": recipients}, blobs=blobs)

    def train(self, request: Envelope) -> Envelope:
        """Fine-tune per row; every row's labels come from the opened, verified manifests.

        The coordinator's listing only groups blobs into rows; source, mode, ipc and the row name
        are read from what the bundles' signers sealed, and a listing that disagrees with them is
        refused for that row.
        """
        from histodd_fed.federation import local_work

        epochs = self.config.policy.check_epochs(self.config.centre_id,
                                                 request.body.get("epochs", self.preset.fine_tune_epochs))
        prepared = local_work.prepare(self.config, self.preset)
        rows: list[dict[str, Any]] = []
        if request.body.get("baseline", True):  # one "no transfer" row per reported protocol
            rows.extend(local_work.evaluate_baseline(self.config, self.preset.for_protocol(p), prepared)
                        for p in self.preset.protocols())
        groups: dict[str, list[dict[str, Any]]] = {}
        for item in request.body.get("bundles", []):
            name = str(item["name"])
            if name not in request.blobs:
                raise ProtocolError(f"train request names bundle {name!r} but does not carry it")
            groups.setdefault(str(item.get("row") or name), []).append(item)
        for row_name, items in groups.items():
            row: dict[str, Any] = {"name": row_name, "bytes": sum(len(request.blobs[str(i["name"])]) for i in items),
                                   "bundles": [str(i["name"]) for i in items]}
            by_part = {str(i.get("part") or "both"): request.blobs[str(i["name"])] for i in items}
            patch = by_part.get("patch", by_part.get("both"))
            slides = by_part.get("slides", by_part.get("both"))
            try:
                res = local_work.fine_tune_on_bundles(self.config, self.preset, prepared, patch=patch,
                                                      slides=slides, epochs=epochs)
                labels = _labels_from_manifests(res.get("received_from") or [], patch, slides)
                others = res.pop("by_protocol", None) or {}
                rows.append({**row, **res, **labels, "ok": True})
                rows.extend({**row, **r, **labels, "ok": True} for r in others.values())
            except HistoddError as exc:
                row.update(ok=False, **error_fields(exc, self.config.centre_id, f"train row {row_name}"))
                rows.append(row)
        return Envelope(body={"rows": rows, "epochs": epochs})


def reply_digest(body: dict[str, Any]) -> str:
    """Digest of a reply body as signed (everything except the proof itself)."""
    return digest({k: v for k, v in body.items() if k != "proof"})


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
