"""Named presets (``configs/preset-<name>.yaml``): one recipe for a kind of data, used by every command.

A preset fixes what must agree between the commands that build, audit and evaluate a set:

- ``view``: the preprocessing of the raw patches (:class:`histodd_fed.preprocess.ViewSpec`),
- ``distill``: the distillation recipe (``DistillConfig`` fields),
- ``distill_by_ipc``: changes to that recipe for one ipc (``{50: {init_mix: 4}}``), applied when the
  run's ipc (the preset's, or ``--ipc``) matches; explicit flags still win,
- ``distill_dp``: the recipe's DP version (overrides applied last, after ``distill_by_ipc``), used when
  a run asks for a privacy budget (``centre-node distill --epsilon``; histodd_fed.distill.dm_dp),
- ``coreset``: the coreset options (``CoresetConfig`` fields other than method / ipc / seed),
- ``eval``: the evaluation recipe (network, epochs, learning rate, batch, augmentation, seeds).

``centre-node distill|coreset|evaluate --preset NAME`` read it; explicit flags override its values.
Sets record their view in ``meta["view"]``, so ``export`` / ``audit`` need no preset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from histodd_fed.errors import ConfigError, InputError
from histodd_fed.preprocess import ViewSpec

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PREFIX = "preset-"


@dataclass
class EvalRecipe:
    """How a set is evaluated: one fresh ``arch`` per seed, trained ``epochs`` (``full_epochs`` on real sets)."""

    arch: str = "resnet18"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 50
    full_epochs: int | None = None
    lr: float = 0.01
    batch_size: int = 256
    augmentation: str | None = None
    seeds: int = 5

    def epochs_for(self, kind: str) -> int:
        """Epochs for a training set of ``kind`` (real sets: ``full_epochs`` when set)."""
        return self.full_epochs if kind == "real" and self.full_epochs is not None else self.epochs


@dataclass
class Preset:
    """A named preset; see the module docstring."""

    name: str
    path: Path
    description: str = ""
    view: ViewSpec | None = None
    distill: dict[str, Any] = field(default_factory=dict)
    coreset: dict[str, Any] = field(default_factory=dict)
    eval: EvalRecipe = field(default_factory=EvalRecipe)
    distill_by_ipc: dict[int, dict[str, Any]] = field(default_factory=dict)
    distill_dp: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "description": self.description,
                "view": None if self.view is None else self.view.to_dict(), "distill": dict(self.distill),
                "distill_by_ipc": {k: dict(v) for k, v in self.distill_by_ipc.items()},
                "distill_dp": dict(self.distill_dp),
                "coreset": dict(self.coreset), "eval": asdict(self.eval)}

    def distill_config(self, *, dp: bool = False, **overrides: Any):
        """The preset's ``DistillConfig`` for the run's ipc (``distill`` plus that ipc's ``distill_by_ipc``
        entry, plus ``distill_dp`` when ``dp``); ``None`` overrides are ignored (CLI flags pass straight
        through) and others win. ``dp`` on a preset without ``distill_dp`` is a ``ConfigError``."""
        from histodd_fed.distill.config import DistillConfig

        if dp and not self.distill_dp:
            raise ConfigError(f"{self.path}: preset {self.name!r} has no DP recipe (distill_dp section); "
                              "--epsilon needs one")
        ipc = overrides.get("ipc") if overrides.get("ipc") is not None else self.distill.get("ipc", 10)
        recipe = {**self.distill, **self.distill_by_ipc.get(int(ipc), {}), **(self.distill_dp if dp else {})}
        where = f"{self.path} distill{'_dp' if dp else ''} (ipc {ipc})"
        return DistillConfig.from_dict(recipe, where=where, **overrides)

    def coreset_config(self, **overrides: Any):
        """The preset's ``CoresetConfig``; ``None`` overrides are ignored."""
        from histodd_fed.coreset import CoresetConfig

        opts = {**self.coreset, **{k: v for k, v in overrides.items() if v is not None}}
        try:
            return CoresetConfig(**opts)
        except TypeError as exc:
            raise ConfigError(f"{self.path}: coreset: {exc}") from exc


def preset_names() -> list[str]:
    """Names of the presets shipped in ``configs/`` (``preset-<name>.yaml``)."""
    return sorted(p.stem[len(PREFIX):] for p in CONFIG_DIR.glob(f"{PREFIX}*.yaml"))


def preset_path(name_or_path: str | Path) -> Path:
    """``configs/preset-<name>.yaml`` for a name, or the given YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    return CONFIG_DIR / f"{PREFIX}{name_or_path}.yaml"


def _section(data: dict, key: str, where: str) -> dict:
    v = data.get(key) or {}
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: {key} must be a mapping, got {type(v).__name__}")
    return dict(v)


def load_preset(name_or_path: str | Path) -> Preset:
    """Load a named preset (``pcam``) or a preset YAML path; one-line errors name the file."""
    from histodd_fed.runconfig import read_yaml_mapping

    path = preset_path(name_or_path)
    if not path.is_file():
        raise InputError(f"{path}: no such preset (known: {', '.join(preset_names()) or 'none'})")
    data = read_yaml_mapping(path, "preset sections")
    unknown = sorted(set(data) - {"name", "description", "view", "distill", "distill_by_ipc", "distill_dp", "coreset", "eval"})
    if unknown:
        raise ConfigError(f"{path}: unknown preset section(s) {unknown}")
    view = None if data.get("view") is None else ViewSpec.from_dict(data["view"], where=str(path))
    ev = _section(data, "eval", str(path))
    bad = sorted(set(ev) - {f.name for f in fields(EvalRecipe)})
    if bad:
        raise ConfigError(f"{path}: unknown eval option(s) {bad}")
    coreset = _section(data, "coreset", str(path))
    bad = sorted(set(coreset) & {"method", "ipc", "seed"})
    if bad:
        raise ConfigError(f"{path}: coreset options {bad} are per command (--method, --ipc, --seed)")
    by_ipc = {}
    for k, v in _section(data, "distill_by_ipc", str(path)).items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or not isinstance(v, dict) or "ipc" in v:
            raise ConfigError(f"{path}: distill_by_ipc must map an ipc (a positive integer) to distill options "
                              f"other than ipc, got {k!r}: {v!r}")
        by_ipc[k] = dict(v)
    preset = Preset(name=str(data.get("name") or path.stem.removeprefix(PREFIX)), path=path,
                    description=str(data.get("description") or "").strip(), view=view,
                    distill=_section(data, "distill", str(path)), coreset=coreset, eval=EvalRecipe(**ev),
                    distill_by_ipc=by_ipc, distill_dp=_section(data, "distill_dp", str(path)))
    preset.distill_config()   # validate now: a bad preset fails before any data is read
    for ipc in by_ipc:
        preset.distill_config(ipc=ipc)
    if preset.distill_dp:
        if "dp_epsilon" in preset.distill_dp:
            raise ConfigError(f"{path}: distill_dp must not fix dp_epsilon (the run's --epsilon sets it)")
        for ipc in sorted({int(preset.distill.get("ipc", 10)), *by_ipc}):
            preset.distill_config(dp=True, ipc=ipc, dp_epsilon=1.0)
    preset.coreset_config(method="random").validate()
    return preset
