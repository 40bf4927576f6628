"""Centre handlers, the ClientApp and the coordinator's study logic on real PCam patches.

Real keys, real bundles, real (tiny) training; the in-process transport stands in for Flower
so faults can be timed precisely (the Flower runtimes are covered by test_federation_flower).
"""

import time
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PCAM = DATA / "pcam-ai4all"


def _centres(root: Path, faults=None):
    if not PCAM.exists():
        pytest.skip(f"real PCam patches not found at {PCAM}")
    from histodd_fed.federation.enrol import enrol
    from histodd_fed.patchset import load_image_folder

    for cid, split, seed in (("C1", "train", 1), ("C2", "valid", 2)):
        d = root / "data" / cid
        if not d.exists():
            load_image_folder(PCAM / split, limit_per_class=24, seed=seed).save(d)
    return enrol(root, {"C1": root / "data/C1", "C2": root / "data/C2"}, preset="tiny", faults=faults)


def _study(root: Path, trust, **kw):
    from histodd_fed.federation.coordinator import StudyConfig

    return StudyConfig(ipcs=kw.pop("ipcs", []), preset="tiny", fine_tune_epochs=1, study_dir=root / "study",
                       trust=trust, **{"runtime": "local", "discovery_timeout": 0, **kw})


def test_clientapp_answers_identity_through_flower_messages(tmp_path):
    from flwr.app import Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from centre_node.client_app import app, handle
    from histodd_fed.federation.envelope import Envelope
    from histodd_fed.federation.flower_records import envelope_to_recorddict, recorddict_to_envelope

    cfgs, _ = _centres(tmp_path)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    ctx = Context(run_id=1, node_id=7, node_config=cfgs[0].to_node_config(), state=RecordDict(), run_config={})
    msg = Message(envelope_to_recorddict(Envelope(body={"prepare": False})), dst_node_id=7,
                  message_type="query.identity")
    rep = recorddict_to_envelope(handle(msg, ctx).content)
    assert rep.body["ok"] and rep.body["centre_id"] == "C1"
    assert rep.body["identity"]["format"] == "histodd-identity"
    assert "query.train" in app._registered_funcs
    # a node config without its data path is reported, not crashed
    bad = Context(run_id=1, node_id=7, node_config={"centre-id": "C1"}, state=RecordDict(), run_config={})
    rep = recorddict_to_envelope(handle(msg, bad).content)
    assert not rep.body["ok"] and "data" in rep.body["error"]


def test_study_full_transfer_then_restart_reuses_bundles(tmp_path):
    from histodd_fed.federation.centre import CentreNode
    from histodd_fed.federation.coordinator import LocalTransport, run_transfer_study
    from histodd_fed.federation.study import write_report

    cfgs, trust = _centres(tmp_path)
    nodes = {10 + i: CentreNode(c) for i, c in enumerate(cfgs)}
    cfg = _study(tmp_path, trust)
    out = run_transfer_study(LocalTransport(nodes), cfg)
    assert not out.faults, [f.line() for f in out.faults]
    kinds = sorted(r["mode"] for r in out.rows)
    assert kinds == ["full", "none"]
    full = next(r for r in out.rows if r["mode"] == "full")
    assert full["images"] == out.centres["C1"]["n_train"] and full["bytes"] > 10_000 and 0 <= full["patch_accuracy"] <= 1
    paths = write_report(cfg, out)
    assert "| C1 | C2 | Full |" in paths["markdown"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    # restart: the verified bundle is reused, the source is not asked again
    out2 = run_transfer_study(LocalTransport(nodes), cfg)
    assert "distil" not in out2.messages and not out2.faults
    assert next(r for r in out2.rows if r["mode"] == "full")["patch_accuracy"] == full["patch_accuracy"]


def test_tampered_bundle_is_reported_and_excluded(tmp_path):
    from histodd_fed.federation.centre import CentreNode
    from histodd_fed.federation.coordinator import LocalTransport, run_transfer_study

    cfgs, trust = _centres(tmp_path, faults={"C1": "tamper"})
    out = run_transfer_study(LocalTransport({1: CentreNode(cfgs[0]), 2: CentreNode(cfgs[1])}), _study(tmp_path, trust))
    bad = [f for f in out.faults if f.kind == "bad_bundle"]
    assert bad and bad[0].centre == "C1" and "Signature" in bad[0].detail
    assert [r["mode"] for r in out.rows] == ["none"]  # only the target's own baseline


def test_silent_centre_is_reported_and_study_goes_on(tmp_path):
    from histodd_fed.federation.centre import CentreNode
    from histodd_fed.federation.coordinator import LocalTransport, run_transfer_study

    cfgs, trust = _centres(tmp_path, faults={"C2": "hang:train:90"})
    cfg = _study(tmp_path, trust, both_directions=True, reply_timeout=15)
    t0 = time.monotonic()
    out = run_transfer_study(LocalTransport({1: CentreNode(cfgs[0]), 2: CentreNode(cfgs[1])}), cfg)
    assert time.monotonic() - t0 < 85  # did not wait for the silent centre
    assert [(f.centre, f.stage, f.kind) for f in out.faults] == [("C2", "train", "timeout")]
    assert {r["target"] for r in out.rows} == {"C1"} and any(r["mode"] == "full" for r in out.rows)


def test_untrusted_centre_is_excluded(tmp_path):
    from histodd_fed.bundle.trust import TrustStore
    from histodd_fed.federation.centre import CentreNode
    from histodd_fed.federation.coordinator import LocalTransport, run_transfer_study

    cfgs, trust = _centres(tmp_path)
    store = TrustStore.load(trust)
    store.remove("C2")
    store.save()
    out = run_transfer_study(LocalTransport({1: CentreNode(cfgs[0]), 2: CentreNode(cfgs[1])}), _study(tmp_path, trust))
    assert ("C2", "untrusted") in [(f.centre, f.kind) for f in out.faults] and not out.rows
    assert "distil" not in out.messages
