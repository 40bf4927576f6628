"""`centre-node distill` on a real patch store (toy-sized config)."""

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from centre_node.cli import app
from histodd_fed.patchset import PatchSet

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def store(tmp_path: Path) -> Path:
    pcam = DATA / "pcam-ai4all" / "train"
    if pcam.exists():
        from histodd_fed.patchset import load_image_folder

        ps = load_image_folder(pcam, size=16, limit_per_class=6, seed=0)
    else:  # a user's checkout without ../shared/data: a coloured toy store still exercises the CLI
        rng = np.random.default_rng(0)
        ps = PatchSet(images=rng.integers(60, 230, size=(12, 16, 16, 3), dtype=np.uint8),
                      labels=np.array([0] * 6 + [1] * 6), class_names=["normal", "tumour"])
    return ps.save(tmp_path / "store")


def test_cli_distill_writes_set_config_and_figures(tmp_path):
    out = tmp_path / "syn"
    res = CliRunner().invoke(app, ["--quiet", "distill", "--patches", str(store(tmp_path)), "--out", str(out),
                                   "--config", str(ROOT / "configs" / "distill-tiny.yaml"), "--ipc", "1",
                                   "--outer-steps", "2", "--seed", "3"])
    assert res.exit_code == 0, res.output
    syn = PatchSet.load(out)
    assert syn.kind == "synthetic" and len(syn) == 2 and syn.meta["config"]["seed"] == 3
    rc = json.loads((out / "run_config.json").read_text())
    assert rc["command"] == "centre-node distill" and rc["config"]["distill"]["outer_steps"] == 2
    for png in ("loss_curve.png", "synthetic_grid.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "syn.work" / "pool").is_dir()


def test_cli_distill_errors_are_one_line(tmp_path):
    res = CliRunner().invoke(app, ["distill", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "exactly one of" in str(res.exception)
    res = CliRunner().invoke(app, ["distill", "--patches", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                                   "--config", str(ROOT / "configs" / "distill-tiny.yaml")])
    assert res.exit_code != 0 and "no such patch set" in str(res.exception)
