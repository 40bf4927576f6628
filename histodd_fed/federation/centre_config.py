"""A centre's configuration and export policy (the node config a centre runs with, and every limit it puts
on what leaves it). Below :mod:`histodd_fed.federation.centre` and the centre's local work, so neither
imports the other to know its settings."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from histodd_fed.errors import ConfigError, HistoddError


DEFAULT_MAX_IPC = 50
#: release budget defaults (= histodd_fed.bundle.releases.DEFAULT_*, literal so this module stays light)
DEFAULT_MAX_EPSILON = 8.0
DEFAULT_MAX_EPSILON_TOTAL = 16.0
DEFAULT_MAX_RELEASES = 10
#: limits on what a request may override (node config export-max-outer-steps, -inner-steps, -epochs)
DEFAULT_MAX_OUTER_STEPS = 2000
DEFAULT_MAX_INNER_STEPS = 50
DEFAULT_MAX_EPOCHS = 100
MAX_LR_IMG = 100.0
_OVERRIDE_WORD = re.compile(r"^[A-Za-z0-9_+,.-]{1,64}$")


class PolicyError(HistoddError):
    """A request the centre's own export policy does not allow; ``rule``: which rule refused it
    (the reply carries only that rule's fixed message, :mod:`histodd_fed.federation.reply_errors`)."""

    def __init__(self, message: str, rule: str = ""):
        super().__init__(message)
        self.rule = rule


def _as_bool(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    s = str(v).strip().lower()
    if s in ("true", "on", "yes", "1"):
        return True
    if s in ("false", "off", "no", "0", ""):
        return False
    raise ConfigError(f"node config {key!r}: expected true/false, got {v!r}")


def _as_number(get, key: str, default: float) -> float:
    import math

    v = get(key, default)
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"node config {key!r}: expected a number, got {v!r}") from None
    if isinstance(v, bool) or not math.isfinite(x) or x < 0:
        raise ConfigError(f"node config {key!r} must be a finite number >= 0, got {v!r}")
    return x


def _as_count(get, key: str, default: int) -> int:
    v = get(key, default)
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ConfigError(f"node config {key!r}: expected an integer, got {v!r}") from None
    if isinstance(v, bool) or (isinstance(v, float) and v != n) or n < 0:
        raise ConfigError(f"node config {key!r} must be an integer >= 0, got {v!r}")
    return n


def _as_seeds(v: Any) -> tuple[int, ...]:
    items = v if isinstance(v, (list, tuple)) else str(v or "").split(",")
    try:
        return tuple(dict.fromkeys(int(str(x).strip()) for x in items if str(x).strip()))
    except ValueError:
        raise ConfigError(f"node config 'export-seeds': expected comma-separated integers, got {v!r}") from None


@dataclass(frozen=True)
class ExportPolicy:
    """What this centre lets leave it: set by the centre (node config), never widened by a request.

    ``recipients``: centres a bundle may be sealed to (empty tuple: any centre in this centre's own
    trust store). ``max_ipc``: the largest images-per-class a request may ask for. ``real``:
    whether real patches (the "Full" comparison) may ever leave; off by default. ``gate``: the
    privacy export gate on synthetic sets (on by default; off is recorded in every manifest).

    Release budget per recipient (:mod:`histodd_fed.bundle.releases`, the centre's ``releases.json``):
    ``max_epsilon`` caps the epsilon of one DP set, ``max_epsilon_total`` the sum of the epsilons of
    all DP sets released to one recipient (basic composition), ``max_releases`` the number of
    distinct sets (DP or not) one recipient may receive. ``seeds``: the distillation seeds a request
    may ask for (empty: only the centre's own ``seed``); the centre, not the coordinator, decides how
    many differently seeded sets exist.
    """

    recipients: tuple[str, ...] = ()
    max_ipc: int = DEFAULT_MAX_IPC
    real: bool = False
    gate: bool = True
    max_epsilon: float = DEFAULT_MAX_EPSILON
    max_epsilon_total: float = DEFAULT_MAX_EPSILON_TOTAL
    max_releases: int = DEFAULT_MAX_RELEASES
    seeds: tuple[int, ...] = ()
    slide_ids: bool = False   # real slide ids / source indices may leave (else per-bundle pseudonyms)
    max_outer_steps: int = DEFAULT_MAX_OUTER_STEPS   # request overrides: distillation outer steps
    max_inner_steps: int = DEFAULT_MAX_INNER_STEPS   # ... inner steps
    max_epochs: int = DEFAULT_MAX_EPOCHS             # ... fine-tuning epochs of a train request

    @classmethod
    def from_node_config(cls, get) -> "ExportPolicy":
        rec = get("export-recipients", "")
        if isinstance(rec, (list, tuple)):
            recipients = tuple(str(r).strip() for r in rec if str(r).strip())
        else:
            recipients = tuple(r.strip() for r in str(rec or "").split(",") if r.strip())
        try:
            max_ipc = int(get("export-max-ipc", DEFAULT_MAX_IPC))
        except (TypeError, ValueError):
            raise ConfigError(f"node config 'export-max-ipc': expected an integer, got "
                              f"{get('export-max-ipc')!r}") from None
        if max_ipc < 0:
            raise ConfigError(f"node config 'export-max-ipc' must be >= 0, got {max_ipc}")
        return cls(recipients=recipients, max_ipc=max_ipc,
                   real=_as_bool(get("export-real", False), "export-real"),
                   gate=_as_bool(get("export-gate", True), "export-gate"),
                   max_epsilon=_as_number(get, "export-max-epsilon", DEFAULT_MAX_EPSILON),
                   max_epsilon_total=_as_number(get, "export-max-epsilon-total", DEFAULT_MAX_EPSILON_TOTAL),
                   max_releases=_as_count(get, "export-max-releases", DEFAULT_MAX_RELEASES),
                   seeds=_as_seeds(get("export-seeds", "")),
                   slide_ids=_as_bool(get("export-slide-ids", False), "export-slide-ids"),
                   max_outer_steps=_as_count(get, "export-max-outer-steps", DEFAULT_MAX_OUTER_STEPS),
                   max_inner_steps=_as_count(get, "export-max-inner-steps", DEFAULT_MAX_INNER_STEPS),
                   max_epochs=_as_count(get, "export-max-epochs", DEFAULT_MAX_EPOCHS))

    def to_node_config(self) -> dict[str, str | int]:
        out: dict[str, str | int] = {"export-max-ipc": int(self.max_ipc),
                                     "export-real": "true" if self.real else "false",
                                     "export-gate": "on" if self.gate else "off",
                                     "export-max-epsilon": f"{float(self.max_epsilon):g}",
                                     "export-max-epsilon-total": f"{float(self.max_epsilon_total):g}",
                                     "export-max-releases": int(self.max_releases)}
        if self.recipients:
            out["export-recipients"] = ",".join(self.recipients)
        if self.seeds:
            out["export-seeds"] = ",".join(str(x) for x in self.seeds)
        if self.slide_ids:
            out["export-slide-ids"] = "true"
        for key, value, default in (("export-max-outer-steps", self.max_outer_steps, DEFAULT_MAX_OUTER_STEPS),
                                    ("export-max-inner-steps", self.max_inner_steps, DEFAULT_MAX_INNER_STEPS),
                                    ("export-max-epochs", self.max_epochs, DEFAULT_MAX_EPOCHS)):
            if value != default:
                out[key] = int(value)
        return out

    def summary(self) -> dict[str, Any]:
        """What the coordinator (and every manifest) is told of the policy."""
        return {"recipients": list(self.recipients) or "trust-store", "max_ipc": self.max_ipc,
                "real": self.real, "gate": self.gate, "max_epsilon": self.max_epsilon,
                "max_epsilon_total": self.max_epsilon_total, "max_releases": self.max_releases,
                "seeds": list(self.seeds) or "own", "slide_ids": self.slide_ids,
                "max_outer_steps": self.max_outer_steps, "max_inner_steps": self.max_inner_steps,
                "max_epochs": self.max_epochs}

    def budget(self):
        """The release budget (:class:`histodd_fed.bundle.releases.ReleaseBudget`) this policy sets."""
        from histodd_fed.bundle.releases import ReleaseBudget

        return ReleaseBudget(max_epsilon=float(self.max_epsilon), max_epsilon_total=float(self.max_epsilon_total),
                             max_releases=int(self.max_releases))

    def pick_seed(self, centre_id: str, requested: Any, own_seed: int) -> int:
        """The distillation seed for a request: the centre's own unless the request names one this
        policy lists (``export-seeds``); any other seed is refused (each new seed is a new set, i.e.
        a new release)."""
        if requested is None:
            return int(own_seed)
        if isinstance(requested, bool):
            raise PolicyError(f"{centre_id}: request seed must be an integer, got {requested!r}", "seed")
        try:
            seed = int(requested)
        except (TypeError, ValueError):
            raise PolicyError(f"{centre_id}: request seed must be an integer, got {str(requested)[:40]!r}",
                              "seed") from None
        if isinstance(requested, float) and requested != seed:
            raise PolicyError(f"{centre_id}: request seed must be an integer, got {requested!r}", "seed")
        allowed = self.seeds or (int(own_seed),)
        if seed not in allowed:
            why = "export-seeds " + ",".join(map(str, self.seeds)) if self.seeds else f"its own seed {own_seed}"
            raise PolicyError(f"{centre_id}: export policy refuses seed {seed} (the centre picks its seeds: {why}; "
                              "every new seed is a new release)", "seed")
        return seed

    def check_overrides(self, centre_id: str, overrides: Any) -> None:
        """Refuse (``PolicyError``, rule ``override``) a distillation override outside this policy's limits."""
        import math

        if not isinstance(overrides, dict):
            raise PolicyError(f"{centre_id}: overrides must be an object", "override")
        ints = {"outer_steps": self.max_outer_steps, "inner_steps": self.max_inner_steps}
        for key, value in overrides.items():
            if key in ints:
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= ints[key]:
                    raise PolicyError(f"{centre_id}: override {key}={str(value)[:40]} outside 1..{ints[key]}",
                                      "override")
            elif key == "lr_img":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or not 0 < value <= MAX_LR_IMG:
                    raise PolicyError(f"{centre_id}: override lr_img={str(value)[:40]} outside (0, {MAX_LR_IMG}]",
                                      "override")
            elif not isinstance(value, str) or not _OVERRIDE_WORD.match(value):
                raise PolicyError(f"{centre_id}: override {str(key)[:40]} is not a short plain word", "override")

    def check_epochs(self, centre_id: str, epochs: Any) -> int:
        """The fine-tuning epochs a train request asks for, within ``1..max_epochs``."""
        if isinstance(epochs, bool) or not isinstance(epochs, int) or not 1 <= epochs <= self.max_epochs:
            raise PolicyError(f"{centre_id}: train epochs {str(epochs)[:40]} outside 1..{self.max_epochs}", "override")
        return epochs

    def check(self, centre_id: str, recipients: list[str], ipcs: list[int], full: bool,
              trusted: set[str]) -> None:
        """Refuse a distil request this policy does not allow (before any work is done)."""
        if not recipients:
            raise PolicyError(f"{centre_id}: the request names no recipient", "recipient")
        allowed = set(self.recipients) if self.recipients else trusted
        for r in recipients:
            if r == centre_id:
                raise PolicyError(f"{centre_id}: export policy refuses sealing to itself", "recipient")
            if r not in allowed:
                why = ("export-recipients " + ",".join(self.recipients)) if self.recipients \
                    else "its trust store"
                raise PolicyError(f"{centre_id}: export policy refuses recipient {r!r} (not in {why})", "recipient")
        for i in ipcs:
            if i <= 0 or i > self.max_ipc:
                raise PolicyError(f"{centre_id}: export policy refuses ipc {i} (export-max-ipc {self.max_ipc})", "ipc")
        if full and not self.real:
            raise PolicyError(f"{centre_id}: export policy refuses real patches (export-real is off)", "real")


@dataclass
class CentreConfig:
    """A centre's node config (Flower ``--node-config`` keys in dash-case)."""

    centre_id: str
    data: Path                       # slides dir, slide manifest, or a patch-set directory
    key_dir: Path
    work_dir: Path
    preset: str = "cpu"
    seed: int = 0
    fault: str = ""                  # fault injection for drills (see faults.py)
    labels_csv: Path | None = None
    preset_overrides: dict[str, Any] = field(default_factory=dict)
    policy: ExportPolicy = field(default_factory=ExportPolicy)
    key_passphrase: str = ""         # where the key passphrase comes from: env:NAME, file:PATH, fd:N
    workers: int = 1                 # processes a distillation may use (best-of-K candidates at once)

    @classmethod
    def from_node_config(cls, cfg: Mapping[str, Any]) -> "CentreConfig":
        """Build from a Flower node config (``centre-id``, ``data``, ``key-dir``, ``work-dir``...)."""
        def get(key: str, default: Any = None, required: bool = False) -> Any:
            for k in (key, key.replace("-", "_")):
                if k in cfg:
                    return cfg[k]
            if required:
                raise ConfigError(f"node config lacks {key!r} (have: {', '.join(sorted(cfg)) or 'nothing'})")
            return default

        labels = get("labels-csv")
        workers = _as_count(get, "workers", 1)
        if workers < 1:
            raise ConfigError(f"node config 'workers' must be >= 1, got {workers}")
        return cls(
            centre_id=str(get("centre-id", required=True)),
            data=Path(str(get("data", required=True))),
            key_dir=Path(str(get("key-dir", required=True))),
            work_dir=Path(str(get("work-dir", required=True))),
            preset=str(get("preset", "cpu")),
            seed=int(get("seed", 0)),
            fault=str(get("fault", "") or ""),
            labels_csv=Path(str(labels)) if labels else None,
            policy=ExportPolicy.from_node_config(get),
            key_passphrase=str(get("key-passphrase", "") or ""),
            workers=workers,
        )

    def to_node_config(self) -> dict[str, str | int]:
        out: dict[str, str | int] = {
            "centre-id": self.centre_id, "data": str(self.data), "key-dir": str(self.key_dir),
            "work-dir": str(self.work_dir), "preset": self.preset, "seed": int(self.seed),
        }
        if self.fault:
            out["fault"] = self.fault
        if self.labels_csv:
            out["labels-csv"] = str(self.labels_csv)
        out.update(self.policy.to_node_config())
        if self.key_passphrase:
            out["key-passphrase"] = self.key_passphrase
        if self.workers != 1:
            out["workers"] = int(self.workers)
        return out

    def node_config_string(self) -> str:
        """``--node-config`` value for ``flower-supernode`` (quoted strings, bare ints)."""
        parts = []
        for k, v in self.to_node_config().items():
            parts.append(f'{k}={v}' if isinstance(v, int) else f'{k}="{v}"')
        return " ".join(parts)
