"""The export gate's verdicts reused for a set gated before (histodd_fed/federation/gate_verdicts.py): the real
gate on a tiny centre of real PCam patches; the attacks write the work directory as someone who cannot read the
centre's key folder would."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

PCAM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pcam-ai4all"


@pytest.fixture()
def centre(tmp_path, monkeypatch):
    """(cfg, preset, prepared, gate runs): a tiny centre, and the list each real gate run appends to."""
    if not PCAM.exists():
        pytest.skip(f"real PCam patches not found at {PCAM}")
    from histodd_fed.federation import centre_data, privacy_reports
    from histodd_fed.federation.centre_config import CentreConfig
    from histodd_fed.federation.presets import get_preset
    from histodd_fed.patchset import load_image_folder

    load_image_folder(PCAM / "valid", limit_per_class=24, seed=2).save(tmp_path / "data")
    cfg = CentreConfig("C1", tmp_path / "data", tmp_path / "keys", tmp_path / "work", preset="tiny", seed=3)
    cfg.key_dir.mkdir(mode=0o700)
    preset = get_preset("tiny")
    prepared = centre_data.prepare(cfg, preset, models=False)
    runs: list[int] = []
    real_gate = privacy_reports.gate_report

    def counting_gate(ps, prep, **kw):
        runs.append(len(ps))
        return real_gate(ps, prep, **kw)

    monkeypatch.setattr(privacy_reports, "gate_report", counting_gate)
    return cfg, preset, prepared, runs


def _records(cfg) -> list[Path]:
    return sorted((cfg.work_dir / "gate-verdicts").glob("*.json"))


def test_a_set_gated_once_is_not_gated_again(centre):
    from histodd_fed.federation.outgoing_sets import Part, make_part

    cfg, preset, prepared, runs = centre
    first = make_part(cfg, preset, Part(2, False), 3, prepared=prepared)
    again = make_part(cfg, preset, Part(2, False), 3, prepared=prepared)
    assert runs == [4] and again.result.cached                       # the set from the distil cache, not re-gated
    assert (again.blocked, again.report, again.message) == (first.blocked, first.report, first.message)
    assert len(_records(cfg)) == 1 and (cfg.key_dir / "gate-verdicts.key").stat().st_mode & 0o777 == 0o600
    make_part(cfg, preset, Part(2, False), 4, prepared=prepared)     # another seed: another set, gated
    assert runs == [4, 4] and len(_records(cfg)) == 2


def test_another_set_its_metadata_or_the_code_is_gated_again(centre, monkeypatch):
    from histodd_fed.federation import gate_verdicts, privacy_reports
    from histodd_fed.federation.outgoing_sets import Part, make_part

    cfg, preset, prepared, runs = centre
    ps = make_part(cfg, preset, Part(2, False), 3, prepared=prepared).result.patchset
    assert runs == [4]
    nudged = replace(ps, images=ps.images.copy())
    nudged.images[0, 0, 0, 0] ^= 1                                   # one pixel of one image
    privacy_reports.sent_set_report(nudged, prepared, cfg)
    assert runs == [4, 4]
    relabelled = replace(ps, meta={**ps.meta, "dp": {"epsilon": 1.0}})  # same pixels, other metadata
    privacy_reports.sent_set_report(relabelled, prepared, cfg)
    assert runs == [4, 4, 4]
    monkeypatch.setattr(gate_verdicts, "code_digest", lambda: "another version of the package")
    privacy_reports.sent_set_report(ps, prepared, cfg)
    assert runs == [4, 4, 4, 4]


def test_attack_edited_or_planted_verdicts_are_ignored(centre):
    """An attacker who can write the work directory but not read the key folder: flips a recorded verdict, then
    plants a "passed" record for a set of the centre's own real patches. Both are ignored; the gate runs and
    blocks the copies."""
    from histodd_fed.federation import gate_verdicts, privacy_reports
    from histodd_fed.federation.outgoing_sets import Part, make_part

    cfg, preset, prepared, runs = centre
    first = make_part(cfg, preset, Part(2, False), 3, prepared=prepared)
    (path,) = _records(cfg)
    rec = json.loads(path.read_text())
    rec["blocked"] = not rec["blocked"]
    path.write_text(json.dumps(rec))
    again = make_part(cfg, preset, Part(2, False), 3, prepared=prepared)
    assert runs == [4, 4] and again.blocked == first.blocked         # the edit was ignored: the gate ran again

    reference = prepared.gate_reference()
    pick = np.concatenate([np.flatnonzero(reference.labels == c)[:2] for c in (0, 1)])
    copies = reference.subset(pick)                                   # the centre's own real patches, as "synthetic"
    key = gate_verdicts.verdict_key(copies, reference)
    planted = {"key": key, "blocked": False, "report": first.report, "message": "passed",
               "mac": "0" * 64}
    (cfg.work_dir / "gate-verdicts" / f"{key[:32]}.json").write_text(json.dumps(planted))
    blocked, _, message = privacy_reports.sent_set_report(copies, prepared, cfg)
    assert blocked and runs == [4, 4, 4], message
    assert json.loads((cfg.work_dir / "gate-verdicts" / f"{key[:32]}.json").read_text())["blocked"] is True
