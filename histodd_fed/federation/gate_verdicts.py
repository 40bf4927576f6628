"""The export gate's verdicts on a centre's outgoing sets, kept so that a set gated once is not gated again.

A benchmark sends the same cached set of a source in every study it takes part in (``--target all``: each
source's set of a seed goes to four targets), and the gate on it is most of a cached study's time at the source
(~70 s per source and seed on one CPU thread: benchmarks/results/gate_verdict_reuse.jsonl). A verdict is reused only
when all of these are the same:

- the set (content hash of its images, labels, slide table, kind and metadata),
- the reference patches the gate compares it with (content hash),
- the gate's configuration file (``configs/privacy.yaml``, its bytes),
- the code (a digest of every ``histodd_fed`` source file): any change to the package re-runs the gate.

Each record is sealed with an HMAC-SHA256 under a per-centre key in its key folder (``gate-verdicts.key``, mode
0600, made on first use): a record edited or planted in the work directory by someone who cannot read the key
folder is ignored (logged) and the gate runs again. The bundle sealed from a reused verdict carries the same
privacy report the first run produced.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any, Callable

from histodd_fed.atomic import atomic_write_bytes, atomic_write_json
from histodd_fed.content_hash import data_hash
from histodd_fed.errors import InputError
from histodd_fed.patchset import PatchSet
from histodd_fed.runconfig import config_hash

log = logging.getLogger(__name__)

KEY_FILE = "gate-verdicts.key"
RECORDS_DIR = "gate-verdicts"
_PACKAGE = Path(__file__).resolve().parents[1]           # histodd_fed/
_GATE_CONFIG = _PACKAGE.parent / "configs" / "privacy.yaml"

Verdict = tuple[bool, dict[str, Any], str]               # (blocked, privacy report, message)


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """SHA-256 over every ``histodd_fed`` source file (path and bytes) and the gate's configuration file."""
    h = hashlib.sha256()
    for p in sorted(_PACKAGE.rglob("*.py")):
        h.update(str(p.relative_to(_PACKAGE)).encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(_GATE_CONFIG.read_bytes() if _GATE_CONFIG.exists() else b"no gate config")
    return h.hexdigest()


def verdict_key(ps: PatchSet, reference: PatchSet) -> str:
    """What a verdict is a verdict on: the set (pixels, labels, slide table, kind and metadata), the reference
    patches and the gate's code and configuration."""
    about = config_hash({"kind": ps.kind, "meta": ps.meta, "slide_labels": ps.slide_labels})
    return hashlib.sha256(f"{data_hash(ps)}:{about}:{data_hash(reference)}:{code_digest()}".encode()).hexdigest()


def _mac_key(key_dir: Path) -> bytes:
    """The centre's record key (32 random bytes), made once: written aside and linked into place, so two
    processes starting at once end up with the same key."""
    path = Path(key_dir) / KEY_FILE
    if not path.exists():
        tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        atomic_write_bytes(tmp, secrets.token_bytes(32), mode=0o600)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    key = path.read_bytes()
    if len(key) != 32:
        raise InputError(f"{path}: not a gate-verdict key (expected 32 bytes, found {len(key)}); delete it to "
                         "make a new one (the recorded verdicts are then gated again)")
    return key


def _seal(mac_key: bytes, body: dict[str, Any]) -> str:
    return hmac.new(mac_key, json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), "sha256").hexdigest()


def _load(path: Path, key: str, mac_key: bytes) -> Verdict | None:
    """The record at ``path`` when it is one this centre sealed for ``key``; None (logged when it exists but is
    not) otherwise."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        body = {k: rec[k] for k in ("key", "blocked", "report", "message")}
        ok = (hmac.compare_digest(str(rec["mac"]), _seal(mac_key, body)) and body["key"] == key
              and isinstance(body["blocked"], bool) and isinstance(body["report"], dict)
              and isinstance(body["message"], str))
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        log.warning("%s: not a gate verdict this centre sealed for this set; ignored, the gate runs again", path)
        return None
    return body["blocked"], body["report"], body["message"]


def cached_gate(ps: PatchSet, reference: PatchSet, *, work_dir: Path, key_dir: Path,
                gate: Callable[[], Verdict]) -> Verdict:
    """``gate()``'s verdict on ``ps`` (checked against ``reference``), reused from this centre's sealed record
    when one exists for the same set, reference, code and configuration; recorded otherwise."""
    key = verdict_key(ps, reference)
    mac_key = _mac_key(key_dir)
    path = Path(work_dir) / RECORDS_DIR / f"{key[:32]}.json"
    found = _load(path, key, mac_key)
    if found is not None:
        log.info("gate verdict reused for set %s (%s)", key[:12], "blocked" if found[0] else "passed")
        return found
    blocked, report, message = gate()
    try:
        recordable = json.loads(json.dumps(report)) == report
    except (TypeError, ValueError):
        recordable = False
    if not recordable:  # a report JSON would change is not kept: a reused verdict is always the one first given
        log.warning("gate verdict for set %s not recorded: its report does not survive JSON unchanged", key[:12])
        return blocked, report, message
    body = {"key": key, "blocked": bool(blocked), "report": report, "message": str(message)}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**body, "mac": _seal(mac_key, body)})
    return bool(blocked), report, str(message)
