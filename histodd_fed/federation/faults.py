"""Faults: what went wrong with which centre, and deliberate fault injection for drills.

The coordinator records a :class:`Fault` for a centre that does not answer in time, replies with
an error, presents an identity it does not trust, or returns a bundle that fails verification;
the study goes on without that centre's contribution and the report lists the faults.

:class:`FaultInjection` makes a centre misbehave on purpose (node config ``fault=...``) so the
coordinator's handling can be exercised end to end, through real Flower runs:
``hang:<seconds>`` or ``hang:<action>:<seconds>`` (wait before answering; :meth:`FaultInjection.release` ends it), ``tamper`` (flip a byte in every sealed bundle),
``error`` (fail every request).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from histodd_fed.errors import ConfigError, HistoddError

FAULT_KINDS = ("timeout", "error", "untrusted", "bad_bundle", "missing", "blocked", "policy")


@dataclass
class Fault:
    """One problem with one centre during a study."""

    centre: str
    stage: str        # identity | distil | train
    kind: str         # one of FAULT_KINDS (``blocked``: the source's privacy gate refused the set;
                      # ``policy``: the source's own export policy does not allow that row)
    detail: str

    def line(self) -> str:
        return f"{self.centre} [{self.stage}] {self.kind}: {self.detail}"


class InjectedFault(HistoddError):
    """Raised by a centre told to fail (fault injection ``error``)."""


@dataclass(frozen=True)
class FaultInjection:
    """A deliberate misbehaviour of a centre (for drills and tests); parsed from ``spec``."""

    hang_s: float = 0.0
    hang_action: str = ""     # "" = every action
    tamper: bool = False
    error: bool = False
    #: set by :meth:`release`: a hang still waiting ends at once with InjectedFault (its request abandoned)
    _released: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

    @classmethod
    def parse(cls, spec: str | None) -> "FaultInjection":
        if not spec:
            return cls()
        hang, action, tamper, error = 0.0, "", False, False
        for part in str(spec).split(","):
            part = part.strip()
            if part.startswith("hang:"):
                bits = part.split(":")
                action = bits[1] if len(bits) == 3 else ""
                try:
                    hang = float(bits[-1])
                except ValueError:
                    raise ConfigError(f"fault spec {spec!r}: bad hang seconds") from None
            elif part == "tamper":
                tamper = True
            elif part == "error":
                error = True
            elif part:
                raise ConfigError(f"fault spec {spec!r}: unknown part {part!r} (hang:S, hang:ACTION:S, tamper, error)")
        return cls(hang, action, tamper, error)

    def before_reply(self, action: str) -> None:
        if self.error:
            raise InjectedFault(f"injected failure in {action}")
        if self.hang_s > 0 and self.hang_action in ("", action) and self._released.wait(self.hang_s):
            raise InjectedFault(f"{action}: hang released, request abandoned")

    def release(self) -> None:
        """End this centre's hangs now (waiting and later ones): their requests are abandoned, not answered. A
        drill's caller uses it when it stops waiting, so a hung request does not wake later and go on working."""
        self._released.set()

    def on_bundle(self, data: bytes) -> bytes:
        if not self.tamper or not data:
            return data
        b = bytearray(data)
        b[len(b) // 2] ^= 0x01
        return bytes(b)
