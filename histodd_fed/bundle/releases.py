"""The sender's release ledger and release budget (``releases.json`` in the centre's key dir).

Every synthetic (or real) set a centre seals for a recipient leaks a little about its patients;
the coordinator can ask again and again (new seeds, new ipcs). This module lets the CENTRE cap
what any one recipient accumulates:

- ``max_releases``: distinct sets a recipient may receive (DP or not). A set is identified by its
  content digest (:func:`set_digest`: images, labels, slide index, class names); re-exporting the
  identical set to the same recipient is not a new release, a set with a new seed (new content) is.
- ``max_epsilon``: a differentially private set (``meta["dp"] = {"epsilon", "delta", "accountant"}``)
  whose epsilon is above it is never sealed.
- ``max_epsilon_total``: the sum of the epsilons of all DP releases to one recipient (basic sequential
  composition: the sum is an upper bound on the privacy loss of all of them together, with the sum of
  the deltas; tighter accounting is not attempted) may not exceed it.

A non-DP set has no epsilon and NO formal bound: it counts toward ``max_releases`` only.

The ledger is written like the replay ledger (:mod:`histodd_fed.bundle.statefile`): under a file lock,
to a temporary file renamed into place, the directory fsync'd, with a state marker beside it
(``.releases.json.state``) so a ledger that vanished or was rolled back to an older copy refuses
every export (fail closed) instead of silently resetting every budget. :meth:`ReleaseLedger.claim`
checks the budget, runs the sealing block and records the release only if the block succeeds, all
under one lock: a refused or failed export writes nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from histodd_fed.bundle.errors import KeyFileError
from histodd_fed.bundle.statefile import StateFile, now_iso
from histodd_fed.errors import HistoddError, InputError

RELEASES_FILE = "releases.json"
RELEASES_VERSION = 1

DEFAULT_MAX_EPSILON = 8.0
DEFAULT_MAX_EPSILON_TOTAL = 16.0
DEFAULT_MAX_RELEASES = 10
COMPOSITION = "basic (sum of epsilons)"
_TOL = 1e-9


class ReleaseBudgetError(HistoddError):
    """An export the centre's release budget does not allow (nothing is sealed or recorded)."""


def _fmt(x: float) -> str:
    return f"{x:.6g}"


# ---------------------------------------------------------------------------- what a set releases
def dp_of(meta: dict[str, Any] | None, where: str = "set") -> dict[str, Any] | None:
    """The set's DP guarantee ``{"epsilon", "delta", "accountant"}`` from ``meta["dp"]``, or None.

    A malformed record (epsilon not a finite number >= 0, delta not in [0, 1), accountant not a
    string), or a method named ``*-dp`` without a record, is an :class:`InputError`: a set that
    claims DP without an accounting it can show is not exported as DP, nor silently as non-DP.
    """
    meta = meta or {}
    dp = meta.get("dp")
    method = str(meta.get("method") or "")
    if dp is None:
        if method.endswith("-dp"):
            raise InputError(f"{where}: method {method!r} is differentially private but meta has no 'dp' record")
        return None
    if not isinstance(dp, dict):
        raise InputError(f"{where}: meta 'dp' must be an object with epsilon, delta, accountant")
    eps, delta, acc = dp.get("epsilon"), dp.get("delta"), dp.get("accountant")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise InputError(f"{where}: meta dp epsilon must be a finite number >= 0, got {eps!r}")
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta < 1:
        raise InputError(f"{where}: meta dp delta must be a number in [0, 1), got {delta!r}")
    if not isinstance(acc, str) or not acc:
        raise InputError(f"{where}: meta dp accountant must be a non-empty string, got {acc!r}")
    return {"epsilon": float(eps), "delta": float(delta), "accountant": acc}


