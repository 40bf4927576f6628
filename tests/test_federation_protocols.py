"""Fine-tuning protocols of a target (union / sequential / received) and the study table's cost columns."""

from __future__ import annotations

from dataclasses import replace

import pytest

from histodd_fed.errors import ConfigError
from histodd_fed.federation.coordinator import StudyOutcome
from histodd_fed.federation.presets import get_preset
from histodd_fed.federation.study import COLUMNS, csv_text, markdown_table, table_rows
from histodd_fed.patchset import PatchSet


def test_protocols_are_validated_and_receive_side_only():
    p = get_preset("tiny", also_protocols=("sequential",))
    assert p.protocols() == ("union", "sequential")
    assert p.prepare_dict() == get_preset("tiny").prepare_dict()   # preparation is not invalidated
    assert p.receive_protocol() != get_preset("tiny").receive_protocol()
    seq = p.for_protocol("sequential")
    assert seq.fine_tune_protocol == "sequential" and seq.also_protocols == ()
    assert "also_protocols" not in get_preset("tiny").receive_protocol()  # union-only: key as before
    assert get_preset("cpu").protocols() == ("union", "sequential")       # the demo reports both
    assert get_preset("pcam-c17").protocols() == ("union",)
    for bad in ({"also_protocols": ("mine",)}, {"also_protocols": ("union",)}, {"fine_tune_protocol": "x"},
                {"sequential_lr_scale": 0.0}, {"select_grid": ((5, 0.5, 0.0),)}, {"select_grid": ((5,),)},
                {"select_grid": ((5, 1.0),)}, {"select_grid": ((5, 0.5, 1.0, 2.0),)}):
        with pytest.raises(ConfigError):
            get_preset("tiny", **bad)
    with pytest.raises(ConfigError):
        get_preset("tiny").for_protocol("sequential")
    # select_grid: (epochs, share[, lr scale]); the lr scale is 1 when left out
    assert get_preset("tiny", select_grid=((5, 0.5), (3, 0.95, 20))).select_grid == ((5, 0.5, 1.0), (3, 0.95, 20.0))


def _row(protocol, mode, **kw):
    base = {"source": None if mode == "none" else "C1", "target": "C2", "mode": mode, "name": mode,
            "fine_tune_protocol": protocol, "patch_balanced_accuracy": 0.8, "fine_tune_seconds": 10.0,
            "bytes": 0 if mode == "none" else 1000, "images": 0 if mode == "none" else 20, "epochs": 5}
    return {**base, **kw}


def test_time_vs_full_is_the_received_only_cost():
    rows = [_row("union", "none"), _row("sequential", "none"),
            _row("union", "synthetic", ipc=10, name="C1-ipc10", fine_tune_seconds=40.0),
            _row("union", "full", fine_tune_seconds=41.0, bytes=20000, images=600),
            _row("sequential", "synthetic", ipc=10, name="C1-ipc10", received_seconds=0.5),
            _row("sequential", "full", received_seconds=20.0, bytes=20000, images=600)]
    out = table_rows(StudyOutcome(rows=rows))
    assert [(r["protocol"], r["transfer"]) for r in out] == [
        ("union", "no transfer"), ("union", "ipc 10"), ("union", "Full"),
        ("sequential", "no transfer"), ("sequential", "ipc 10"), ("sequential", "Full")]
    t = {(r["protocol"], r["transfer"]): r["time_vs_full"] for r in out}
    # not 40 / 41: the same received sets cost 0.5 s vs 20 s to train on alone, whatever the protocol
    assert t["union", "ipc 10"] == t["sequential", "ipc 10"] == 0.025
    assert t["union", "Full"] == 1.0 and t["union", "no transfer"] is None
    assert {r["bytes_vs_full"] for r in out if r["transfer"] == "ipc 10"} == {0.05}
    assert csv_text(out).splitlines()[0].split(",")[: len(COLUMNS)] == COLUMNS
    md = markdown_table([dict(r, train_total=619) for r in out])
    assert md.count("Note: Full C1->C2: 600 of the source's 619") == 1 and md.count("Note: received_s:") == 1


def test_time_vs_full_is_left_empty_when_not_measured():
    out = table_rows(StudyOutcome(rows=[_row("union", "synthetic", ipc=10), _row("union", "full")]))
    assert [r["time_vs_full"] for r in out] == [None, None]
    assert [r["bytes_vs_full"] for r in out] == [1.0, 1.0]


def test_demo_preset_distils_with_the_pinned_gate_passing_recipe():
    """cpu (the demo): DM from colour-coherent mixtures + the privacy term, pinned; cpu-gm keeps the old one."""
    from pathlib import Path

    from histodd_fed.distill.config import DistillConfig

    repo = Path(__file__).resolve().parents[1]
    o = dict(get_preset("cpu").distill_overrides)
    assert (o["objective"], o["init"], o["init_anchor"], o["privacy_step"]) == ("distribution", "mixture", "kmeans", 0.1)
    cfg = DistillConfig.from_yaml(repo / get_preset("cpu").distill_config, **o)   # a valid config
    assert cfg.outer_steps == 400 and cfg.pool_epochs == 0
    assert dict(get_preset("cpu-gm").distill_overrides)["init"] == "real"
    assert get_preset("cpu-gm").prepare_dict() != get_preset("cpu").prepare_dict()


