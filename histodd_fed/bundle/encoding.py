"""Strict base64 for key and header fields: exact length, typed error naming the field."""

from __future__ import annotations

import base64
import binascii


def b64encode(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def b64decode_exact(value: object, n: int, where: str, error: type[Exception]) -> bytes:
    """Decode ``value`` (base64 text) to exactly ``n`` bytes, else raise ``error`` naming ``where``."""
    if not isinstance(value, str):
        raise error(f"{where}: expected base64 text")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise error(f"{where}: invalid base64 ({exc})") from exc
    if len(raw) != n:
        raise error(f"{where}: expected {n} bytes, got {len(raw)}")
    return raw
