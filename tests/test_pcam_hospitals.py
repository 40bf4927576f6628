"""The five-hospital pcam-c17 benchmark (issue 23): centres, pooled sources, leave-one-out, CIs, fault rows."""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from histodd_fed.patchset import PatchSet


# ---------------------------------------------------------------------------- centres (real data, small)
@pytest.fixture(scope="module")
def hospitals(tmp_path_factory):
    from tests.conftest import SHARED_DATA

    if not (SHARED_DATA / "pcam-ai4all").is_dir() or not (SHARED_DATA / "camelyon17-stain-tiles").is_dir():
        pytest.skip(f"{SHARED_DATA}/pcam-ai4all or camelyon17-stain-tiles absent: needs ../shared/data")
    out = tmp_path_factory.mktemp("hosp") / "centres"
    r = subprocess.run([sys.executable, "-m", "centre_node.cli", "-q", "make-pcam-centres",
                        "--pcam", str(SHARED_DATA / "pcam-ai4all"), "--stains",
                        str(SHARED_DATA / "camelyon17-stain-tiles"), "--out", str(out), "--hospitals", "0,1,2,3,4",
                        "--limit", "30", "--target-train-per-class", "3", "--seed", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out


def test_five_hospitals_are_patch_disjoint(hospitals):
    m = json.loads((hospitals / "manifest.json").read_text())
    assert m["layout"] == "hospitals" and m["hospitals"] == [0, 1, 2, 3, 4] and m["seed"] == 1
    seen: dict[str, str] = {}
    for d in range(5):
        h = hospitals / f"H{d}"
        src = PatchSet.load(h / "source" / "train")
        tr, te = PatchSet.load(h / "target" / "train"), PatchSet.load(h / "target" / "test")
        assert src.class_counts() == {"normal": 6, "tumour": 6}            # 30 per class / 5 hospitals, no cap
        assert tr.class_counts() == {"normal": 3, "tumour": 3} and te.class_counts() == {"normal": 3, "tumour": 3}
        assert (h / "source" / "test").resolve() == (h / "target" / "test").resolve()   # its own test set
        assert src.meta["domain"] == d and src.meta["source"].endswith("train") and tr.meta["source"].endswith("valid")
        for part, ps in (("source", src), ("target/train", tr), ("target/test", te)):
            for f in ps.meta["files"]:
                key = f"{ps.meta['source'].rsplit('/', 1)[-1]}/{f}"
                assert key not in seen, f"{key} in H{d} {part} and {seen[key]}"
                seen[key] = f"H{d} {part}"
        # re-stained to its own hospital: closer to its tiles than to any other hospital's
        own = m["centres"][f"H{d}"]["stain_angle_deg_to_tiles"]
        assert own < 8.0
    assert len(seen) == 5 * (12 + 6 + 6)


def test_hospitals_and_target_domain_together_fail_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "centre_node.cli", "make-pcam-centres", "--pcam", str(tmp_path),
                        "--stains", str(tmp_path), "--out", str(tmp_path / "o"), "--hospitals", "0,1",
                        "--target-domain", "2"], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--target-domain" in lines[0] and "--hospitals" in lines[0]



def test_workers_outside_the_hospital_benchmark_fail_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "coordinator.cli", "transfer", "--workers", "2", "--out",
                        str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--workers" in lines[0] and "--benchmark" in lines[0]
    assert not (tmp_path / "o").exists()



def test_workers_default_to_the_cores_for_hospital_centres_only(tmp_path, monkeypatch):
    """``--workers`` left out: the hospital benchmark gets one process per core this process may use (capped);
    given, it is used as is."""
    import os

    from typer.testing import CliRunner

    from coordinator import cli
    from histodd_fed.federation import hospital_benchmark

    cores = len(os.sched_getaffinity(0))
    assert cli.default_workers() == max(1, min(cli.MAX_DEFAULT_WORKERS, cores))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    assert cli.default_workers() == cli.MAX_DEFAULT_WORKERS
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert cli.default_workers() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})

    centres = tmp_path / "centres"
    centres.mkdir()
    (centres / "manifest.json").write_text(json.dumps({"layout": "hospitals"}))
    seen = []

    def fake_run(centres_dir, out, **kw):
        seen.append(kw["workers"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.md").write_text("table\n")
        return {}

    monkeypatch.setattr(hospital_benchmark, "run_hospitals_benchmark", fake_run)
    base = ["transfer", "--benchmark", "pcam-c17", "--centres", str(centres), "--sources", "0", "--target", "2"]
    for extra, want in (([], 3), (["--workers", "1"], 1), (["--workers", "2"], 2)):
        r = CliRunner().invoke(cli.app, base + ["--out", str(tmp_path / f"o{len(seen)}")] + extra)
        assert r.exit_code == 0, r.output
        assert seen[-1] == want


# ---------------------------------------------------------------------------- statistics
def test_t_interval_known_example():
    from histodd_fed.federation.benchmark_summary import t_interval

    m, lo, hi = t_interval([1, 2, 3, 4, 5])        # sd 1.5811, t(0.975, 4) = 2.7764, half-width 1.9632
    assert m == 3.0 and lo == pytest.approx(1.0368, abs=1e-4) and hi == pytest.approx(4.9632, abs=1e-4)
    assert t_interval([0.7]) == (0.7, None, None) and t_interval([]) == (None, None, None)
    m, lo, hi = t_interval([0.5, 0.5])
    assert (m, lo, hi) == (0.5, 0.5, 0.5)


def test_gain_is_paired_by_seed():
    from histodd_fed.federation.benchmark_summary import summarise, t_interval

    base = [0.60, 0.70, 0.65]
    full = [0.70, 0.76, 0.72]      # seed-to-seed spread large, gain steady: the paired CI excludes 0
    per_seed = [{"target": "H2", "seed": s, "transfer": t, "patch_bal_acc": v}
                for s in range(3) for t, v in (("target alone", base[s]), ("+ Full", full[s]))]
    rows = summarise(per_seed, [], expected={"H2": ["target alone", "+ ipc 10", "+ Full"]}, sources={"H2": "H0"})
    assert [r["transfer"] for r in rows] == ["target alone", "+ ipc 10", "+ Full"]
    f = rows[2]
    g, glo, ghi = t_interval([0.10, 0.06, 0.07])
    assert f["gain_mean"] == pytest.approx(g) and f["gain_ci95_low"] == pytest.approx(glo) and glo > 0
    assert f["patch_bal_acc_ci95_low"] < base[1]    # while the unpaired CIs overlap
    assert rows[1]["status"] == "fault" and rows[1]["n_seeds"] == 0  # expected, never ran: kept as a fault row


# ---------------------------------------------------------------------------- the study loop (fake runtime)
def _fake_centres(root: Path) -> Path:
    ps = PatchSet(np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 0, 1]), ["normal", "tumour"])
    centres = {}
    for d in range(5):
        for part in ("source/train", "target/train", "target/test"):
            ps.save(root / f"H{d}" / part)
        (root / f"H{d}" / "source" / "test").symlink_to(Path("..") / "target" / "test")
        centres[f"H{d}"] = {"domain": d, "source": f"H{d}/source", "target": f"H{d}/target"}
    (root / "manifest.json").write_text(json.dumps({"benchmark": "pcam-c17", "layout": "hospitals",
                                                    "hospitals": list(range(5)), "centres": centres,
                                                    "target_train_per_class": 2}))
    return root


