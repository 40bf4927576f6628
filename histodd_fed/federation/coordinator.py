"""The coordinator's study logic (plain Python): discover, check, relay, collect.

It talks to centres through a :class:`Transport` (Flower's Grid in the ServerApp, or the
in-process :class:`LocalTransport`). It holds only public identities (a trust store): it checks
each centre's identity against it, verifies every bundle's signature and addressing
(``histodd_fed.bundle.verify``), and relays bundles still encrypted to their target. It never
holds a decryption key.

Three message rounds in all: identity (every node), distil (every source, in parallel),
train (every target, in parallel). Verified bundles are cached under the study directory keyed
by their request's config hash, so a restarted coordinator does not ask again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from histodd_fed.atomic import atomic_write_bytes, atomic_write_json
from histodd_fed.errors import ConfigError, HistoddError
from histodd_fed.federation.envelope import (ACTION_DISTIL, ACTION_IDENTITY, ACTION_TRAIN, PROOF_IDENTITY,
                                             PROOF_REPLY, Envelope, attestation, check_proof, new_nonce,
                                             statement)
from histodd_fed.federation.faults import Fault
from histodd_fed.runconfig import config_hash

log = logging.getLogger(__name__)


BUNDLE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Transport(Protocol):
    """How the coordinator reaches centres (``run_id``: the Flower run, bound into every proof)."""

    run_id: int

    def node_ids(self) -> list[int]: ...

    def exchange(self, requests: list[tuple[int, str, Envelope]], timeout: float) -> dict[int, Envelope | str]:
        """Send ``(node_id, action, request)``; return replies (or an error string) by node id.

        Nodes missing from the result did not answer within ``timeout`` seconds.
        """
        ...


@dataclass
class StudyConfig:
    """One transfer study (paper Table 5 analogue)."""

    source: str = "C1"
    target: str = "C2"
    ipcs: list[int] = field(default_factory=lambda: [10])
    full: bool = True
    both_directions: bool = False
    fine_tune_epochs: int = 5
    seed: int = 0
    preset: str = "cpu"
    reply_timeout: float = 900.0
    identity_timeout: float = 900.0
    discovery_timeout: float = 120.0   # wait this long for the expected centres to connect
    study_dir: Path = Path("results/transfer/latest")
    trust: Path | None = None          # coordinator trust store (public identities only)
    runtime: str = "simulation"
    #: extra sets a source sends (benchmark studies): ``{"name", "kind": "coreset", "method", "ipc"}`` (real
    #: patches, only under the source's explicit real-data policy) or ``{"name", "kind": "variant", "ipc",
    #: "overrides"}`` (Histo-DD with distillation config overrides); see federation/extras.py
    extras: list[dict[str, Any]] = field(default_factory=list)
    #: several sources into one target (benchmark studies): every source is asked for the same sets and the
    #: target receives them POOLED, one row per set kind (all sources' ipc 10 sets together, all their Full
    #: data together); empty: ``source`` alone
    sources: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.study_dir = Path(self.study_dir)
        self.trust = Path(self.trust) if self.trust else None
        self.ipcs = [int(i) for i in self.ipcs]
        self.sources = [str(s) for s in self.sources]
        if any(i <= 0 for i in self.ipcs):
            raise ConfigError(f"ipc values must be positive, got {self.ipcs}")
        if len(set(self.sources)) != len(self.sources):
            raise ConfigError(f"sources repeat a centre: {self.sources}")
        if self.sources and self.both_directions:
            raise ConfigError("several sources go into one target: not with both directions")
        if self.target in self.source_list():
            raise ConfigError("source and target must differ")

    def source_list(self) -> list[str]:
        """The sources: ``sources`` when given, else ``[source]``."""
        return list(self.sources) or [self.source]

    def pooled(self) -> bool:
        """True when the target receives several sources' sets pooled into one row per set kind."""
        return len(self.source_list()) > 1

    def directions(self) -> list[tuple[str, str]]:
        d = [(s, self.target) for s in self.source_list()]
        if self.both_directions:
            d.append((self.target, self.source))
        return d

    def cache_key(self, src: str, tgt: str) -> dict[str, Any]:
        key = {"source": src, "target": tgt, "ipcs": self.ipcs, "full": self.full, "seed": self.seed,
               "preset": self.preset}
        if self.extras:
            key["extras"] = self.extras
        return key


