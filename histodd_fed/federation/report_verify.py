"""Check a transfer study's report against the centres' signatures (``coordinator verify-report R``).

``R/report.json`` keeps, for every reply the coordinator accepted, the exact bytes the centre signed
(``attestations[i]``: ``statement_b64``, the canonical statement the Ed25519 signature covers, and
``body_b64``, the canonical reply body whose SHA-256 the statement names; ``proof`` holds the
statement decoded and the signature). A reader with the consortium's public identities checks,
without trusting whoever wrote or carried the report:

1. every attestation: the statement is canonical and equals its decoded copy, its signer and key are
   pinned (not revoked) in the reader's trust store, the signature verifies over those bytes, the
   body hashes to the statement's ``content_sha256`` and names the same centre; one run id for all,
   no nonce twice;
2. ``rows`` (the table) equal what :func:`histodd_fed.federation.study.table_rows` derives from the
   rows of the signed metrics (``train``) replies, each with its signer as ``target`` and its key id
   as ``attested_by``; ``raw_rows`` are exactly those signed rows (none added, changed or left out);
3. when present, ``results.csv`` and ``results.md``'s table equal that table;
4. ``centres`` (class counts, patch counts, baseline, policy) equal each centre's signed identity reply.

The first failure raises a :class:`ReportError` subclass whose one-line message names the row (or
attestation) and why. Faults, timings of the study and the configuration are the coordinator's own
statements and are not signed by anyone.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histodd_fed.errors import HistoddError
from histodd_fed.federation.envelope import PROOF_IDENTITY, PROOF_REPLY, canonical, statement

#: the largest report.json read (a study's report is kilobytes to a few megabytes)
MAX_REPORT_BYTES = 64 * 1024 * 1024
#: identity-reply fields the coordinator copies into ``report.json["centres"]``
CENTRE_FIELDS = ("class_counts", "n_train", "n_test", "preset", "baseline", "seconds", "prepared_hash",
                 "export_policy")
STATEMENT_KEYS = frozenset(statement("", "", "", "", "", ""))


class ReportError(HistoddError):
    """A report that does not check out against the centres' signatures."""


class ReportFormatError(ReportError):
    """report.json is missing, unreadable or not shaped like a study report."""


class ReportSignatureError(ReportError):
    """A signed reply in the report whose signature, signer or signed bytes do not check out."""


class ReportMismatchError(ReportError):
    """A number (or row) the report shows that differs from what the centres signed."""


@dataclass
class ReportCheck:
    """What a successful check covered."""

    rows: int = 0
    raw_rows: int = 0
    attestations: int = 0
    signers: dict[str, str] = field(default_factory=dict)   # centre -> sign key id
    files: list[str] = field(default_factory=list)


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ReportSignatureError(f"{what} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ReportSignatureError(f"{what} is not base64") from None


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:   # a reader's eye and this check would see different values
            raise ValueError(f"duplicate key {k[:40]!r}")
        out[k] = v
    return out


def _json(data: bytes, what: str, exc_type: type[ReportError]) -> Any:
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=_unique)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        why = str(exc)[:60] if str(exc).startswith("duplicate key") else type(exc).__name__
        raise exc_type(f"{what} is not JSON ({why})") from None


def load_report(study_dir: str | Path) -> dict[str, Any]:
    """``study_dir/report.json`` (or the file itself), bounded and shape-checked."""
    p = Path(study_dir)
    f = p / "report.json" if p.is_dir() else p
    try:
        with open(f, "rb") as fh:
            data = fh.read(MAX_REPORT_BYTES + 1)
    except OSError as exc:
        raise ReportFormatError(f"{f}: unreadable report ({exc.strerror or exc})") from None
    if len(data) > MAX_REPORT_BYTES:
        raise ReportFormatError(f"{f}: larger than {MAX_REPORT_BYTES} bytes")
    rep = _json(data, f"{f}", ReportFormatError)
    if not isinstance(rep, dict):
        raise ReportFormatError(f"{f}: not a study report")
    for k in ("rows", "raw_rows", "attestations"):
        if not isinstance(rep.get(k), list) or not all(isinstance(x, dict) for x in rep[k]):
            raise ReportFormatError(f"{f}: no list of objects under {k!r} (a report from before signed bodies "
                                    "were kept cannot be checked)")
    return rep


