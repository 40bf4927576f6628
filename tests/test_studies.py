"""Study commands end to end on a tiny generated dataset (tiny preset), plus tables and presets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from centre_node.cli import app
from histodd_fed.errors import ConfigError
from histodd_fed.patchset import PatchSet
from histodd_fed.studies import StudyRun, load_preset, load_study_data, patch_grid, run_cross_arch_study
from histodd_fed.studies.tables import markdown_table, pm
from histodd_fed.studies.toy_data import make_toy_patchset

torch.set_num_threads(1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def toy_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    make_toy_patchset(12, 16, seed=0).save(d / "train")
    make_toy_patchset(8, 16, seed=1).save(d / "test")
    return d


def test_study_coreset_cli_end_to_end(toy_dirs, tmp_path):
    out = tmp_path / "res"
    r = CliRunner().invoke(app, ["-q", "study", "coreset", "--patches", str(toy_dirs / "train"), "--test",
                                 str(toy_dirs / "test"), "--preset", "tiny", "--out", str(out), "--ipcs", "2",
                                 "--seeds", "1", "--outer-steps", "3", "--inner-steps", "2"])
    assert r.exit_code == 0, r.output
    table = (out / "table.md").read_text()      # one row per method and ipc, the export gate's verdict per row
    assert "| method | IPC | Ratio % | set's meta method |" in table and "export gate |" in table
    assert "| Histo-DD | 2 | 16.67 | histo-dd |" in table and "| Random | 2 | 16.67 | random |" in table
    assert "BLOCKED: synthetic patch" in table.split("| Random | 2")[1].splitlines()[0]   # a coreset is real patches
    assert "@ 3 |" in table                                        # Histo-DD's drift after its 3 outer steps
    md = (out / "results.md").read_text()
    assert "| IPC | Ratio % | Random | Herding | Forgetting | Histo-DD | Full |" in md
    assert "| 2 | 16.67 |" in md  # 2 ipc x 2 classes / 24 patches
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["method"] for r in rows} == {"random", "herding", "forgetting", "histodd", "full"}
    for row in rows:
        assert 0.0 <= float(row["accuracy_mean"]) <= 1.0
    assert (out / "accuracy_by_method.png").read_bytes()[:8] == PNG_MAGIC
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["config"]["preset"]["name"] == "tiny"
    syn = PatchSet.load(out / "sets" / "histodd-ipc2")
    assert syn.kind == "synthetic" and syn.class_counts() == {"class0": 2, "class1": 2}
    assert (syn.meta["config"]["outer_steps"], syn.meta["config"]["inner_steps"]) == (3, 2)   # the flags won
    assert (out / "sets" / "histodd-ipc2" / "drift.json").is_file()
    # Figure 1a from the study's own sets
    fig = tmp_path / "grid.png"
    r = CliRunner().invoke(app, ["study", "figure", "--synthetic", str(out / "sets" / "histodd-ipc2"),
                                 "--initial", str(out / "sets" / "histodd-ipc2-initial"),
                                 "--real", str(toy_dirs / "train"), "--out", str(fig), "--per-class", "3"])
    assert r.exit_code == 0, r.output
    assert fig.read_bytes()[:8] == PNG_MAGIC


def test_evaluate_and_coreset_cli(toy_dirs, tmp_path):
    r = CliRunner().invoke(app, ["-q", "coreset", "--method", "random", "--ipc", "3", "--patches",
                                 str(toy_dirs / "train"), "--out", str(tmp_path / "cs"), "--seed", "4"])
    assert r.exit_code == 0, r.output
    cs = PatchSet.load(tmp_path / "cs")
    assert cs.kind == "coreset" and cs.meta["seed"] == 4 and len(cs) == 6
    r = CliRunner().invoke(app, ["-q", "evaluate", "--train", str(tmp_path / "cs"), "--test", str(toy_dirs / "test"),
                                 "--arch", "resnet18", "--seeds", "2", "--epochs", "2", "--json",
                                 str(tmp_path / "ev.json")])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "ev.json").read_text())
    for k in ("accuracy_mean", "accuracy_std", "balanced_accuracy_mean", "balanced_accuracy_std", "auc_mean",
              "auc_std", "epoch_seconds_mean", "n_train"):
        assert k in s
    assert s["n_train"] == 6 and len(s["accuracy_per_seed"]) == 2


def test_study_ablation_and_cross_arch_tiny(toy_dirs, tmp_path):
    r = CliRunner().invoke(app, ["-q", "study", "ablation", "--patches", str(toy_dirs / "train"), "--test",
                                 str(toy_dirs / "test"), "--preset", "tiny", "--out", str(tmp_path / "abl"),
                                 "--seeds", "1"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader((tmp_path / "abl" / "results.csv").open()))
    assert [r["augmentation"] for r in rows] == ["none", "flip", "all"]
    assert (tmp_path / "abl" / "ablation.png").read_bytes()[:8] == PNG_MAGIC
    # cross-arch with a random coreset (fast), on ResNet18 and the tiny ViT only
    p = load_preset("tiny", **{"eval.seeds": 1, "eval.epochs": 1})
    run = StudyRun("cross-arch", p, load_study_data(toy_dirs / "train", toy_dirs / "test", p), tmp_path / "xa",
                   progress=False)
    recs = run_cross_arch_study(run, archs={k: v for k, v in p.cross_archs.items() if k != "DenseNet121"},
                                method="random")
    assert [r["arch_label"] for r in recs] == ["ResNet18", "ViT"]
    assert all(r["speedup_per_epoch"] > 0 for r in recs)
    assert "Speed-up / epoch" in (tmp_path / "xa" / "results.md").read_text()


def test_bad_preset_and_method_are_clear_errors(toy_dirs, tmp_path):
    with pytest.raises(ConfigError, match="unknown study option"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("nonsense: 1\n")
        load_preset(bad)
    r = CliRunner().invoke(app, ["study", "coreset", "--patches", str(toy_dirs / "train"), "--test",
                                 str(toy_dirs / "test"), "--preset", "tiny", "--out", str(tmp_path / "x"),
                                 "--methods", "magic"])
    assert r.exit_code != 0 and isinstance(r.exception, ConfigError) and "magic" in str(r.exception)


def test_tables_and_grid(tmp_path):
    assert pm(0.8534, 0.0123) == "85.3 ± 1.2"
    assert pm(float("nan"), 0.1) == "-"
    assert markdown_table(["a", "b"], [[1, 2]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    ps = make_toy_patchset(3, 16)
    patch_grid(tmp_path / "g.png", {"real": ps}, per_class=2)
    assert (tmp_path / "g.png").read_bytes()[:8] == PNG_MAGIC


def _shared_data() -> Path:
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_pcam_folder_loads_resized_and_capped():
    root = _shared_data() / "pcam-ai4all" / "valid"
    if not root.is_dir():
        pytest.skip(f"real PCam patches not present at {root}")
    from histodd_fed.training.data import load_patches

    ps = load_patches(root, image_size=16, limit=3, seed=0)
    assert ps.class_names == ["normal", "tumour"] and ps.images.shape == (6, 16, 16, 3)
    assert np.bincount(ps.labels).tolist() == [3, 3]


def test_paper_presets_scale_k_with_ipc_and_use_the_paper_distill_config():
    """Issue 12 section 2: K 200 / 500 / 1000 for ipc 10 / 20 / 50; ipcs 10/20/50; the transfer study's
    paper preset distils with configs/distill-paper.yaml."""
    from histodd_fed.distill.config import DistillConfig
    from histodd_fed.federation.presets import get_preset
    from histodd_fed.studies import load_preset
    from histodd_fed.studies.training_sets import distill_config

    p = load_preset("paper")
    assert p.ipcs == [10, 20, 50]
    paper = DistillConfig.from_yaml(Path(__file__).resolve().parents[1] / "configs" / "distill-paper.yaml")
    for ipc, k in ((10, 200), (20, 500), (50, 1000)):
        cfg = distill_config(p, ipc)
        assert (cfg.ipc, cfg.outer_steps) == (ipc, k)
        assert cfg.model == paper.model and cfg.inner_steps == paper.inner_steps and cfg.lr_img == paper.lr_img
    assert distill_config(load_preset("cpu"), 50).outer_steps == load_preset("cpu").distill["outer_steps"]
    fed = get_preset("paper")
    assert fed.distill_config == "configs/distill-paper.yaml"
    assert dict(fed.outer_steps_by_ipc) == {10: 200, 20: 500, 50: 1000}
    assert "outer_steps_by_ipc" not in fed.prepare_dict()