class FakeStudy:
    """Stands in for the Flower runtime: rows as a target reports them; faults on request."""

    def __init__(self, fail=None, blocked=None):
        self.calls, self.fail, self.blocked = [], fail or set(), blocked or set()

    def __call__(self, cfg, nodes):
        from histodd_fed.errors import HistoddError
        from histodd_fed.federation.coordinator import StudyOutcome
        from histodd_fed.federation.faults import Fault

        self.calls.append((cfg, nodes))
        if (cfg.target, cfg.seed) in self.fail:
            raise HistoddError("flwr run exited 1 without report.json")
        src = "+".join(cfg.source_list())
        d = int(cfg.target[1:])
        base = 0.6 + 0.02 * d + 0.01 * cfg.seed
        rows = [{"name": "none", "mode": "none", "target": cfg.target, "patch_balanced_accuracy": base,
                 "patch_accuracy": base, "patch_auc": base + 0.05, "epochs": 5, "fine_tune_protocol": "union",
                 "images": 0, "bytes": 0, "fine_tune_seconds": 1.0}]
        faults = []
        for i in cfg.ipcs:
            if (cfg.target, i) in self.blocked:
                faults.append(Fault(cfg.source_list()[0], "distil", "blocked", f"ipc{i}: export blocked by the gate"))
                continue
            rows.append({"name": f"{src}-ipc{i}", "mode": "synthetic", "ipc": i, "source": src, "target": cfg.target,
                         "patch_balanced_accuracy": base + 0.03, "patch_accuracy": base, "patch_auc": base,
                         "epochs": 15, "received_share": 0.8, "fine_tune_protocol": "union", "images": 2 * i,
                         "bytes": 1000 * i, "fine_tune_seconds": 2.0, "select_seconds": 5.0})
        rows.append({"name": f"{src}-full", "mode": "full", "source": src, "target": cfg.target,
                     "patch_balanced_accuracy": base + 0.05 + 0.001 * cfg.seed, "patch_accuracy": base,
                     "patch_auc": base, "epochs": 5, "received_share": 0.5, "fine_tune_protocol": "union",
                     "images": 800, "bytes": 100_000, "fine_tune_seconds": 3.0})
        return StudyOutcome(rows=rows, faults=faults)