def _check_attestation(i: int, att: dict[str, Any], trust) -> tuple[dict[str, Any], dict[str, Any]]:
    """(statement, body) of attestation ``i`` once its signature and bytes check out."""
    from cryptography.exceptions import InvalidSignature

    from histodd_fed.bundle.errors import RevokedSignerError, UntrustedSignerError

    where = f"attestation {i} ({str(att.get('centre'))[:64]} {str(att.get('action'))[:16]})"
    proof = att.get("proof")
    if not isinstance(proof, dict):
        raise ReportSignatureError(f"{where}: no signed proof")
    raw_st = _b64(att.get("statement_b64"), f"{where}: signed statement")
    st = _json(raw_st, f"{where}: signed statement", ReportSignatureError)
    if not isinstance(st, dict) or set(st) != STATEMENT_KEYS or not all(isinstance(v, str) for v in st.values()):
        raise ReportSignatureError(f"{where}: signed statement is not a reply statement")
    if canonical(st) != raw_st:
        raise ReportSignatureError(f"{where}: signed statement bytes are not canonical")
    if proof.get("statement") != st:
        raise ReportSignatureError(f"{where}: the statement shown differs from the signed statement")
    if st["centre_id"] != att.get("centre"):
        raise ReportSignatureError(f"{where}: signed by {st['centre_id']!r}, shown as {att.get('centre')!r}")
    identity = att.get("action") == "identity"
    if st["purpose"] != (PROOF_IDENTITY if identity else PROOF_REPLY):
        raise ReportSignatureError(f"{where}: signed purpose {st['purpose']!r} does not match the action")
    try:
        pub = trust.signer(st["centre_id"], st["sign_key_id"])
    except (UntrustedSignerError, RevokedSignerError) as exc:
        raise ReportSignatureError(f"{where}: {exc}") from None
    sig = _b64(proof.get("signature"), f"{where}: signature")
    try:
        pub.verify_key().verify(sig, raw_st)
    except (InvalidSignature, ValueError):
        raise ReportSignatureError(f"{where}: signature does not verify with the pinned key {pub.sign_key_id} "
                                   f"of {pub.centre_id}") from None
    raw_body = _b64(att.get("body_b64"), f"{where}: signed body")
    if hashlib.sha256(raw_body).hexdigest() != st["content_sha256"]:
        raise ReportSignatureError(f"{where}: signed body does not hash to the signed content_sha256")
    body = _json(raw_body, f"{where}: signed body", ReportSignatureError)
    if not isinstance(body, dict) or body.get("centre_id") != st["centre_id"] or body.get("ok") is not True:
        raise ReportSignatureError(f"{where}: signed body is not an accepted reply of {st['centre_id']}")
    return st, body


def _row_label(row: dict[str, Any]) -> str:
    if "transfer" in row:
        src = row.get("source")
        head = f"{src}->{row.get('target')}" if src not in (None, "-") else str(row.get("target"))
        return f"{head} {row.get('transfer')} {row.get('protocol')}"
    return f"{row.get('target')} {row.get('name')} {row.get('fine_tune_protocol')}"


def _differs(shown: dict[str, Any], signed: dict[str, Any]) -> str:
    """The first field where ``shown`` and ``signed`` differ, as 'FIELD X shown, Y signed'."""
    for k in sorted(set(shown) | set(signed)):
        if canonical(shown.get(k)) != canonical(signed.get(k)):
            return f"{k} is {str(shown.get(k))[:40]} in the report, {str(signed.get(k))[:40]} signed"
    return "rows differ"


def _check_raw_rows(rep: dict[str, Any], signed: list[dict[str, Any]]) -> None:
    left = [canonical(r) for r in signed]
    for i, row in enumerate(rep["raw_rows"]):
        c = canonical(row)
        if c in left:
            left.remove(c)
            continue
        same = [s for s in signed if _row_label(s) == _row_label(row)]
        why = _differs(row, same[0]) if same else "not signed by any centre in the report"
        raise ReportMismatchError(f"raw row {i} ({_row_label(row)}): {why}")
    if left:
        row = json.loads(left[0])
        raise ReportMismatchError(f"signed row ({_row_label(row)}) is missing from the report's raw rows")


def _check_table(rep: dict[str, Any], expected: list[dict[str, Any]]) -> None:
    shown = rep["rows"]
    for i, (row, want) in enumerate(zip(shown, expected)):
        if canonical(row) != canonical(want):
            raise ReportMismatchError(f"row {i} ({_row_label(row)}): {_differs(row, want)}")
    if len(shown) != len(expected):
        extra = shown[len(expected)] if len(shown) > len(expected) else None
        raise ReportMismatchError(f"row {min(len(shown), len(expected))}"
                                  + (f" ({_row_label(extra)}): not signed" if extra else ": missing")
                                  + f" ({len(shown)} rows shown, {len(expected)} signed)")


def _read_utf8(path: Path) -> str:
    """The file's text, exactly as written (no newline translation); unreadable -> ReportFormatError."""
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportFormatError(f"{path}: unreadable ({exc})") from None


def _check_csv(path: Path, expected: list[dict[str, Any]]) -> None:
    from histodd_fed.federation.study import csv_text

    text = _read_utf8(path)   # as written: csv rows end in \r\n
    want_text = csv_text(expected)
    if text == want_text:
        return
    shown = list(csv.DictReader(io.StringIO(text)))
    want = list(csv.DictReader(io.StringIO(want_text)))
    for i, (row, w) in enumerate(zip(shown, want)):
        if row != w:
            k = next((k for k in w if row.get(k) != w[k]), None) or next(iter(set(row) ^ set(w)), "columns")
            raise ReportMismatchError(f"{path.name} row {i} ({_row_label(w)}): {k} is "
                                      f"{str(row.get(k))[:40]!r} in the file, {str(w.get(k))[:40]!r} signed")
    raise ReportMismatchError(f"{path.name}: {len(shown)} rows shown, {len(want)} signed (or its header differs)")


