"""`coordinator demo` settings: per-centre slide options are validated before any work starts."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from coordinator.cli import app
from histodd_fed.errors import ConfigError


def test_demo_rejects_unknown_per_centre_key_before_generating(tmp_path):
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump({"centres": ["C1", "C2"], "slides": 2, "per_centre": {"C1": {"stain": "x"}}}))
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "out"), "--preset", "tiny", "--config", str(cfg)])
    assert isinstance(res.exception, ConfigError), res.output
    assert "per_centre.C1" in str(res.exception) and "stain" in str(res.exception)
    assert not (tmp_path / "out" / "C1" / "slides").exists()


def test_shipped_demo_config_is_data_poor_target():
    """The shipped demo: subtle tumours and a target with one train slide per class."""
    from pathlib import Path

    from histodd_fed.slides.demo import demo_slide_table

    s = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())
    assert 0 < s["tumour_contrast"] < 1
    tgt = s["per_centre"][s["target"]]
    rows = demo_slide_table(s["target"], tgt.get("slides", s["slides"]), tgt["test_fraction"])
    train = [r["label"] for r in rows if r["split"] == "train"]
    assert sorted(train) == ["normal", "tumour"]
    assert sum(r["split"] == "test" for r in rows) >= 12       # enough test slides for slide AUC to mean something
    assert 0 < tgt["tumour_size"] < 1                          # small tumour foci: a hard slide task
