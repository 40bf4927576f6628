"""Seeds and run records: every run takes a seed and writes its full config next to its outputs."""

from __future__ import annotations

import hashlib
import json
import platform
import random
import sys
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from histodd_fed import __version__
from histodd_fed.atomic import atomic_write_json


def seeded_generators(seed: int) -> tuple[np.random.Generator, "torch.Generator"]:  # noqa: F821
    """Return local (numpy, torch) generators for ``seed``; the global RNGs are not touched."""
    import torch

    g = torch.Generator()
    g.manual_seed(int(seed))
    return np.random.default_rng(int(seed)), g


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch global RNGs from an explicit seed (never the clock)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def to_jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_jsonable(v) for k, v in asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    return obj


def config_hash(config: Any) -> str:
    """Stable SHA-256 (hex) of a JSON-able config (dataclass or dict)."""
    blob = json.dumps(to_jsonable(config), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def write_run_config(out_dir: str | Path, command: str, config: Any, name: str = "run_config.json") -> Path:
    """Write the full config of a run (plus versions and time) into ``out_dir/name``."""
    import torch

    record = {
        "command": command,
        "config": to_jsonable(config),
        "config_sha256": config_hash(config),
        "histodd_fed_version": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return atomic_write_json(Path(out_dir) / name, record)


def read_yaml_mapping(path: str | Path, what: str = "options") -> dict[str, Any]:
    """The mapping in YAML file ``path`` (an empty file is ``{}``); one-line errors name the file:
    InputError when it cannot be read, ConfigError when it is not YAML or not a mapping."""
    import yaml

    from histodd_fed.errors import ConfigError, InputError

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise InputError(f"{path}: cannot read config ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of {what}")
    return data