@dataclass
class StudyOutcome:
    """Rows (one per target x transfer kind), faults, bytes and timings."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    centres: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    attestations: list[dict[str, Any]] = field(default_factory=list)   # signed replies, for the report


def _check_identity(centre: str, ident: Any, trust) -> str | None:
    """None when ``ident`` matches the pinned identity of ``centre``; else why not."""
    from histodd_fed.bundle.identity import PublicIdentity

    try:
        pub = PublicIdentity.from_dict(ident, where=f"identity of {centre}")
    except HistoddError as exc:
        return str(exc)
    if pub.centre_id != centre:
        return f"identity names {pub.centre_id!r}"
    pinned = trust.centres.get(centre) if trust is not None else None
    if pinned is None:
        return f"centre {centre!r} is not in the coordinator's trust store"
    if (pinned.sign_key_id, pinned.kem_key_id) != (pub.sign_key_id, pub.kem_key_id):
        return f"key {pub.sign_key_id} is not the pinned key {pinned.sign_key_id}"
    return None


def _verify_bundle(data: bytes, src: str, tgt: str, trust) -> str | None:
    """None when ``data`` is a validly signed bundle from ``src`` addressed to ``tgt``."""
    from histodd_fed.bundle import verify

    try:
        header = verify(data, trust)
    except HistoddError as exc:
        return f"{type(exc).__name__}: {exc}"
    sender = _get(header, "sender")
    recipients = _get(header, "recipients") or []
    if sender is not None and sender != src:
        return f"bundle signed by {sender!r}, expected {src!r}"
    ids = {r if isinstance(r, str) else (_get(r, "centre_id") or "") for r in recipients}
    if recipients and tgt not in ids:
        return f"bundle not addressed to {tgt!r} (recipients {sorted(ids)})"
    return None


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _check_reply_proof(purpose: str, rep: Envelope, centre: str, nonce: str, run_id: Any, node_id: Any,
                       trust) -> str | None:
    """None when ``rep`` is signed by ``centre``'s pinned key over (nonce, centre, run, node, body)."""
    from histodd_fed.federation.envelope import reply_digest

    pinned = trust.centres.get(centre) if trust is not None else None
    if pinned is None:
        return f"centre {centre!r} is not in the coordinator's trust store"
    if pinned.sign_key_id in trust.revoked_key_ids():
        return f"key {pinned.sign_key_id} of {centre} was revoked"
    want = statement(purpose, nonce, centre, run_id, node_id, pinned.sign_key_id, reply_digest(rep.body))
    return check_proof(rep.body.get("proof"), want, pinned)


def _reply_fault(centre: str, action: str, rep: Any, timeout: float, *, nonce: str = "", run_id: Any = 0,
                 node_id: Any = 0, trust=None, out: "StudyOutcome | None" = None) -> Fault | None:
    """The fault a reply represents (a timeout, an error reply, an unattributable reply), or None.

    A good reply must carry the centre's signature over the request's nonce, the run, the node and
    the reply body; it is then kept in ``out.attestations`` so the report's rows are attributable.
    """
    if rep is None:
        return Fault(centre, action, "timeout", f"no reply within {timeout:g}s")
    if isinstance(rep, str) or not rep.body.get("ok", False):
        return Fault(centre, action, "error", rep if isinstance(rep, str) else str(rep.body.get("error"))[:500])
    if rep.body.get("centre_id") != centre:
        return Fault(centre, action, "untrusted", f"reply names centre {str(rep.body.get('centre_id'))[:64]!r}")
    why = _check_reply_proof(PROOF_REPLY, rep, centre, nonce, run_id, node_id, trust)
    if why:
        return Fault(centre, action, "untrusted", why)
    if out is not None:
        out.attestations.append(attestation(centre, action, rep.body))
    return None


