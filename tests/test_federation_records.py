"""Flower record adapter: bytes <-> chunked uint8 ArrayRecord, body <-> ConfigRecord."""

import hashlib
import os

import numpy as np
import pytest

from histodd_fed.federation.envelope import Envelope, ProtocolError
from histodd_fed.federation.flower_records import (array_record_to_bytes, bytes_to_array_record,
                                                   envelope_to_recorddict, recorddict_to_envelope)


def test_bytes_roundtrip_in_chunks():
    data = os.urandom(3 * 1000 + 7)
    rec = bytes_to_array_record(data, chunk_size=1000)
    assert sorted(rec.keys()) == [f"chunk-{i:06d}" for i in range(4)]
    assert all(rec[k].dtype == "uint8" for k in rec.keys())
    assert array_record_to_bytes(rec, len(data), hashlib.sha256(data).hexdigest()) == data


def test_empty_bytes_roundtrip():
    assert array_record_to_bytes(bytes_to_array_record(b"")) == b""


def test_damaged_or_incomplete_payload_is_refused():
    data = os.urandom(2500)
    rec = bytes_to_array_record(data, chunk_size=1000)
    with pytest.raises(ProtocolError, match="SHA-256"):
        array_record_to_bytes(rec, len(data), hashlib.sha256(b"other").hexdigest())
    del rec["chunk-000001"]
    with pytest.raises(ProtocolError, match="chunk"):
        array_record_to_bytes(rec)


def test_envelope_roundtrip_keeps_nested_body_and_blobs():
    env = Envelope(body={"ipcs": [10, 20], "nested": {"a": None, "b": 1.5}}, blobs={"x": b"\x00" * 10, "y": b""})
    back = recorddict_to_envelope(envelope_to_recorddict(env, chunk_size=4, metrics={"acc": 0.5, "s": "no"}))
    assert back.body == env.body and back.blobs == env.blobs


def test_missing_body_is_a_protocol_error():
    from flwr.app import RecordDict

    with pytest.raises(ProtocolError, match="body"):
        recorddict_to_envelope(RecordDict())
