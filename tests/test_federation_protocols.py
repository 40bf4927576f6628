"""Fine-tuning protocols of a target (union / sequential / received) and the study table's cost columns."""

from __future__ import annotations

import pytest

from histodd_fed.errors import ConfigError
from histodd_fed.federation.coordinator import StudyOutcome
from histodd_fed.federation.presets import get_preset
from histodd_fed.federation.study import COLUMNS, csv_text, markdown_table, table_rows


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
                {"sequential_lr_scale": 0.0}):
        with pytest.raises(ConfigError):
            get_preset("tiny", **bad)
    with pytest.raises(ConfigError):
        get_preset("tiny").for_protocol("sequential")


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