def _run(tmp_path, fake, **kw):
    from histodd_fed.federation.hospital_benchmark import run_hospitals_benchmark

    centres = _fake_centres(tmp_path / "c")
    out = tmp_path / "R"
    msgs: list[str] = []
    rep = run_hospitals_benchmark(centres, out, run_study=fake, say=msgs.append, **kw)
    summary = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    return rep, out, summary, msgs


def test_several_sources_pooled_into_one_target(tmp_path):
    fake = FakeStudy()
    rep, out, summary, msgs = _run(tmp_path, fake, sources="0,1,3,4", target="2", ipcs=[10], seeds=2)
    assert len(fake.calls) == 2 and all(m.startswith("[pcam-c17]") for m in msgs) and len(msgs) == 4
    cfg, nodes = fake.calls[0]
    assert cfg.source_list() == ["H0", "H1", "H3", "H4"] and cfg.pooled() and cfg.target == "H2" and cfg.full
    by_id = {n["centre-id"]: n for n in nodes}
    assert by_id["H2"]["data"].endswith("H2/target") and by_id["H0"]["data"].endswith("H0/source")
    assert by_id["H0"]["export-real"] == "true" and by_id["H2"].get("export-real") != "true"
    assert [r["transfer"] for r in summary] == ["target alone", "+ ipc 10", "+ Full"]
    assert {r["sources"] for r in summary} == {"H0+H1+H3+H4"}
    full = summary[2]
    assert float(full["gain_mean"]) == pytest.approx(0.0505) and float(full["bytes_vs_full"]) == 1.0
    assert float(summary[1]["share_of_full_gain"]) == pytest.approx(0.03 / 0.0505)
    assert summary[1]["epochs"] == "15" and summary[1]["received_share"] == "0.8"
    assert float(summary[1]["bytes_vs_full"]) == pytest.approx(0.1)     # against the Full received in that study
    for col in ("patch_bal_acc_mean", "patch_bal_acc_ci95_low", "patch_bal_acc_ci95_high", "gain_ci95_low",
                "gain_ci95_high", "patch_acc_mean", "patch_auc_mean", "slide_auc_mean", "fine_tune_s_mean",
                "bytes_mean", "bytes_vs_full", "epochs"):
        assert col in full
    per_seed = list(csv.DictReader(io.StringIO((out / "summary_per_seed.csv").read_text())))
    assert len(per_seed) == 6 and {r["seed"] for r in per_seed} == {"0", "1"}
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "summary.md").read_text()
    assert "95%" in md and "| H2 | H0+H1+H3+H4 | + Full |" in md
    # the default preset's protocol is fixed (pcam-c17-hospitals-fixed), and the summary says which
    assert "fixed by the preset (union, 100 epochs, received share 0.95, lr 0.01, convnet" in md, md[:800]
    _, out2, _, _ = _run(tmp_path / "select", FakeStudy(), sources="0", target="2", ipcs=[10], seeds=1,
                         preset="pcam-c17-hospitals")   # the per-row choice says where it chose
    assert "chosen per row and seed on a validation split" in (out2 / "summary.md").read_text()
    assert json.loads((out / "report.json").read_text())["plan"] == [{"target": "H2",
                                                                     "sources": ["H0", "H1", "H3", "H4"]}]