def _fake_training(monkeypatch):
    """Record every fine-tune call of the target's classifier (no torch work) and score by seed."""
    import numpy as np

    from histodd_fed import training
    from histodd_fed.federation import centre_data, fine_tuning

    calls = []

    class Model:
        seed = None

    def fine_tune(model, train, *, epochs, lr, batch_size, seed, device, progress, augmentation=None):
        model.seed = seed
        calls.append({"n": len(train), "epochs": epochs, "lr": lr, "seed": seed,
                      "received": int((train.images.reshape(len(train), -1)[:, 0] == 7).sum())})

    monkeypatch.setattr(training, "fine_tune", fine_tune)
    monkeypatch.setattr(training, "load_model", lambda d: Model())
    monkeypatch.setattr(fine_tuning, "patch_metrics", lambda m, t: {
        "patch_accuracy": 0.9, "patch_balanced_accuracy": 0.6 + 0.1 * (m.seed or 0), "patch_auc": 0.9})
    own = PatchSet(images=np.zeros((30, 4, 4, 3), np.uint8), labels=np.array([0] * 27 + [1] * 3),
                   class_names=["normal", "tumour"])
    rec = PatchSet(images=np.full((20, 4, 4, 3), 7, np.uint8), labels=np.repeat([0, 1], 10),
                   class_names=["normal", "tumour"])
    prepared = centre_data.Prepared(None, own, own, None, False, "h" * 16, {})
    return calls, prepared, rec


def test_sequential_received_phase_min_steps_and_replay(monkeypatch):
    from histodd_fed.federation import fine_tuning

    calls, prepared, rec = _fake_training(monkeypatch)
    assert fine_tuning.steps_per_epoch(20, 32) == 1 and fine_tuning.steps_per_epoch(600, 32) == 19
    assert fine_tuning.steps_per_epoch(33, 32) == 1 and fine_tuning.steps_per_epoch(0, 32) == 0
    base = get_preset("cpu", sequential_min_steps=0, sequential_replay=0.0).for_protocol("sequential")
    # as before issue 12 section 4: received alone for the row's epochs at 10x lr, then own data only
    fine_tuning._fine_tune_classifier(prepared, base, rec, epochs=5, seed=0)
    assert [(c["n"], c["epochs"], c["received"]) for c in calls] == [(20, 5, 20), (54, 5, 0)]
    assert calls[0]["lr"] == pytest.approx(10 * calls[1]["lr"])
    calls.clear()
    assert (get_preset("cpu").sequential_min_steps, get_preset("cpu").sequential_replay) == (25, 0.25)  # the demo's
    p = get_preset("cpu", sequential_min_steps=50, sequential_replay=0.25).for_protocol("sequential")
    _, info = fine_tuning._fine_tune_classifier(prepared, p, rec, epochs=5, seed=0)
    assert calls[0]["epochs"] == 50 and info["received_epochs"] == 50      # 20 images: one step an epoch
    own_phase = calls[1]
    assert own_phase["n"] == 54 + 18 and own_phase["received"] == 18      # received replayed at 25%
    # a big received set already takes more steps than the minimum: epochs unchanged
    assert fine_tuning.received_phase_epochs(600, 5, p) == 5 and fine_tuning.received_phase_epochs(20, 0, p) == 0
    calls.clear()
    fine_tuning._fine_tune_classifier(prepared, p, None, epochs=5, seed=0)  # no transfer: own phase only
    assert [(c["n"], c["received"]) for c in calls] == [(54, 0)]
    assert p.receive_protocol() != base.receive_protocol()
    assert "sequential_replay" not in base.receive_protocol()             # defaults: cache keys as before
    for bad in ({"sequential_replay": 1.0}, {"sequential_min_steps": -1}, {"fine_tune_seeds": 0}):
        with pytest.raises(ConfigError):
            get_preset("tiny", **bad)


def test_fine_tune_seeds_average_the_patch_metrics(monkeypatch):
    from histodd_fed.federation import fine_tuning

    calls, prepared, rec = _fake_training(monkeypatch)
    p = get_preset("cpu", fine_tune_seeds=3).for_protocol("union")
    metrics, info = fine_tuning.fine_tune_and_score(prepared, p, rec, epochs=5, seed=0)
    assert [c["seed"] for c in calls] == [0, 1, 2]
    assert metrics["patch_balanced_accuracy"] == pytest.approx(0.7)           # mean of 0.6 / 0.7 / 0.8
    assert info["patch_balanced_accuracy_by_seed"] == [0.6, 0.7, 0.8] and info["fine_tune_seeds"] == 3
    calls.clear()
    metrics, info = fine_tuning.fine_tune_and_score(prepared, replace(p, fine_tune_seeds=1), rec, epochs=5, seed=0)
    assert len(calls) == 1 and "fine_tune_seeds" not in info
    assert fine_tuning._own_key(p) != fine_tuning._own_key(get_preset("cpu"))


def test_table_notes_a_longer_received_phase_and_replay():
    rows = [_row("sequential", "none"),
            _row("sequential", "synthetic", ipc=10, name="C1-ipc10", received_seconds=2.0, received_epochs=25,
                 sequential_replay=0.25),
            _row("sequential", "full", received_seconds=20.0, bytes=20000, images=600, received_epochs=5,
                 sequential_replay=0.25)]
    out = table_rows(StudyOutcome(rows=rows))
    md = markdown_table(out)
    assert "minimum number of steps (ipc 10: 25 epochs)" in md and "at 0.25 of each epoch" in md
    assert [r["received_epochs"] for r in out] == [None, 25, 5]
    assert "received_epochs" in csv_text(out).splitlines()[0]