def set_digest(ps) -> str:
    """SHA-256 of a patch set's content (what a recipient learns): images, labels, slide index,
    coords, class names and slide table; not its kind or free-form meta. Arrays are hashed in one
    fixed dtype each, so the set in memory and the same set loaded from disk have one digest."""
    import numpy as np

    h = hashlib.sha256(b"histodd-set-content/v1\x00")
    head = {"class_names": list(ps.class_names), "slide_ids": list(ps.slide_ids or []),
            "slide_labels": {str(k): int(v) for k, v in (ps.slide_labels or {}).items()}}
    h.update(json.dumps(head, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    for name, dtype in (("images", np.uint8), ("labels", np.int64), ("slide_index", np.int64), ("coords", np.int64)):
        a = getattr(ps, name, None)
        if a is None:
            h.update(f"\x00{name}:none".encode())
            continue
        a = np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<"))
        h.update(f"\x00{name}:{a.dtype.str}:{tuple(a.shape)}".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


@dataclass(frozen=True)
class SetRelease:
    """What sealing one set releases: its content digest, method, seed, ipc, kind and DP guarantee."""

    digest: str
    kind: str = "synthetic"
    method: str | None = None
    seed: int | None = None
    ipc: int | None = None
    dp: dict[str, Any] | None = None

    @property
    def epsilon(self) -> float | None:
        return None if self.dp is None else float(self.dp["epsilon"])

    @classmethod
    def of(cls, ps, seed: int | None = None, where: str = "set") -> "SetRelease":
        meta = dict(ps.meta or {})
        if seed is None and isinstance(meta.get("seed"), int) and not isinstance(meta.get("seed"), bool):
            seed = meta["seed"]
        ipc = meta.get("ipc")
        counts = ps.class_counts()
        if ipc is None and counts and len(set(counts.values())) == 1:
            ipc = next(iter(counts.values()))
        return cls(digest=set_digest(ps), kind=str(ps.kind), method=str(meta["method"]) if meta.get("method") else None,
                   seed=int(seed) if seed is not None else None, ipc=int(ipc) if isinstance(ipc, int) else None,
                   dp=dp_of(meta, where))


@dataclass(frozen=True)
class ReleaseBudget:
    """The centre's per-recipient release budget (see the module docstring)."""

    max_epsilon: float = DEFAULT_MAX_EPSILON
    max_epsilon_total: float = DEFAULT_MAX_EPSILON_TOTAL
    max_releases: int = DEFAULT_MAX_RELEASES

    def __post_init__(self) -> None:
        from histodd_fed.errors import ConfigError

        for name in ("max_epsilon", "max_epsilon_total"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"release budget {name.replace('_', '-')}: expected a finite number >= 0, got {v!r}")
        if isinstance(self.max_releases, bool) or not isinstance(self.max_releases, int) or self.max_releases < 0:
            raise ConfigError(f"release budget max-releases: expected an integer >= 0, got {self.max_releases!r}")

    def summary(self) -> dict[str, Any]:
        return {"max_epsilon": self.max_epsilon, "max_epsilon_total": self.max_epsilon_total,
                "max_releases": self.max_releases, "composition": COMPOSITION}


# ---------------------------------------------------------------------------- the ledger
@dataclass
class Claim:
    """What :meth:`ReleaseLedger.claim` decided: per recipient ``{"count", "epsilon_total", "new"}``
    after this release; set ``bundle_id`` inside the block to record it."""

    recipients: dict[str, dict[str, Any]]
    bundle_id: str | None = None

    def manifest(self) -> dict[str, dict[str, Any]]:
        """The manifest's ``release`` field: per recipient, the release count and epsilon spent."""
        return {r: {"count": v["count"], "epsilon_total": v["epsilon_total"]} for r, v in self.recipients.items()}


@dataclass
class ReleaseLedger:
    """``releases.json``: every set this centre has released, per recipient (keyed by content digest)."""

    path: Path
    _entries: dict[str, dict] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @classmethod
    def in_key_dir(cls, key_dir: str | Path) -> "ReleaseLedger":
        return cls(Path(key_dir) / RELEASES_FILE)

    @property
    def _state(self) -> StateFile:
        return StateFile(self.path, "histodd-releases", "release ledger", "refusing to export without it")

    @property
    def marker(self) -> Path:
        return self._state.marker

    def _read(self) -> dict[str, dict]:
        d, marker = self._state.read()
        if d is None:
            return {}
        if d.get("format_version") != RELEASES_VERSION or not isinstance(d.get("releases"), dict):
            raise KeyFileError(f"{self.path}: not a histodd release ledger")
        rel = d["releases"]
        self._state.check_entries(len(rel), marker)
        return rel

    def _write(self, rel: dict[str, dict]) -> None:
        self._state.write({"format": "histodd-releases", "format_version": RELEASES_VERSION,
                           "composition": COMPOSITION, "releases": rel}, len(rel))

    def _locked(self):
        return self._state.locked()

    # -------------------------------------------------------------- queries
    def entries(self) -> dict[str, dict]:
        return dict(self._read())

    @staticmethod
    def _used(rel: dict[str, dict], recipient: str) -> tuple[int, float]:
        mine = [e for e in rel.values() if e.get("recipient") == recipient]
        return len(mine), float(sum(e["epsilon"] for e in mine if e.get("epsilon") is not None))

    def used(self, recipient: str) -> tuple[int, float]:
        """(distinct sets released to ``recipient``, sum of their epsilons)."""
        return self._used(self._read(), recipient)

    def find_bundle(self, bundle_id: str) -> dict[str, dict]:
        """For a bundle this centre sealed: per recipient, the release entry and what the bundle's
        manifest recorded (``{"entry", "count", "epsilon_total"}``); empty if not sealed here."""
        out = {}
        for e in self._read().values():
            b = (e.get("bundles") or {}).get(bundle_id)
            if isinstance(b, dict):
                out[e["recipient"]] = {"entry": e, "count": b.get("count"), "epsilon_total": b.get("epsilon_total")}
        return out

    # -------------------------------------------------------------- the decision
    def _decide(self, rel: dict[str, dict], release: SetRelease, recipients: list[str],
                budget: ReleaseBudget, who: str) -> Claim:
        eps = release.epsilon
        if eps is not None and eps > budget.max_epsilon + _TOL:
            raise ReleaseBudgetError(
                f"{who}: release budget max-epsilon refuses a DP set with epsilon {_fmt(eps)} "
                f"(per-release cap {_fmt(budget.max_epsilon)})")
        out: dict[str, dict[str, Any]] = {}
        for r in dict.fromkeys(recipients):
            n, spent = self._used(rel, r)
            if f"{r}:{release.digest}" in rel:  # the identical set again: not a new release
                out[r] = {"count": n, "epsilon_total": spent, "new": False}
                continue
            if n + 1 > budget.max_releases:
                raise ReleaseBudgetError(
                    f"{who}: release budget max-releases for {r}: {n} of {budget.max_releases} sets already "
                    f"released, this new set would be release {n + 1}")
            if eps is not None and spent + eps > budget.max_epsilon_total + _TOL:
                raise ReleaseBudgetError(
                    f"{who}: release budget max-epsilon-total for {r}: epsilon {_fmt(spent)} of "
                    f"{_fmt(budget.max_epsilon_total)} used, this set requests {_fmt(eps)} "
                    f"(total {_fmt(spent + eps)}, {COMPOSITION})")
            out[r] = {"count": n + 1, "epsilon_total": spent + (eps or 0.0), "new": True}
        return Claim(recipients=out)

    def check(self, release: SetRelease, recipients: list[str], budget: ReleaseBudget,
              who: str = "export") -> Claim:
        """Raise :class:`ReleaseBudgetError` if sealing ``release`` for ``recipients`` exceeds ``budget``."""
        return self._decide(self._read(), release, recipients, budget, who)

    @contextlib.contextmanager
    def claim(self, release: SetRelease, recipients: list[str], budget: ReleaseBudget,
              who: str = "export") -> Iterator[Claim]:
        """Under the lock: check the budget, run the block (sealing), record only if it succeeds."""
        with self._locked():
            rel = self._read()
            claim = self._decide(rel, release, recipients, budget, who)
            yield claim
            now = now_iso()
            for r, v in claim.recipients.items():
                key = f"{r}:{release.digest}"
                e = rel.get(key)
                if e is None:
                    e = rel[key] = {"recipient": r, "digest": release.digest, "kind": release.kind,
                                    "method": release.method, "seed": release.seed, "ipc": release.ipc,
                                    "dp": release.dp, "epsilon": release.epsilon, "release": v["count"],
                                    "epsilon_total": v["epsilon_total"], "time": now, "exports": 0,
                                    "bundles": {}}
                e["exports"] = int(e.get("exports", 0)) + 1
                e["last_export"] = now
                if claim.bundle_id:  # what this bundle's manifest says (inspect --keys reads it back)
                    e.setdefault("bundles", {})[claim.bundle_id] = {
                        "count": v["count"], "epsilon_total": v["epsilon_total"], "time": now}
            self._write(rel)