def test_target_all_is_leave_one_hospital_out(tmp_path):
    fake = FakeStudy()
    rep, out, summary, _ = _run(tmp_path, fake, sources=None, target="all", ipcs=[10, 50], seeds=2)
    assert len(fake.calls) == 10
    targets = [r["target"] for r in summary]
    assert targets == [f"H{d}" for d in range(5) for _ in range(4)]     # one block of rows per target
    for d in range(5):
        block = [r for r in summary if r["target"] == f"H{d}"]
        assert [r["transfer"] for r in block] == ["target alone", "+ ipc 10", "+ ipc 50", "+ Full"]
        assert block[0]["sources"] == "+".join(f"H{s}" for s in range(5) if s != d)


def test_single_source_and_bad_plans(tmp_path):
    from histodd_fed.errors import ConfigError
    from histodd_fed.federation.hospital_benchmark import plan

    fake = FakeStudy()
    _, _, summary, _ = _run(tmp_path, fake, sources="0", target="2", ipcs=[10], seeds=1)
    cfg, nodes = fake.calls[0]
    assert cfg.source_list() == ["H0"] and not cfg.pooled() and len(nodes) == 2
    assert {r["sources"] for r in summary} == {"H0"}
    m = {"hospitals": [0, 1, 2, 3, 4]}
    assert plan(m, None, "2") == [(2, [0, 1, 3, 4])]
    for sources, target, msg in ((None, None, "needs --target"), ("2", "2", "cannot also be a source"),
                                 ("0", "all", "leave out --sources"), ("7", "2", "unknown hospital"),
                                 ("0,0", "2", "once")):
        with pytest.raises(ConfigError, match=msg):
            plan(m, sources, target)


def test_workers_reach_every_node_config_and_bad_counts_fail(tmp_path):
    from histodd_fed.errors import ConfigError
    from histodd_fed.federation.centre_config import CentreConfig

    fake = FakeStudy()
    _run(tmp_path, fake, sources="0,1", target="2", ipcs=[10], seeds=1, workers=2)
    _, nodes = fake.calls[0]
    by_id = {n["centre-id"]: n for n in nodes}
    assert by_id["H0"]["workers"] == 2 and by_id["H1"]["workers"] == 2 and by_id["H2"]["workers"] == 2
    assert CentreConfig.from_node_config(by_id["H0"]).workers == 2          # what the ClientApp builds
    assert CentreConfig.from_node_config(by_id["H2"]).workers == 2          # the target: its rows side by side
    assert CentreConfig.from_node_config(CentreConfig.from_node_config(by_id["H0"]).to_node_config()).workers == 2
    for bad in (0, "two", 1.5):
        with pytest.raises(ConfigError, match="workers"):
            CentreConfig.from_node_config(dict(by_id["H0"], workers=bad))
    with pytest.raises(ConfigError, match="--workers must be >= 1"):
        _run(tmp_path / "w0", FakeStudy(), sources="0", target="2", ipcs=[10], seeds=1, workers=0)


def test_failed_or_blocked_centres_are_fault_rows(tmp_path):
    fake = FakeStudy(fail={("H3", 1)}, blocked={("H4", 10)})
    rep, out, summary, msgs = _run(tmp_path, fake, sources=None, target="all", ipcs=[10], seeds=2)
    assert len(summary) == 15                                            # no row missing
    h3 = {r["transfer"]: r for r in summary if r["target"] == "H3"}
    assert all(r["n_seeds"] == "1" and r["n_faults"] == "1" for r in h3.values())   # seed 1's study failed
    assert "study error" in h3["+ Full"]["faults"]
    h4 = {r["transfer"]: r for r in summary if r["target"] == "H4"}
    assert h4["+ ipc 10"]["n_seeds"] == "0" and h4["+ ipc 10"]["patch_bal_acc_mean"] == ""
    assert "H0 distil blocked (seeds 0, 1)" in h4["+ ipc 10"]["faults"] and h4["+ Full"]["n_faults"] == "0"
    assert h4["target alone"]["n_faults"] == "0"
    md = (out / "summary.md").read_text()
    assert "FAULT: H0 distil blocked" in md and "## Faults" in md
    assert any("study failed" in m for m in msgs)
    per_seed = list(csv.DictReader(io.StringIO((out / "summary_per_seed.csv").read_text())))
    assert any(r["fault"] and r["target"] == "H3" and r["transfer"] == "(all rows)" for r in per_seed)


