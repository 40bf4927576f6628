"""Study presets (``configs/study-<name>.yaml``): data size, ipc lists, evaluation and distillation knobs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from histodd_fed.errors import ConfigError, InputError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
PRESETS = ("tiny", "cpu", "paper")


@dataclass
class EvalSettings:
    """How every training set of a study is evaluated (one fresh model per seed)."""

    arch: str = "resnet18"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 300            #: epochs on coresets / synthetic sets
    full_epochs: int = 20        #: epochs on the full real set
    lr: float = 0.01
    batch_size: int = 256
    augmentation: str | None = None  #: DSA strategy used when training evaluation models (None: none)
    seeds: int = 3


@dataclass
class StudyPreset:
    """Everything a study run needs besides its data paths."""

    name: str = "cpu"
    image_size: int = 32
    crop_center: int | None = None           #: keep the central N px of each patch before resizing (PCam: 32)
    limit_per_class: int | None = None       #: cap on training patches per class (seeded)
    test_limit_per_class: int | None = None  #: cap on test patches per class (seeded)
    seed: int = 0                            #: data subsets, coresets and distillation
    methods: list[str] = field(default_factory=lambda: ["random", "herding", "forgetting", "histodd", "full"])
    ipcs: list[int] = field(default_factory=lambda: [1, 10, 50])               #: Table 1
    ipc_curve: list[int] = field(default_factory=lambda: [10, 20, 50, 100])    #: Figure 1b
    ipc_curve_methods: list[str] = field(default_factory=lambda: ["random", "histodd", "full"])
    ablation_ipc: int = 10
    ablation_strategies: dict[str, str] = field(default_factory=lambda: {
        "none": "none", "stain": "stain", "rotate": "rotate", "flip": "flip", "scale": "scale",
        "all": "color_crop_cutout_flip_scale_rotate_stain"})
    cross_arch_ipc: int = 10
    cross_archs: dict[str, dict[str, Any]] = field(default_factory=lambda: {
        "ResNet18": {"arch": "resnet18"}, "DenseNet121": {"arch": "densenet121"}, "ViT": {"arch": "vit"}})
    cross_arch_full_epochs: int | None = None  #: epochs on the full set in the cross-arch study (None: eval.full_epochs)
    eval: EvalSettings = field(default_factory=EvalSettings)
    coreset: dict[str, Any] = field(default_factory=dict)   #: CoresetConfig overrides (feature_epochs, ...)
    #: a distill YAML (configs/distill-*.yaml, relative to the repo) the ``distill`` fields override
    distill_config: str | None = None
    distill: dict[str, Any] = field(default_factory=dict)   #: DistillConfig fields
    #: K (``outer_steps``) per ipc, as the paper scales it (200 / 500 / 1000 for ipc 10 / 20 / 50);
    #: an ipc not listed keeps ``distill.outer_steps``
    outer_steps_by_ipc: dict[int, int] = field(default_factory=dict)
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "preset") -> "StudyPreset":
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown study option(s) {unknown}")
        ev = data.pop("eval", {}) or {}
        eknown = {f.name for f in fields(EvalSettings)}
        bad = sorted(set(ev) - eknown)
        if bad:
            raise ConfigError(f"{where}: unknown eval option(s) {bad}")
        k_by_ipc = data.pop("outer_steps_by_ipc", None) or {}
        try:
            k_by_ipc = {int(i): int(k) for i, k in dict(k_by_ipc).items()}
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: outer_steps_by_ipc must map ipc -> outer steps, got {k_by_ipc!r}") from None
        if any(i < 1 or k < 1 for i, k in k_by_ipc.items()):
            raise ConfigError(f"{where}: outer_steps_by_ipc needs positive ipcs and steps, got {k_by_ipc}")
        try:
            return cls(eval=EvalSettings(**ev), outer_steps_by_ipc=k_by_ipc, **data)
        except TypeError as exc:
            raise ConfigError(f"{where}: {exc}") from exc


def preset_path(name_or_path: str | Path) -> Path:
    """``configs/study-<name>.yaml`` for a preset name, or the given YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        return p
    return CONFIG_DIR / f"study-{name_or_path}.yaml"


def load_preset(name_or_path: str | Path, **overrides: Any) -> StudyPreset:
    """Load a preset by name (tiny | cpu | paper) or YAML path; ``None`` overrides are ignored."""
    from histodd_fed.runconfig import read_yaml_mapping

    path = preset_path(name_or_path)
    if not path.is_file():
        raise InputError(f"{path}: no such study preset (known: {', '.join(PRESETS)})")
    data = read_yaml_mapping(path, "study options")
    data.setdefault("name", path.stem.removeprefix("study-"))
    for k, v in overrides.items():
        if v is None:
            continue
        if k.startswith("eval."):
            data.setdefault("eval", {})[k[5:]] = v
        elif k.startswith("distill."):
            data["distill"] = {**(data.get("distill") or {}), k[8:]: v}
        else:
            data[k] = v
    return StudyPreset.from_dict(data, where=str(path))
