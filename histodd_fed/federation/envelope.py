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