# ---------------------------------------------------------------------------- the target's side (real, tiny)
def test_pooled_full_and_protocol_chosen_on_own_validation_split(hospitals, tmp_path, monkeypatch):
    """Two sources' Full sets reach H2 in ONE row; the target picks (epochs, share, lr scale) on its own train data."""
    from histodd_fed.federation import presets
    from histodd_fed.federation.centre import CentreNode
    from histodd_fed.federation.coordinator import LocalTransport, StudyConfig, run_transfer_study
    from histodd_fed.federation.enrol import enrol
    from histodd_fed.federation.centre_config import ExportPolicy

    monkeypatch.setitem(presets.PRESETS, "tiny-select", replace(
        presets.PRESETS["tiny"], name="tiny-select", max_train_patches=0, select_grid=((1, 0.5), (2, 0.8), (1, 0.8, 3.0))))
    data = {"H0": hospitals / "H0/source", "H1": hospitals / "H1/source", "H2": hospitals / "H2/target"}
    cfgs, trust = enrol(tmp_path / "fed", data, preset="tiny-select",
                        policies={c: ExportPolicy(real=True) for c in ("H0", "H1")})
    nodes = {10 + i: CentreNode(c) for i, c in enumerate(cfgs)}
    cfg = StudyConfig(sources=["H0", "H1"], target="H2", ipcs=[], full=True, preset="tiny-select",
                      fine_tune_epochs=1, study_dir=tmp_path / "study", trust=trust, runtime="local",
                      discovery_timeout=0)
    out = run_transfer_study(LocalTransport(nodes), cfg)
    assert out.faults == [], [f.line() for f in out.faults]
    base = next(r for r in out.rows if r["mode"] == "none")
    full = next(r for r in out.rows if r["mode"] == "full")
    assert full["source"] == "H0+H1" and full["sources"] == ["H0", "H1"] and full["pooled_sources"] == 2
    assert full["images"] == 24 and full["train_total"] == 24          # every patch of both sources
    assert len(full["bundles"]) == 2 and full["bytes"] > 2 * 10_000
    lr = presets.PRESETS["tiny"].fine_tune_lr
    for r, n_cands in ((full, 3), (base, 3)):  # "target alone": (epochs, lr scale) pairs, the share draws nothing
        sel = r["selection"]
        assert len(sel["candidates"]) == n_cands and (r["epochs"], sel["epochs"]) in ((1, 1), (2, 2))
        assert [c["lr_scale"] for c in sel["candidates"]] == [1.0, 1.0, 3.0]
        assert r["fine_tune_lr"] == pytest.approx(lr * sel["lr_scale"])   # the chosen lr is the one fine-tuned with
        assert sel["val_patches"] + sel["fit_patches"] == 6 and "validation split" in r["protocol_chosen_on"]
        assert 0.0 <= r["patch_balanced_accuracy"] <= 1.0
    assert full["received_share"] in (0.5, 0.8)
    # candidates start from a classifier that never saw the validation patches (pre-trained on the fit part)
    assert len(list((tmp_path / "fed").rglob("select-classifiers/*/model.json"))) == 1
    # a second study: the pooled row comes from the target's cache (the ledger would refuse a re-opening)
    again = run_transfer_study(LocalTransport(nodes), cfg)
    assert next(r for r in again.rows if r["mode"] == "full")["patch_accuracy"] == full["patch_accuracy"]