def run_transfer_study(transport: Transport, cfg: StudyConfig,
                       on_event: Callable[[str], None] | None = None) -> StudyOutcome:
    """Run the study over ``transport``; never raises for a misbehaving centre (faults instead)."""
    from histodd_fed.bundle.trust import TrustStore

    say = on_event or (lambda m: log.info("%s", m))
    t0 = time.perf_counter()
    out = StudyOutcome()
    trust = TrustStore.load(cfg.trust) if cfg.trust else None
    if trust is None or not trust.centres:
        raise ConfigError(f"coordinator trust store {cfg.trust} holds no centre identities")
    cache_dir = cfg.study_dir / "cache"

    # 1. discover ---------------------------------------------------------------
    expected = len({c for d in cfg.directions() for c in d})
    deadline = time.monotonic() + cfg.discovery_timeout
    nodes = list(transport.node_ids())
    while len(nodes) < expected and time.monotonic() < deadline:
        time.sleep(1.0)
        nodes = list(transport.node_ids())
    say(f"{len(nodes)} node(s) connected; asking for identities")
    run_id = getattr(transport, "run_id", 0)
    nonces = {n: new_nonce() for n in nodes}
    replies = transport.exchange([(n, ACTION_IDENTITY, Envelope(body={"prepare": True, "nonce": nonces[n]}))
                                  for n in nodes], cfg.identity_timeout)
    out.messages["identity"] = len(nodes)
    node_of: dict[str, int] = {}
    for n in nodes:
        rep = replies.get(n)
        if rep is None:
            out.faults.append(Fault(f"node {n}", "identity", "timeout", f"no reply within {cfg.identity_timeout:g}s"))
            continue
        if isinstance(rep, str) or not rep.body.get("ok", False):
            err = rep if isinstance(rep, str) else rep.body.get("error")
            cid = "?" if isinstance(rep, str) else rep.body.get("centre_id", "?")
            out.faults.append(Fault(f"{cid} (node {n})", "identity", "error", str(err)[:500]))
            continue
        cid = str(rep.body.get("centre_id"))[:64]
        # the claimed id must come with a signature by that centre's pinned key over this run's
        # fresh nonce and this node's id: a node holding another key cannot pose as cid
        why = _check_identity(cid, rep.body.get("identity"), trust) or \
            _check_reply_proof(PROOF_IDENTITY, rep, cid, nonces[n], run_id, n, trust)
        if why:
            out.faults.append(Fault(cid, "identity", "untrusted", f"node {n}: {why}"))
            continue
        if cid in node_of:
            out.faults.append(Fault(cid, "identity", "untrusted",
                                    f"node {n}: a second node (also node {node_of[cid]}) proved centre {cid}; "
                                    "both excluded"))
            out.centres.pop(cid, None)
            node_of[cid] = -1
            continue
        node_of[cid] = n
        out.attestations.append(attestation(cid, "identity", rep.body))
        out.centres[cid] = {k: rep.body.get(k) for k in ("class_counts", "n_train", "n_test", "preset",
                                                         "baseline", "seconds", "prepared_hash", "export_policy")}
        out.centres[cid]["sign_key_id"] = (rep.body.get("identity") or {}).get("sign_key_id")
        say(f"{cid}: trusted identity, {rep.body.get('n_train')} train / {rep.body.get('n_test')} test patches")
    node_of = {c: n for c, n in node_of.items() if n >= 0}

    # 2. bundles from sources (cached) ------------------------------------------------
    bundles: dict[tuple[str, str], list[tuple[dict[str, Any], bytes]]] = {}
    ask: list[tuple[int, str, Envelope]] = []
    ask_dir: dict[int, tuple[str, str]] = {}
    for src, tgt in cfg.directions():
        for who in (src, tgt):
            if who not in node_of and not any(f.centre == who for f in out.faults):
                out.faults.append(Fault(who, "identity", "missing", "centre not connected"))
        if src not in node_of or tgt not in node_of:
            continue
        key = _bundle_key(cfg, out, src, tgt)
        cached = _load_cached_bundles(cache_dir, key)
        if cached is not None:
            cached, blocked = cached
            say(f"{src}->{tgt}: reusing {len(cached)} cached verified bundle(s)")
            bundles[(src, tgt)] = cached
            out.faults.extend(Fault(src, "distil", "blocked", f"{b.get('name')}: {b.get('error')}") for b in blocked)
            continue
        # ask only for what the source's own policy allows: "Full" needs its explicit export-real
        policy = out.centres[src].get("export_policy") or {}
        full = bool(cfg.full and policy.get("real") is True)
        if cfg.full and not full:
            out.faults.append(Fault(src, "distil", "policy", "no Full row: the centre's export policy keeps "
                                    "real patches home (export-real is off)"))
        ipcs = [i for i in cfg.ipcs if i <= int(policy.get("max_ipc", max(cfg.ipcs or [0])))]
        for i in sorted(set(cfg.ipcs) - set(ipcs)):
            out.faults.append(Fault(src, "distil", "policy", f"no ipc{i} row: above the centre's export-max-ipc "
                                    f"{policy.get('max_ipc')}"))
        if not ipcs and not full:
            continue
        body = {"recipients": [tgt], "ipcs": ipcs, "full": full, "seed": cfg.seed, "nonce": new_nonce()}
        if cfg.extras:
            body["extras"] = cfg.extras
        ask.append((node_of[src], ACTION_DISTIL, Envelope(body=body)))
        ask_dir[node_of[src]] = (src, tgt)
    # one distil message per source node (both directions run in parallel)
    if ask:
        say(f"asking {len(ask)} source(s) to distil and seal: ipc {cfg.ipcs}{' + full' if cfg.full else ''}")
        replies = _exchange_grouped(transport, ask, cfg.reply_timeout)
        out.messages["distil"] = len(ask)
        nonce_of = {n: env.body["nonce"] for n, _, env in ask}
        for n, (src, tgt) in ask_dir.items():
            rep = replies.get(n)
            fault = _reply_fault(src, "distil", rep, cfg.reply_timeout, nonce=nonce_of[n], run_id=run_id, node_id=n,
                                 trust=trust, out=out)
            if fault is not None:
                out.faults.append(fault)
                continue
            good = []
            for item in rep.body.get("bundles", []):
                if not isinstance(item, dict) or not BUNDLE_NAME_RE.match(str(item.get("name", ""))):
                    # a source-chosen name becomes a file name in the cache and a blob key: refuse
                    bad = str(item.get("name") if isinstance(item, dict) else item)[:80]
                    out.faults.append(Fault(src, "distil", "bad_bundle", f"refused bundle name {bad!r} "
                                            "(allowed: letters, digits, . _ -; at most 64)"))
                    continue
                if item.get("blocked"):  # the source's export gate refused it: reported, never sent
                    out.faults.append(Fault(src, "distil", "blocked", f"{item.get('name')}: {item.get('error')}"))
                    continue
                data = rep.blobs.get(item.get("name", ""))
                if data is None:
                    out.faults.append(Fault(src, "distil", "bad_bundle", f"{item.get('name')}: announced, not sent"))
                    continue
                why = _verify_bundle(data, src, tgt, trust)
                if why:
                    out.faults.append(Fault(src, "distil", "bad_bundle", f"{item.get('name')}: {why}"))
                    continue
                item = dict(item, source=src, target=tgt, sha256=hashlib.sha256(data).hexdigest())
                good.append((item, data))
            bundles[(src, tgt)] = good
            say(f"{src}->{tgt}: {len(good)} bundle(s) verified")
            if len(good) == len([i for i in rep.body.get("bundles", []) if not i.get("blocked")]) and good \
                    and not any(f.centre == src and f.kind == "bad_bundle" for f in out.faults):
                _store_cached_bundles(cache_dir, _bundle_key(cfg, out, src, tgt), good,
                                      [i for i in rep.body.get("bundles", []) if i.get("blocked")])

    # 3. relay to targets, collect metrics -----------------------------------------------
    ask = []
    ask_tgt: dict[int, list[tuple[str, str]]] = {}
    tgt_of: dict[int, str] = {}
    for src, tgt in cfg.directions():  # every connected target reports "no transfer", sets received or not
        if tgt in node_of:
            ask_tgt.setdefault(node_of[tgt], [])
            tgt_of[node_of[tgt]] = tgt
    for (src, tgt), items in bundles.items():
        n = node_of[tgt]
        ask_tgt.setdefault(n, []).append((src, tgt))
        tgt_of[n] = tgt
    # pooled (several sources, one target): every source's set of a kind goes into ONE row of the target
    pool = "+".join(cfg.source_list()) if cfg.pooled() else None
    for n, pairs in ask_tgt.items():
        blobs: dict[str, bytes] = {}
        listed = []
        for src, tgt in pairs:
            for item, data in bundles[(src, tgt)]:
                name = f"{src}-{item['name']}"
                blobs[name] = data
                listed.append({"name": name, "source": src, "ipc": item.get("ipc"), "mode": item.get("mode"),
                               "row": f"{pool or src}-{item.get('row') or item['name']}", "part": item.get("part"),
                               "train_total": item.get("train_total"), "m_per_slide": item.get("m_per_slide")})
        ask.append((n, ACTION_TRAIN, Envelope(body={"bundles": listed, "epochs": cfg.fine_tune_epochs,
                                                    "baseline": True, "nonce": new_nonce()}, blobs=blobs)))
    if ask:
        say(f"relaying bundles to {len(ask)} target(s) for fine-tuning ({cfg.fine_tune_epochs} epochs)")
        replies = transport.exchange(ask, cfg.reply_timeout)
        out.messages["train"] = len(ask)
        nonce_of = {n: env.body["nonce"] for n, _, env in ask}
        for n, tgt in tgt_of.items():
            rep = replies.get(n)
            fault = _reply_fault(tgt, "train", rep, cfg.reply_timeout, nonce=nonce_of[n], run_id=run_id, node_id=n,
                                 trust=trust, out=out)
            if fault is not None:
                out.faults.append(fault)
                continue
            for row in rep.body.get("rows", []):
                row = dict(row, target=tgt, attested_by=out.attestations[-1]["proof"]["statement"]["sign_key_id"])
                if not row.get("ok", True):
                    out.faults.append(Fault(tgt, "train", "bad_bundle", f"{row.get('name')}: {row.get('error')}"))
                    continue
                out.rows.append(row)
    out.seconds = round(time.perf_counter() - t0, 2)
    return out


