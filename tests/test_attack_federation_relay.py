"""Attacks on the coordinator's study logic by centres (issue 14 items 3 and 5), performed as an
attacker would: nodes answering the coordinator's Flower messages with crafted Envelopes.

The nodes here are hostile: they hold real keys (their own, trusted by the coordinator) and sign
their replies like an honest centre, but lie about who they are or what they send.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from histodd_fed.federation.envelope import Envelope


def _keys(root: Path, centres=("C1", "C2", "C3")):
    """Identities for ``centres``, mutual trust, and a coordinator trust store holding all of them."""
    from histodd_fed.bundle.identity import generate_identity
    from histodd_fed.bundle.trust import TrustStore

    ids = {c: generate_identity(c, root / c / "keys") for c in centres}
    for c in centres:
        store = TrustStore.load(root / c / "keys")
        for o in centres:
            if o != c:
                store.add(ids[o].public)
        store.save()
    coord = TrustStore.load(root / "coordinator" / "trust.json")
    for c in centres:
        coord.add(ids[c].public)
    coord.save()
    return ids, root / "coordinator" / "trust.json"


def _patchset(n=8, kind="synthetic"):
    from histodd_fed.patchset import PatchSet

    rng = np.random.default_rng(0)
    return PatchSet(images=rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8), labels=np.arange(n) % 2,
                    class_names=["normal", "tumour"], kind=kind)


class HostileNode:
    """A node that answers with ``replies[action](request, run_id, node_id)`` and signs like a centre.

    ``signer``: the identity whose key signs the proof (its own key: it cannot sign with another
    centre's); ``claim``: the centre id it puts in every reply.
    """

    def __init__(self, claim: str, signer, replies: dict, claim_key: str | None = None):
        self.claim, self.signer, self.replies = claim, signer, replies
        self.claim_key = claim_key or signer.public.sign_key_id  # the key id it says it signed with
        self.seen: list[str] = []

    def handle(self, action, request, *, run_id=0, node_id=0):
        self.seen.append(action)
        reply = self.replies[action](request, run_id, node_id)
        reply.body.setdefault("ok", True)
        reply.body.update(centre_id=self.claim, protocol=1, seconds=0.0)
        nonce = request.body.get("nonce")
        if nonce and "proof" not in reply.body:
            from histodd_fed.federation.centre import reply_digest
            from histodd_fed.federation.envelope import (PROOF_IDENTITY, PROOF_REPLY, sign_statement,
                                                         statement)

            purpose = PROOF_IDENTITY if action == "identity" else PROOF_REPLY
            st = statement(purpose, nonce, self.claim, run_id, node_id, self.claim_key,
                           reply_digest(reply.body))
            reply.body["proof"] = sign_statement(self.signer, st)
        return reply


def _identity_reply(pub, **extra):
    return lambda req, run, node: Envelope(body={"identity": pub.to_dict(), "preset": "tiny", "n_train": 8,
                                                 "n_test": 4, "prepared_hash": "x",
                                                 "export_policy": {"real": False, "max_ipc": 50}, **extra})


def _study(root: Path, trust, **kw):
    from histodd_fed.federation.coordinator import StudyConfig

    return StudyConfig(ipcs=kw.pop("ipcs", [1]), preset="tiny", fine_tune_epochs=1, study_dir=root / "study",
                       trust=trust, runtime="local", discovery_timeout=0, **kw)


def test_attack_node_with_its_own_key_poses_as_another_centre(tmp_path):
    """C3 (trusted as C3) claims to be C1, shows C1's public identity and signs with its own key;
    it also relays the real C1's proof made for another node. Both are refused; nothing is asked of it."""
    from histodd_fed.federation.coordinator import LocalTransport, run_transfer_study

    ids, trust = _keys(tmp_path)
    impostor = HostileNode("C1", ids["C3"], {"identity": _identity_reply(ids["C1"].public),
                                               "distil": lambda r, run, n: Envelope(body={"bundles": []})},
                           claim_key=ids["C1"].public.sign_key_id)
    target = HostileNode("C2", ids["C2"], {"identity": _identity_reply(ids["C2"].public),
                                             "train": lambda r, run, n: Envelope(body={"rows": []})})
    out = run_transfer_study(LocalTransport({5: impostor, 6: target}), _study(tmp_path, trust))
    lines = [f.line() for f in out.faults]
    assert "C1" not in out.centres, lines
    assert impostor.seen == ["identity"], f"the impostor was sent {impostor.seen}"
    assert any(f.centre == "C1" and f.kind == "untrusted" and "signature" in f.detail for f in out.faults), lines
    # a man in the middle: it asks the genuine C1 (a real CentreNode, elsewhere) to sign the nonce
    # and relays that proof; the proof names C1's node, not the relay's, so it is refused too
    from histodd_fed.federation.centre import CentreConfig, CentreNode

    real_c1 = CentreNode(CentreConfig("C1", tmp_path / "nodata", tmp_path / "C1" / "keys", tmp_path / "C1" / "work"))

    def relay(req, run, node):
        rep = real_c1.handle("identity", Envelope(body={"prepare": False, "nonce": req.body["nonce"]}),
                             run_id=run, node_id=1)
        return Envelope(body=dict(rep.body, n_train=8, n_test=4))

    mitm = HostileNode("C1", ids["C3"], {"identity": relay})
    out = run_transfer_study(LocalTransport({7: mitm, 6: target}), _study(tmp_path / "b", trust))
    assert "C1" not in out.centres and mitm.seen == ["identity"], [f.line() for f in out.faults]
    assert any(f.centre == "C1" and "node_id" in f.detail for f in out.faults), [f.line() for f in out.faults]


def test_attack_source_chosen_bundle_name_escapes_the_cache(tmp_path):
    """A trusted but hostile source names its (validly signed) bundle ``../../../escaped``: the
    coordinator must not write outside its cache, and reports the bundle."""
    from histodd_fed.bundle import seal
    from histodd_fed.federation.coordinator import LocalTransport, run_transfer_study

    ids, trust = _keys(tmp_path)
    data = seal(_patchset(), ids["C1"], [ids["C2"].public])
    evil = "../../../escaped"

    def distil(req, run, node):
        return Envelope(body={"bundles": [{"name": evil, "row": "ipc1", "part": "patch", "ipc": 1,
                                           "mode": "synthetic", "images": 8, "bytes": len(data)}]},
                        blobs={evil: data})

    src = HostileNode("C1", ids["C1"], {"identity": _identity_reply(ids["C1"].public), "distil": distil})
    relayed = []

    def train(req, run, node):
        relayed.extend(req.blobs)
        return Envelope(body={"rows": []})

    tgt = HostileNode("C2", ids["C2"], {"identity": _identity_reply(ids["C2"].public), "train": train})
    before = set(tmp_path.rglob("*"))
    cfg = _study(tmp_path, trust)
    out = run_transfer_study(LocalTransport({1: src, 2: tgt}), cfg)
    written = {p for p in set(tmp_path.rglob("*")) - before if p.is_file()}
    escaped = [p for p in written if cfg.study_dir / "cache" not in p.parents]
    assert not escaped, f"written outside the cache: {escaped}"
    assert not (tmp_path / "escaped.bundle").exists()
    assert any(f.kind == "bad_bundle" and "name" in f.detail for f in out.faults), [f.line() for f in out.faults]
    assert not relayed  # nothing relayed from that reply


def test_attack_unsigned_or_foreign_metrics_reply_is_not_reported(tmp_path):
    """A target's metrics reply signed by another key (or not at all) is not put in the report."""
    from histodd_fed.bundle import seal
    from histodd_fed.federation.coordinator import LocalTransport, run_transfer_study

    ids, trust = _keys(tmp_path)
    data = seal(_patchset(), ids["C1"], [ids["C2"].public])

    def distil(req, run, node):
        return Envelope(body={"bundles": [{"name": "ipc1", "row": "ipc1", "part": "patch", "ipc": 1,
                                           "mode": "synthetic", "images": 8, "bytes": len(data)}]},
                        blobs={"ipc1": data})

    def forged_train(req, run, node):  # made up rows, "signed" by C3's key in C2's name
        return Envelope(body={"rows": [{"name": "C1-ipc1", "mode": "synthetic", "patch_balanced_accuracy": 1.0}]})

    src = HostileNode("C1", ids["C1"], {"identity": _identity_reply(ids["C1"].public), "distil": distil})
    tgt = HostileNode("C2", ids["C2"], {"identity": _identity_reply(ids["C2"].public), "train": forged_train})
    tgt_forger = HostileNode("C2", ids["C3"], {"train": forged_train})
    # identity proven by the real C2 key, then the train reply comes from a forger
    transport = LocalTransport({1: src, 2: tgt})
    orig = transport.exchange

    def exchange(requests, timeout):
        if requests and requests[0][1] == "train":
            transport.nodes[2] = tgt_forger
        return orig(requests, timeout)

    transport.exchange = exchange
    out = run_transfer_study(transport, _study(tmp_path, trust))
    assert not out.rows, out.rows
    assert any(f.centre == "C2" and f.stage == "train" and f.kind == "untrusted" for f in out.faults), \
        [f.line() for f in out.faults]
    # the honest path: rows are kept with the signer's key id and the proofs go to the report
    out = run_transfer_study(LocalTransport({1: src, 2: tgt}), _study(tmp_path / "ok", trust))
    assert out.rows and all(r["attested_by"] == ids["C2"].public.sign_key_id for r in out.rows)
    assert {a["action"] for a in out.attestations} >= {"identity", "distil", "train"}


def test_full_row_only_from_an_explicit_source_policy(tmp_path):
    """The coordinator asks for real patches only when the source's own policy allows it."""
    from histodd_fed.federation.coordinator import LocalTransport, run_transfer_study

    ids, trust = _keys(tmp_path)
    asked = []

    def distil(req, run, node):
        asked.append(dict(req.body))
        return Envelope(body={"bundles": []})

    src = HostileNode("C1", ids["C1"], {"identity": _identity_reply(ids["C1"].public), "distil": distil})
    tgt = HostileNode("C2", ids["C2"], {"identity": _identity_reply(ids["C2"].public),
                                          "train": lambda r, run, n: Envelope(body={"rows": []})})
    out = run_transfer_study(LocalTransport({1: src, 2: tgt}), _study(tmp_path, trust, ipcs=[1, 80]))
    assert asked and asked[0]["full"] is False and asked[0]["ipcs"] == [1]
    kinds = {(f.kind, f.detail.split(":")[0]) for f in out.faults if f.kind == "policy"}
    assert len(kinds) == 2, [f.line() for f in out.faults]