def test_one_entry_grid_is_a_fixed_protocol_with_training_augmentation(hospitals, tmp_path, monkeypatch):
    """A preset whose select_grid has one entry fixes (epochs, share, lr) for every row: no validation split is
    spent, no fit-split classifier is trained, the request's epochs are overridden, and the classifier is
    pre-trained and fine-tuned with the preset's augmentation (what pcam-c17-hospitals-fixed ships)."""
    from histodd_fed.federation import presets
    from histodd_fed.federation.centre import CentreNode
    from histodd_fed.federation.centre_config import ExportPolicy
    from histodd_fed.federation.coordinator import LocalTransport, StudyConfig, run_transfer_study
    from histodd_fed.federation.enrol import enrol
    from histodd_fed.training import trainer

    fixed = presets.PRESETS["pcam-c17-hospitals-fixed"]
    assert len(fixed.select_grid) == 1 and fixed.train_augmentation and fixed.stain_normalise_received
    monkeypatch.setitem(presets.PRESETS, "tiny-fixed", replace(
        presets.PRESETS["tiny"], name="tiny-fixed", max_train_patches=0, select_grid=((2, 0.8, 3.0),),
        train_augmentation="flip_rotate", stain_normalise_received=True))
    seen: list = []
    real = trainer.train_classifier
    monkeypatch.setattr(trainer, "train_classifier", lambda *a, **k: seen.append(k.get("augmentation")) or real(*a, **k))
    data = {"H0": hospitals / "H0/source", "H2": hospitals / "H2/target"}
    cfgs, trust = enrol(tmp_path / "fed", data, preset="tiny-fixed", policies={"H0": ExportPolicy(real=True)})
    nodes = {10 + i: CentreNode(c) for i, c in enumerate(cfgs)}
    cfg = StudyConfig(sources=["H0"], target="H2", ipcs=[], full=True, preset="tiny-fixed", fine_tune_epochs=1,
                      study_dir=tmp_path / "study", trust=trust, runtime="local", discovery_timeout=0)
    out = run_transfer_study(LocalTransport(nodes), cfg)
    assert out.faults == [], [f.line() for f in out.faults]
    lr = presets.PRESETS["tiny"].fine_tune_lr
    for r in out.rows:
        sel = r["selection"]
        assert sel["fixed"] and sel["val_patches"] == 0 and r["protocol_chosen_on"] == "fixed by the preset"
        assert r["epochs"] == 2 and r["fine_tune_lr"] == pytest.approx(3.0 * lr)   # the entry, not the request's 1
    full = next(r for r in out.rows if r["mode"] == "full")
    assert full["received_share"] == 0.8 and full["received_stain"] == "macenko->target"
    assert not list((tmp_path / "fed").rglob("select-classifiers/*/model.json"))   # nothing trained to choose
    assert seen and set(seen) == {"flip_rotate"}   # pre-training and every fine-tune augment


def test_target_rows_fine_tuned_in_worker_processes_equal_one_process(hospitals, tmp_path, monkeypatch):
    """A target with ``workers: 2`` fine-tunes its rows (+ ipc, + Full) in two spawned processes: every row's numbers
    equal those of the same study fine-tuned in this process (one torch thread each way)."""
    from histodd_fed.federation import presets, receive_select
    from histodd_fed.federation.centre import CentreNode
    from histodd_fed.federation.centre_config import ExportPolicy
    from histodd_fed.federation.coordinator import LocalTransport, StudyConfig, run_transfer_study
    from histodd_fed.federation.enrol import enrol

    monkeypatch.setitem(presets.PRESETS, "tiny-fixed", replace(
        presets.PRESETS["tiny"], name="tiny-fixed", max_train_patches=0, select_grid=((2, 0.8),)))
    spawned: list = []
    real_rows_in_parallel = receive_select.rows_in_parallel
    monkeypatch.setattr(receive_select, "rows_in_parallel",
                        lambda cfg, n: spawned.append(real_rows_in_parallel(cfg, n)) or spawned[-1])
    data = {"H0": hospitals / "H0/source", "H2": hospitals / "H2/target"}
    got = {}
    for workers in (1, 2):
        root = tmp_path / f"w{workers}"
        cfgs, trust = enrol(root / "fed", data, preset="tiny-fixed",
                            policies={"H0": ExportPolicy(real=True, gate=False)})
        nodes = {10 + i: CentreNode(replace(c, workers=workers)) for i, c in enumerate(cfgs)}
        cfg = StudyConfig(sources=["H0"], target="H2", ipcs=[2], full=True, preset="tiny-fixed", fine_tune_epochs=1,
                          study_dir=root / "study", trust=trust, runtime="local", discovery_timeout=0)
        out = run_transfer_study(LocalTransport(nodes), cfg)
        assert out.faults == [], [f.line() for f in out.faults]
        got[workers] = {r["mode"]: r for r in out.rows}
    assert spawned == [False, True]          # the second study's two rows went to worker processes
    assert set(got[1]) == set(got[2]) == {"none", "synthetic", "full"}
    for mode, r in got[1].items():
        for key in ("patch_accuracy", "patch_balanced_accuracy", "patch_auc", "images", "epochs", "received_share"):
            assert got[2][mode].get(key) == r.get(key), (mode, key)