def _check_markdown(path: Path, expected: list[dict[str, Any]]) -> None:
    from histodd_fed.federation.study import COLUMNS, markdown_table

    text = _read_utf8(path)
    want = markdown_table(expected)
    if want in text:
        return
    want_lines = [ln for ln in want.splitlines() if ln.startswith("| ")][1:]
    shown_lines = [ln for ln in text.splitlines() if ln.startswith("| ")][1:]
    for i, (ln, w) in enumerate(zip(shown_lines, want_lines)):
        if ln != w:
            cells = [c.strip() for c in ln.strip("|").split("|")]
            wcells = [c.strip() for c in w.strip("|").split("|")]
            k = next((j for j in range(len(COLUMNS)) if j >= len(cells) or cells[j] != wcells[j]), 0)
            raise ReportMismatchError(f"{path.name} row {i} ({_row_label(expected[i])}): {COLUMNS[k]} is "
                                      f"{(cells[k] if k < len(cells) else '')[:40]!r} in the file, "
                                      f"{wcells[k][:40]!r} signed")
    raise ReportMismatchError(f"{path.name}: its table is not the signed rows' table")


def _check_centres(rep: dict[str, Any], identities: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> None:
    centres = rep.get("centres") or {}
    if not isinstance(centres, dict):
        raise ReportFormatError("report.json: 'centres' is not an object")
    for cid, info in centres.items():
        if cid not in identities:
            raise ReportMismatchError(f"centre {str(cid)[:64]!r}: no signed identity reply in the report")
        st, body = identities[cid]
        if not isinstance(info, dict):
            raise ReportMismatchError(f"centre {str(cid)[:64]!r}: not an object")
        shown = {k: info.get(k) for k in CENTRE_FIELDS}
        signed = {k: body.get(k) for k in CENTRE_FIELDS}
        if canonical(shown) != canonical(signed):
            raise ReportMismatchError(f"centre {cid}: {_differs(shown, signed)}")
        if info.get("sign_key_id") != st["sign_key_id"]:
            raise ReportMismatchError(f"centre {cid}: sign_key_id {str(info.get('sign_key_id'))[:40]} is not the "
                                      f"signing key {st['sign_key_id']}")


def verify_report(study_dir: str | Path, trust) -> ReportCheck:
    """Check ``study_dir``'s report against ``trust`` (a :class:`~histodd_fed.bundle.trust.TrustStore`).

    Returns what was checked; raises a :class:`ReportError` naming the first bad row otherwise."""
    from histodd_fed.federation.coordinator import StudyOutcome
    from histodd_fed.federation.study import table_rows

    p = Path(study_dir)
    rep = load_report(p)
    folder = p if p.is_dir() else p.parent
    check = ReportCheck()
    signed_rows: list[dict[str, Any]] = []
    identities: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    run_ids: set[str] = set()
    nonces: set[str] = set()
    for i, att in enumerate(rep["attestations"]):
        st, body = _check_attestation(i, att, trust)
        if st["nonce"] in nonces:
            raise ReportSignatureError(f"attestation {i} ({st['centre_id']} {att.get('action')}): "
                                       "its nonce answers another reply too (a replayed reply)")
        nonces.add(st["nonce"])
        run_ids.add(st["run_id"])
        if len(run_ids) > 1:
            raise ReportSignatureError(f"attestation {i} ({st['centre_id']} {att.get('action')}): signed in run "
                                       f"{st['run_id']}, the others in run {sorted(run_ids - {st['run_id']})[0]}")
        check.signers[st["centre_id"]] = st["sign_key_id"]
        if att.get("action") == "identity":
            identities[st["centre_id"]] = (st, body)
        elif att.get("action") == "train":
            rows = body.get("rows", [])
            if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                raise ReportSignatureError(f"attestation {i}: signed rows are not a list of objects")
            signed_rows += [dict(r, target=st["centre_id"], attested_by=st["sign_key_id"])
                            for r in rows if r.get("ok", True)]
    check.attestations = len(rep["attestations"])
    # the table as write_report derives it from the accepted rows, in the order they were signed
    expected = table_rows(StudyOutcome(rows=signed_rows))
    _check_table(rep, expected)
    check.rows = len(expected)
    _check_raw_rows(rep, signed_rows)
    check.raw_rows = len(rep["raw_rows"])
    check.files.append("report.json")
    if (folder / "results.csv").exists():
        _check_csv(folder / "results.csv", expected)
        check.files.append("results.csv")
    if (folder / "results.md").exists():
        _check_markdown(folder / "results.md", expected)
        check.files.append("results.md")
    _check_centres(rep, identities)
    return check