def _bundle_key(cfg: StudyConfig, out: StudyOutcome, src: str, tgt: str) -> dict[str, Any]:
    """Cache key of src->tgt bundles: the study settings plus both centres' data and keys."""
    key = cfg.cache_key(src, tgt)
    for who in (src, tgt):
        info = out.centres.get(who, {})
        key[f"{who}_state"] = [info.get("prepared_hash"), info.get("sign_key_id"), info.get("export_policy")]
    return key


def _exchange_grouped(transport: Transport, ask: list[tuple[int, str, Envelope]], timeout: float):
    """Exchange, sending at most one message per node per round (a node serves one at a time)."""
    replies: dict[int, Envelope | str] = {}
    pending = list(ask)
    while pending:
        seen: set[int] = set()
        batch, rest = [], []
        for item in pending:
            (rest if item[0] in seen else batch).append(item)
            seen.add(item[0])
        replies.update(transport.exchange(batch, timeout))
        pending = rest
    return replies


def _cache_path(cache_dir: Path, key: dict[str, Any]) -> Path:
    return cache_dir / f"bundles-{key['source']}-{key['target']}-{config_hash(key)[:16]}"


def _load_cached_bundles(cache_dir: Path, key: dict[str, Any]):
    d = _cache_path(cache_dir, key)
    index = d / "index.json"
    if not index.exists():
        return None
    try:
        index_data = json.loads(index.read_text())
        items = index_data["bundles"]
        out = []
        for item in items:
            sha = str(item["sha256"])
            if not re.fullmatch(r"[0-9a-f]{64}", sha) or not BUNDLE_NAME_RE.match(str(item.get("name", ""))):
                return None
            data = (d / f"{sha}.bundle").read_bytes()
            if hashlib.sha256(data).hexdigest() != sha:
                return None
            out.append((item, data))
        return out, list(index_data.get("blocked", []))
    except (OSError, KeyError, json.JSONDecodeError):
        return None