def test_a_row_left_with_only_its_per_slide_set_is_a_fault_that_says_why():
    """A source's ipc-50 patch set blocked by its export gate, its per-slide set sent: the target's row has no
    patch-level set. The fault row says so (its own code and fixed message), not "could not read its data"."""
    from types import SimpleNamespace

    from histodd_fed.federation.envelope import Envelope
    from histodd_fed.federation.receive_select import train_rows

    request = Envelope(body={"baseline": False, "bundles": [
        {"name": "H0-ipc50-slides", "row": "H0-ipc50", "part": "slides", "ipc": 50, "mode": "synthetic"}]},
        blobs={"H0-ipc50-slides": b"sealed bytes"})
    cfg = SimpleNamespace(centre_id="H2", workers=1, key_passphrase="")
    rows = train_rows(cfg, None, None, request, epochs=1)
    assert len(rows) == 1 and rows[0]["ok"] is False and rows[0]["name"] == "H0-ipc50"
    assert rows[0]["error_code"] == "NoPatchSetError"
    assert "no patch-level set" in rows[0]["error"] and "blocked by the export gate" in rows[0]["error"]
    assert "could not read its data" not in rows[0]["error"]


def test_pooled_labels_refuse_mixed_rows():
    from histodd_fed.federation.envelope import ProtocolError
    from histodd_fed.federation.receive_select import pooled_labels

    a = {"source": "H0", "row": "ipc10", "part": "patch", "kind": "synthetic", "ipc": 10, "sign_key_id": "k0"}
    b = dict(a, source="H1", sign_key_id="k1")
    assert pooled_labels([a, b])["name"] == "H0+H1-ipc10"
    with pytest.raises(ProtocolError, match="sealed as rows"):
        pooled_labels([a, dict(b, row="full", kind="real")])
    with pytest.raises(ProtocolError, match="two bundles of H0"):
        pooled_labels([a, dict(a)])
    with pytest.raises(ProtocolError, match="as a patch set"):
        pooled_labels([a, dict(b, part="slides")])
    assert math.isclose(len(pooled_labels([a])["sources"]), 1)


def test_sources_travel_in_the_flower_run_config(tmp_path):
    import tomllib

    from coordinator.cli import run_config_for
    from coordinator.server_app import study_config_from_run_config
    from histodd_fed.federation.coordinator import StudyConfig
    from histodd_fed.federation.local_simulation import _toml_value

    cfg = StudyConfig(sources=["H0", "H1", "H3"], target="H2", ipcs=[10], study_dir=tmp_path / "s",
                      trust=tmp_path / "t.json", preset="pcam-c17-hospitals")
    text = "".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config_for(cfg).items())
    back = study_config_from_run_config(tomllib.loads(text))
    assert back.source_list() == ["H0", "H1", "H3"] and back.pooled() and back.target == "H2"
    assert back.directions() == [("H0", "H2"), ("H1", "H2"), ("H3", "H2")]
    single = study_config_from_run_config(tomllib.loads("".join(
        f"{k} = {_toml_value(v)}\n" for k, v in run_config_for(StudyConfig(study_dir=tmp_path)).items())))
    assert single.source_list() == ["C1"] and not single.pooled()


