"""The one adapter between Flower records and :class:`Envelope` (the only module importing flwr).

- bytes  <-> ``ArrayRecord`` of uint8 chunks (``chunk-000000``, ...) plus length and SHA-256;
  Flower splits each array into 5 MB transport chunks, we keep our own chunks at most
  ``chunk_size`` bytes so no single numpy array gets huge.
- body dict <-> ``ConfigRecord`` holding one JSON string (nested values survive).
- flat numeric metrics <-> ``MetricRecord``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from histodd_fed.federation.envelope import Envelope, ProtocolError

DEFAULT_CHUNK = 4 * 1024 * 1024
BODY_KEY = "body"
BLOB_PREFIX = "blob."
METRICS_KEY = "metrics"


def bytes_to_array_record(data: bytes, chunk_size: int = DEFAULT_CHUNK) -> ArrayRecord:
    """Pack ``data`` into an ArrayRecord of 1-D uint8 arrays of at most ``chunk_size`` bytes."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    view = np.frombuffer(data, dtype=np.uint8)
    arrays: dict[str, Array] = {}
    for i, start in enumerate(range(0, len(view), chunk_size)):
        arrays[f"chunk-{i:06d}"] = Array(np.ascontiguousarray(view[start:start + chunk_size]))
    rec = ArrayRecord(arrays) if arrays else ArrayRecord()
    return rec


def array_record_to_bytes(record: ArrayRecord, expected_len: int | None = None,
                          expected_sha256: str | None = None) -> bytes:
    """Concatenate the uint8 chunks of ``record`` in order; check length and hash when given."""
    keys = sorted(record.keys())
    for j, k in enumerate(keys):
        if k != f"chunk-{j:06d}":
            raise ProtocolError(f"byte record: unexpected or missing chunk key {k!r}")
    parts = []
    for k in keys:
        arr = record[k]
        if arr.dtype != "uint8" or len(arr.shape) != 1:
            raise ProtocolError(f"byte record: chunk {k} is {arr.dtype}{list(arr.shape)}, expected uint8[n]")
        parts.append(arr.numpy().tobytes())
    data = b"".join(parts)
    if expected_len is not None and len(data) != expected_len:
        raise ProtocolError(f"byte record: got {len(data)} bytes, expected {expected_len}")
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise ProtocolError("byte record: SHA-256 mismatch (payload damaged in transit)")
    return data


def dict_to_config_record(body: dict[str, Any]) -> ConfigRecord:
    """A ConfigRecord holding ``body`` as one JSON string (nested dicts/lists allowed)."""
    return ConfigRecord({"json": json.dumps(body, sort_keys=True, default=str)})


def config_record_to_dict(record: ConfigRecord) -> dict[str, Any]:
    if "json" not in record:
        raise ProtocolError("config record lacks its 'json' field")
    try:
        out = json.loads(str(record["json"]))
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"config record: invalid JSON ({exc})") from None
    if not isinstance(out, dict):
        raise ProtocolError("config record: JSON body is not an object")
    return out


def dict_to_metric_record(metrics: dict[str, Any]) -> MetricRecord:
    """Flat numeric metrics (non-numeric and non-finite values are dropped)."""
    clean: dict[str, float | int] = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            clean[k] = int(v)
        elif isinstance(v, (int, np.integer)):
            clean[k] = int(v)
        elif isinstance(v, (float, np.floating)) and np.isfinite(v):
            clean[k] = float(v)
    return MetricRecord(clean)


def envelope_to_recorddict(env: Envelope, chunk_size: int = DEFAULT_CHUNK,
                           metrics: dict[str, Any] | None = None) -> RecordDict:
    """Body -> ConfigRecord ``body``; each blob -> ArrayRecord ``blob.<name>`` (+ its length/hash)."""
    body = dict(env.body)
    body["_blobs"] = {name: {"len": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                      for name, b in env.blobs.items()}
    rd = RecordDict({BODY_KEY: dict_to_config_record(body)})
    for name, blob in env.blobs.items():
        rd[BLOB_PREFIX + name] = bytes_to_array_record(blob, chunk_size)
    if metrics:
        rd[METRICS_KEY] = dict_to_metric_record(metrics)
    return rd


def recorddict_to_envelope(rd: RecordDict) -> Envelope:
    """Inverse of :func:`envelope_to_recorddict`; checks every blob's length and SHA-256."""
    if BODY_KEY not in rd.config_records:
        raise ProtocolError("message lacks its 'body' config record")
    body = config_record_to_dict(rd.config_records[BODY_KEY])
    index = body.pop("_blobs", {}) or {}
    blobs: dict[str, bytes] = {}
    for name, info in index.items():
        key = BLOB_PREFIX + name
        if key not in rd.array_records:
            raise ProtocolError(f"message lacks blob {name!r}")
        blobs[name] = array_record_to_bytes(rd.array_records[key], int(info["len"]), str(info["sha256"]))
    return Envelope(body=body, blobs=blobs)