def _store_cached_bundles(cache_dir: Path, key: dict[str, Any], items: list[tuple[dict[str, Any], bytes]],
                          blocked: list[dict[str, Any]] | None = None) -> None:
    d = _cache_path(cache_dir, key)
    for item, data in items:  # files named by digest: nothing a source chose reaches a path
        atomic_write_bytes(d / f"{hashlib.sha256(data).hexdigest()}.bundle", data)
    atomic_write_json(d / "index.json", {"key": key, "bundles": [i for i, _ in items], "blocked": blocked or []})


class LocalTransport:
    """In-process transport: each node is a :class:`CentreNode` answered on its own thread.

    Used to debug the study logic without Flower; a node that exceeds the timeout is simply
    missing from the replies, as with Flower. A late node's work still runs to its end on a
    non-daemon thread (its reply is dropped): the interpreter waits for it at exit instead of
    freezing it mid-way, which aborts the process when the thread is inside torch (autograd's C++
    frames cannot be unwound).
    """

    def __init__(self, nodes: dict[int, Any], run_id: int = 1):
        self.nodes = nodes
        self.run_id = run_id

    def node_ids(self) -> list[int]:
        return sorted(self.nodes)

    def exchange(self, requests, timeout):
        results: dict[int, Envelope | str] = {}
        threads = []

        def work(n: int, action: str, env: Envelope) -> None:
            results[n] = self.nodes[n].handle(action, env, run_id=self.run_id, node_id=n)

        for n, action, env in requests:
            th = threading.Thread(target=work, args=(n, action, env), name=f"local-node-{n}")
            th.start()
            threads.append(th)
        deadline = time.monotonic() + timeout
        for th in threads:
            th.join(max(0.0, deadline - time.monotonic()))
        return {n: results[n] for n, _, _ in requests if n in results}