def test_a_killed_run_resumes_from_its_finished_studies(tmp_path):
    """Seeds a first run finished are reused by the same command (same OUT); other settings reuse nothing."""
    from histodd_fed.federation.hospital_benchmark import run_hospitals_benchmark

    centres = _fake_centres(tmp_path / "c")
    out = tmp_path / "R"
    first = FakeStudy(fail={("H2", 1)})          # seed 1 "dies": only seed 0's study report is written
    run_hospitals_benchmark(centres, out, run_study=first, say=[].append, sources="0", target="2", ipcs=[10],
                            seeds=2)
    assert (out / "runs" / "H2" / "seed0" / "report.json").is_file()
    assert not (out / "runs" / "H2" / "seed1" / "report.json").exists()
    again, msgs = FakeStudy(), []
    rep = run_hospitals_benchmark(centres, out, run_study=again, say=msgs.append, sources="0", target="2",
                                  ipcs=[10], seeds=3)
    assert [c.seed for c, _ in again.calls] == [1, 2]                   # seed 0 reused, not re-run
    assert any("seed 0: finished in an earlier run, reused" in m for m in msgs)
    fresh_out = tmp_path / "fresh"
    fresh = run_hospitals_benchmark(centres, fresh_out, run_study=FakeStudy(), say=[].append, sources="0",
                                    target="2", ipcs=[10], seeds=3)
    assert rep["rows"] == fresh["rows"]                                 # resumed == run in one go
    # another ipc list with the same OUT: nothing reused, and it says so
    other, msgs = FakeStudy(), []
    run_hospitals_benchmark(centres, out, run_study=other, say=msgs.append, sources="0", target="2", ipcs=[10, 50],
                            seeds=1)
    assert [c.seed for c, _ in other.calls] == [0] and any("none is reused" in m for m in msgs)
    # a study report whose own config names another seed is never taken for this one
    cfg_path = out / "runs" / "H2" / "seed0" / "report.json"
    doc = json.loads(cfg_path.read_text())
    doc["config"]["seed"] = 7
    cfg_path.write_text(json.dumps(doc))
    last = FakeStudy()
    run_hospitals_benchmark(centres, out, run_study=last, say=[].append, sources="0", target="2", ipcs=[10, 50],
                            seeds=1)
    assert [c.seed for c, _ in last.calls] == [0]


def test_a_stopped_run_leaves_the_summary_of_its_finished_studies(tmp_path):
    """A run stopped mid-way (Ctrl-C, kill, a session's end) leaves summary.md/csv/png and report.json of the
    studies it finished, marked partial, the targets it never reached left out (not fault rows); the resumed
    run's summary is the whole one, unmarked."""
    from histodd_fed.federation.hospital_benchmark import run_hospitals_benchmark

    class StoppedAt(FakeStudy):
        def __call__(self, cfg, nodes):
            if (cfg.target, cfg.seed) == ("H1", 1):
                raise KeyboardInterrupt
            return super().__call__(cfg, nodes)

    centres = _fake_centres(tmp_path / "c")
    out = tmp_path / "R"
    with pytest.raises(KeyboardInterrupt):
        run_hospitals_benchmark(centres, out, run_study=StoppedAt(), say=[].append, sources=None, target="all",
                                ipcs=[10], seeds=2)
    rep = json.loads((out / "report.json").read_text())
    assert rep["partial"] is True and (rep["studies_done"], rep["studies"]) == (3, 10)
    summary = list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))
    assert [(r["target"], r["transfer"], r["n_seeds"]) for r in summary] == [
        ("H0", "target alone", "2"), ("H0", "+ ipc 10", "2"), ("H0", "+ Full", "2"),
        ("H1", "target alone", "1"), ("H1", "+ ipc 10", "1"), ("H1", "+ Full", "1")]
    assert all(r["n_faults"] == "0" for r in summary)
    md = (out / "summary.md").read_text()
    assert "Partial: 3 of 10 studies done" in md and "same --out" in md
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(csv.DictReader(io.StringIO((out / "summary_per_seed.csv").read_text())))) == 9
    again = FakeStudy()
    rep = run_hospitals_benchmark(centres, out, run_study=again, say=[].append, sources=None, target="all",
                                  ipcs=[10], seeds=2)
    assert len(again.calls) == 7 and rep["partial"] is False and rep["studies_done"] == 10
    assert "Partial" not in (out / "summary.md").read_text()
    assert len(list(csv.DictReader(io.StringIO((out / "summary.csv").read_text())))) == 15
