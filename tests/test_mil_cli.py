"""`centre-node mil train / evaluate / features` on a small real store built in the test; study outputs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from centre_node.cli import app
from histodd_fed.patchset import PatchSet


def store_with_splits(tmp_path):
    """8 slides of 16 px patches; tumour slides (label 1) contain a few bright patches."""
    rng = np.random.default_rng(0)
    images, slide_index, labels = [], [], []
    ids = [f"S{i}" for i in range(8)]
    for j in range(8):
        n = 5
        im = rng.integers(0, 100, (n, 16, 16, 3), dtype=np.uint8)
        lab = np.zeros(n, int)
        if j % 2:
            im[:2] += 150
            lab[:2] = 1
        images.append(im)
        labels.append(lab)
        slide_index += [j] * n
    ps = PatchSet(images=np.concatenate(images), labels=np.concatenate(labels), class_names=["normal", "tumour"],
                  slide_index=np.array(slide_index), slide_ids=ids, slide_labels={s: i % 2 for i, s in enumerate(ids)},
                  meta={"slide_splits": {s: ("test" if i >= 6 else "train") for i, s in enumerate(ids)}})
    return ps.save(tmp_path / "store")


def test_train_evaluate_features_cli(tmp_path):
    from histodd_fed.mil.features import save_patch_model
    from histodd_fed.models.registry import create_model

    store = store_with_splits(tmp_path)
    torch.manual_seed(0)
    kw = {"width": 8, "depth": 2}  # a small ConvNet keeps the test light; the CLI path is the same as ResNet18's
    enc = create_model("convnet", num_classes=2, image_size=16, **kw)
    save_patch_model(enc, tmp_path / "enc", arch="convnet", num_classes=2, image_size=16, arch_kwargs=kw)
    dim = enc.feature_dim
    runner = CliRunner()
    r = runner.invoke(app, ["-q", "mil", "train", "--bags", "real", "--patches", str(store), "--arch", "abmil",
                            "--encoder", str(tmp_path / "enc"), "--out", str(tmp_path / "run"), "--seeds", "2",
                            "--epochs", "3", "--hidden", "16"])
    assert r.exit_code == 0, r.output
    assert "test slides (2)" in r.output and "accuracy" in r.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train_bags"] == 6 and metrics["test_bags"] == 2 and len(metrics["seeds"]) == 2
    assert metrics["storage_bytes"] == 30 * 16 * 16 * 3
    assert (tmp_path / "run" / "seed_1" / "mil_model.safetensors").exists()
    assert (tmp_path / "run" / "run_config.json").exists()

    r = runner.invoke(app, ["-q", "mil", "evaluate", "--model", str(tmp_path / "run"), "--test-slides", str(store)])
    assert r.exit_code == 0, r.output
    assert "seed_0:" in r.output and "mean ± std over 2" in r.output
    assert "features: 0 patches encoded" in r.output  # test-slide features come from train's cache

    r = runner.invoke(app, ["-q", "mil", "evaluate", "--model", str(tmp_path / "run" / "seed_1"),
                            "--test-slides", str(store)])
    assert r.exit_code == 0, r.output  # a seed folder finds the cache in its parent train folder
    assert "seed_1:" in r.output and "features: 0 patches encoded" in r.output and "on 2 slides" in r.output

    r = runner.invoke(app, ["-q", "mil", "features", "--patches", str(store), "--encoder", str(tmp_path / "enc"),
                            "--out", str(tmp_path / "bags")])
    assert r.exit_code == 0, r.output
    assert f"8 bags (40 patches, dim {dim})" in r.output

    r = runner.invoke(app, ["-q", "mil", "train", "--bags", "synthetic", "--patches", str(store), "--out",
                            str(tmp_path / "x"), "--encoder", str(tmp_path / "enc")])
    assert r.exit_code != 0 and "--synthetic" in str(r.exception or r.output)


def test_study_outputs(tmp_path):
    from histodd_fed.mil.study import write_study_outputs

    rows = [{"setting": s, "ipc": i, "arch": a, "seed": seed, "accuracy": acc, "auc": acc, "balanced_accuracy": acc,
             "epoch_seconds": 0.01, "storage_bytes": b, "train_bags": 4, "train_instances": 8, "test_bags": 2}
            for s, i, b in (("ipc 2", 2, 6144), ("Full", "", 98304)) for a in ("abmil", "dsmil")
            for seed, acc in ((0, 0.5), (1, 1.0))]
    res = write_study_outputs(rows, tmp_path, ["abmil", "dsmil"])
    assert res.plot_path.read_bytes()[:4] == b"\x89PNG"
    assert "| ipc 2 | 6.0 KB | 75.0 ± 35.4 |" in res.markdown
    assert "| Full | 96.0 KB |" in res.markdown
    lines = res.csv_path.read_text().splitlines()
    assert len(lines) == 9 and lines[0].startswith("setting,ipc,arch,seed,accuracy")
    assert not math.isnan(float(lines[1].split(",")[4]))
