"""The transport-neutral message body exchanged between coordinator and centres.

An :class:`Envelope` is a JSON-able ``body`` (small fields: ids, options, metrics) plus named
binary ``blobs`` (sealed bundles, public identities). The Flower adapter maps the body to a
``ConfigRecord`` and each blob to a chunked uint8 ``ArrayRecord``; the in-process transport passes
it as is. Message actions are the names below (Flower type ``query.<action>``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from histodd_fed.errors import HistoddError

ACTION_IDENTITY = "identity"
ACTION_DISTIL = "distil"
ACTION_TRAIN = "train"
ACTIONS = (ACTION_IDENTITY, ACTION_DISTIL, ACTION_TRAIN)

PROTOCOL_VERSION = 1


class ProtocolError(HistoddError):
    """A message that does not follow the centre/coordinator protocol."""


@dataclass
class Envelope:
    """A JSON-able body plus named byte blobs."""

    body: dict[str, Any] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)

    def body_json(self) -> str:
        return json.dumps(self.body, sort_keys=True, default=str)

    @property
    def nbytes(self) -> int:
        """Bytes carried: blobs plus the JSON body."""
        return sum(len(b) for b in self.blobs.values()) + len(self.body_json().encode())

    def require(self, key: str) -> Any:
        """The body field ``key``; ProtocolError when absent."""
        if key not in self.body:
            raise ProtocolError(f"message body lacks field {key!r}")
        return self.body[key]


# ---------------------------------------------------------------------------- attestations
# A centre proves who it is (and that a reply is its own) by signing a statement with its Ed25519
# bundle-signing key: the coordinator's fresh nonce, the centre id, the Flower run id and the Flower
# node id the message reached. A node cannot answer for another centre (it lacks that key), nor
# relay another node's proof (the node id would differ), nor replay an old one (the nonce would).
PROOF_IDENTITY = "histodd-identity-proof-v1"
PROOF_REPLY = "histodd-reply-proof-v1"
NONCE_HEX = 64


def canonical(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces) of a JSON-able value."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def signed_body(body: dict[str, Any]) -> bytes:
    """The bytes a reply's proof binds (``content_sha256``): the canonical reply body without its proof."""
    return canonical({k: v for k, v in body.items() if k != "proof"})


def attestation(centre: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
    """A verified reply as the report keeps it: the proof plus the exact signed bytes, so a reader can
    check it offline (``statement_b64``: the bytes the signature covers; ``body_b64``: the bytes whose
    SHA-256 is the statement's ``content_sha256``; histodd_fed/federation/report_verify.py)."""
    import base64

    proof = body["proof"]
    return {"centre": centre, "action": action, "proof": proof,
            "statement_b64": base64.b64encode(canonical(proof["statement"])).decode(),
            "body_b64": base64.b64encode(signed_body(body)).decode()}


def digest(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(canonical(obj)).hexdigest()


def new_nonce() -> str:
    import os

    return os.urandom(NONCE_HEX // 2).hex()


def statement(purpose: str, nonce: str, centre_id: str, run_id: Any, node_id: Any,
              sign_key_id: str, content: str = "") -> dict[str, Any]:
    """The signed statement; ``content`` is the digest of the reply's payload (rows), if any."""
    return {"purpose": purpose, "nonce": str(nonce), "centre_id": str(centre_id), "run_id": str(run_id),
            "node_id": str(node_id), "sign_key_id": str(sign_key_id), "content_sha256": str(content)}


def sign_statement(identity: Any, st: dict[str, Any]) -> dict[str, Any]:
    """``{"statement": st, "signature": base64}`` signed with ``identity``'s Ed25519 key."""
    import base64

    return {"statement": st, "signature": base64.b64encode(identity.sign(canonical(st))).decode()}


def check_proof(proof: Any, expected: dict[str, Any], pub: Any) -> str | None:
    """None when ``proof`` is ``expected`` signed by ``pub`` (a PublicIdentity); else why not."""
    import base64
    import binascii

    from cryptography.exceptions import InvalidSignature

    if not isinstance(proof, dict) or not isinstance(proof.get("statement"), dict):
        return "no signed proof in the reply"
    st = proof["statement"]
    for k, v in expected.items():
        if st.get(k) != v:
            return f"proof {k} is {str(st.get(k))[:80]!r}, expected {str(v)[:80]!r}"
    if set(st) != set(expected):
        return "proof statement has unexpected fields"
    try:
        sig = base64.b64decode(str(proof.get("signature", "")), validate=True)
        pub.verify_key().verify(sig, canonical(st))
    except (binascii.Error, ValueError, InvalidSignature):
        return f"proof signature does not verify with the pinned key {pub.sign_key_id} of {pub.centre_id}"
    return None


def reply_digest(body: dict[str, Any]) -> str:
    """Digest of a reply body as signed (everything except the proof itself)."""
    return digest({k: v for k, v in body.items() if k != "proof"})


def bundle_rows(request: "Envelope") -> dict[str, list[dict[str, Any]]]:
    """A train request's bundle items grouped by the row they feed (``row``, else the bundle's own name), in
    request order; a named bundle the request does not carry is a :class:`ProtocolError`."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for item in request.body.get("bundles", []):
        name = str(item["name"])
        if name not in request.blobs:
            raise ProtocolError(f"train request names bundle {name!r} but does not carry it")
        groups.setdefault(str(item.get("row") or name), []).append(item)
    return groups
