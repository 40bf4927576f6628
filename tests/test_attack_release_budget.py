"""Attacks on a centre's release budget (issue 20 item 5, issue 24 item 6's seed part), performed as a
coordinator or recipient would: through ``centre-node export`` and through the centre's request handler
(``CentreNode.handle("distil", ...)``, what the ClientApp runs).

Every release leaks a little, so the centre (not the requester) caps, per recipient, how many distinct
sets leave (``max_releases``), the epsilon of one DP set (``max_epsilon``) and the epsilons of all DP
sets summed (``max_epsilon_total``, basic composition), and it picks the distillation seeds.
DP sets here are written by hand (``meta["dp"]``, ``meta["method"] = "dm-dp"``): no DP distillation runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from centre_node.cli import app
from histodd_fed.patchset import PatchSet

REPO = Path(__file__).resolve().parents[1]
NONCE = "cd" * 32
runner = CliRunner()


def _set(i: int, dp: float | None = None, seed: int | None = None, n: int = 6) -> PatchSet:
    """A small synthetic set whose content depends on ``i`` (a new seed: new content)."""
    rng = np.random.default_rng(1000 + i)
    meta = {"method": "dm", "seed": i if seed is None else seed, "ipc": n // 2}
    if dp is not None:
        meta.update(method="dm-dp", dp={"epsilon": dp, "delta": 1e-5, "accountant": "rdp (test)"})
    return PatchSet(images=rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8), labels=np.arange(n) % 2,
                    class_names=["normal", "tumour"], kind="synthetic", meta=meta)


# ---------------------------------------------------------------------------- the CLI
@pytest.fixture
def cli(tmp_path, monkeypatch):
    """Keys for C1 (the exporting centre) and C2 (the recipient), trusting each other; the privacy
    gate stubbed (not what these tests attack: the budget is checked before and after it)."""
    import centre_node.commands.bundle as cmd

    monkeypatch.setattr(cmd, "_privacy_gate", lambda *a, **k: {"gate": "stub"})
    k1, k2 = tmp_path / "k1", tmp_path / "k2"
    for cid, k in (("C1", k1), ("C2", k2)):
        _ok("keygen", "--centre-id", cid, "--out", k, "--no-passphrase")
    _ok("trust", "add", k2, "--keys", k1)
    _ok("trust", "add", k1, "--keys", k2)
    return tmp_path, k1, k2


def _ok(*args) -> str:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, f"{args}: {r.output} {r.exception!r}"
    return r.output


def _export(root: Path, k1: Path, ps: PatchSet, name: str, *opts) -> tuple:
    d = ps.save(root / "sets" / name)
    out = root / "out" / f"{name}.hdb"
    r = runner.invoke(app, [str(a) for a in ("export", "--synthetic", d, "--to", "C2", "--keys", k1, "--out", out,
                                             "--accept-privacy-risk", *opts)])
    return r, out


def _refused(r, out: Path, *words: str) -> None:
    from histodd_fed.bundle.releases import ReleaseBudgetError

    assert type(r.exception) is ReleaseBudgetError, (r.output, r.exception)
    msg = str(r.exception)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert not out.exists()


def _ledger(k1: Path) -> dict:
    p = k1 / "releases.json"
    return json.loads(p.read_text())["releases"] if p.exists() else {}


def test_attack_many_sets_with_new_seeds_stop_at_max_releases(cli):
    root, k1, _ = cli
    for i in range(3):  # the recipient asks again and again, a new seed each time
        r, out = _export(root, k1, _set(i), f"s{i}", "--max-releases", "3")
        assert r.exit_code == 0 and out.exists(), r.output
    before = (k1 / "releases.json").read_bytes()
    r, out = _export(root, k1, _set(3), "s3", "--max-releases", "3")
    _refused(r, out, "max-releases", "C2", "3 of 3", "release 4")
    assert (k1 / "releases.json").read_bytes() == before  # no ledger entry
    assert {e["seed"] for e in _ledger(k1).values()} == {0, 1, 2}


def test_attack_dp_sets_whose_epsilons_sum_past_the_total(cli):
    root, k1, _ = cli
    for i in range(2):
        r, out = _export(root, k1, _set(i, dp=6.0), f"dp{i}")
        assert r.exit_code == 0, r.output
    r, out = _export(root, k1, _set(2, dp=6.0), "dp2")  # 12 + 6 > 16 (the default total)
    _refused(r, out, "max-epsilon-total", "C2", "12 of 16", "requests 6")
    assert len(_ledger(k1)) == 2
    r, out = _export(root, k1, _set(3, dp=4.0), "dp3")  # 12 + 4 = 16: still within the total
    assert r.exit_code == 0, r.output
    r, out = _export(root, k1, _set(4), "plain")  # not DP: no epsilon, counts toward max-releases only
    assert r.exit_code == 0 and "no formal privacy bound" in r.output, r.output
    used = [e["epsilon"] for e in _ledger(k1).values()]
    assert sorted(used, key=lambda x: (x is None, x)) == [4.0, 6.0, 6.0, None]


def test_attack_dp_set_above_the_per_release_cap(cli):
    root, k1, _ = cli
    r, out = _export(root, k1, _set(0, dp=9.0), "big")  # the first release, but epsilon 9 > 8
    _refused(r, out, "max-epsilon", "epsilon 9", "cap 8")
    assert not (k1 / "releases.json").exists()
    r, out = _export(root, k1, _set(0, dp=9.0), "big2", "--max-epsilon", "10", "--max-epsilon-total", "10")
    assert r.exit_code == 0, r.output  # the centre may raise its own cap


def test_reexporting_the_same_set_is_not_double_counted(cli):
    root, k1, k2 = cli
    ps = _set(0, dp=5.0)
    for j in range(4):  # the same content, from two folders, the meta rewritten: one release
        if j == 2:
            ps.meta["note"] = "re-saved"
        r, out = _export(root, k1, ps, f"same{j}", "--max-releases", "1", "--max-epsilon-total", "5")
        assert r.exit_code == 0, r.output
    (entry,) = _ledger(k1).values()
    assert entry["exports"] == 4 and entry["release"] == 1 and len(entry["bundles"]) == 4
    info = json.loads(_ok("inspect", out, "--keys", k1, "--json"))
    assert info["release"]["C2"] == {"count": 1, "epsilon_total": 5.0}
    r, out = _export(root, k1, _set(1), "other", "--max-releases", "1")  # a different set: a new release
    _refused(r, out, "max-releases", "1 of 1")


def test_refused_export_writes_nothing_and_exits_2_with_one_line(cli):
    """Through the real entry point (centre_node.cli.main): exit 2, one line, nothing written, an
    existing file at --out left as it was."""
    root, k1, _ = cli
    r, _ = _export(root, k1, _set(0), "first", "--max-releases", "1")
    assert r.exit_code == 0, r.output
    d = _set(1).save(root / "sets" / "second")
    out = root / "out" / "keep.hdb"
    out.write_bytes(b"an earlier file")
    before = {p: p.read_bytes() for p in k1.iterdir() if p.is_file()}
    p = subprocess.run([sys.executable, "-c", "from centre_node.cli import main; main()", "export",
                        "--synthetic", str(d), "--to", "C2", "--keys", str(k1), "--out", str(out),
                        "--max-releases", "1"], capture_output=True, text=True, cwd=REPO, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "max-releases" in lines[0] and "1 of 1" in lines[0], p.stderr
    assert out.read_bytes() == b"an earlier file"
    assert {q: q.read_bytes() for q in k1.iterdir() if q.is_file()} == before
    assert not list(out.parent.glob(".*.tmp"))


def test_attack_deleting_or_rolling_back_the_release_ledger(cli):
    """Someone with the key dir but not the budget deletes (or restores an older) releases.json to
    reset every recipient's budget: exports are refused until it is restored."""
    from histodd_fed.bundle import LedgerMissingError

    root, k1, _ = cli
    for i in range(2):
        assert _export(root, k1, _set(i), f"s{i}")[0].exit_code == 0
    full = (k1 / "releases.json").read_text()
    (k1 / "releases.json").unlink()
    r, out = _export(root, k1, _set(5), "after-delete")
    assert type(r.exception) is LedgerMissingError and not out.exists(), r.output
    d = json.loads(full)
    d["releases"] = dict(list(d["releases"].items())[:1])  # an older copy with one release
    (k1 / "releases.json").write_text(json.dumps(d))
    r, out = _export(root, k1, _set(5), "after-rollback")
    assert type(r.exception) is LedgerMissingError and not out.exists(), r.output
    (k1 / "releases.json").write_text(full)
    assert _export(root, k1, _set(5), "restored")[0].exit_code == 0


def test_manifest_records_dp_and_release_count_and_inspect_open_print_them(cli):
    from histodd_fed.bundle import Ledger, load_identity, open_bundle
    from histodd_fed.bundle.trust import TrustStore

    root, k1, k2 = cli
    assert _export(root, k1, _set(0, dp=1.0), "a")[0].exit_code == 0
    r, out = _export(root, k1, _set(1, dp=2.5), "b")
    assert r.exit_code == 0 and "dp epsilon 2.5" in r.output and "C2: release 2" in r.output, r.output
    text = _ok("inspect", out, "--keys", k1)
    assert "epsilon 2.5 delta 1e-05 (rdp (test))" in text and "C2: release 2, epsilon total 3.5" in text, text
    opened = open_bundle(out, load_identity(k2), TrustStore.load(k2), Ledger.in_key_dir(k2 / "other-ledger"))
    m = opened.manifest
    assert m["dp"] == {"epsilon": 2.5, "delta": 1e-5, "accountant": "rdp (test)"}
    assert m["release"] == {"C2": {"count": 2, "epsilon_total": 3.5}}
    assert "dp epsilon 2.5" in _ok("open", out, "--keys", k2, "--out", root / "opened")
    r, plain = _export(root, k1, _set(2), "plain")
    opened = open_bundle(plain, load_identity(k2), TrustStore.load(k2), Ledger.in_key_dir(k2))
    assert "dp" not in opened.manifest and opened.manifest["release"]["C2"]["count"] == 3
    assert "not DP" in _ok("inspect", plain, "--keys", k1)


def test_attack_sender_manifest_dp_that_contradicts_its_config(tmp_path, monkeypatch):
    """A manifest whose dp field claims a smaller epsilon than the sealed distillation config records
    is refused by the recipient (SemanticError), so the dp field can be read without re-deriving it."""
    import importlib

    from histodd_fed.bundle import Ledger, SemanticError, generate_identity, open_bundle, seal
    from histodd_fed.bundle.trust import TrustStore

    seal_mod = importlib.import_module("histodd_fed.bundle.seal")

    a, b = generate_identity("C1", tmp_path / "a"), generate_identity("C2", tmp_path / "b")
    store = TrustStore.load(tmp_path / "b")
    store.add(a.public)
    real = seal_mod.build_manifest

    def lying(*args, **kw):
        m = real(*args, **kw)
        m["dp"] = dict(m["dp"], epsilon=0.1)
        return m

    with monkeypatch.context() as mp:
        mp.setattr(seal_mod, "build_manifest", lying)
        data = seal(_set(0, dp=4.0), a, [b.public])
    with pytest.raises(SemanticError, match="dp differs"):
        open_bundle(data, b, store, Ledger(tmp_path / "ledger.json"))
    ok = open_bundle(seal(_set(0, dp=4.0), a, [b.public]), b, store, Ledger(tmp_path / "ledger.json"))
    assert ok.manifest["dp"]["epsilon"] == 4.0


def test_a_set_claiming_dp_without_an_accounting_is_not_sealed(tmp_path):
    from histodd_fed.bundle import FormatError, generate_identity, seal

    a, b = generate_identity("C1", tmp_path / "a"), generate_identity("C2", tmp_path / "b")
    ps = _set(0)
    ps.meta["method"] = "dm-dp"  # DP by name, no meta dp
    with pytest.raises(FormatError, match="no 'dp' record"):
        seal(ps, a, [b.public])
    ps.meta["dp"] = {"epsilon": float("inf"), "delta": 1e-5, "accountant": "x"}
    with pytest.raises(FormatError, match="epsilon"):
        seal(ps, a, [b.public])


def test_cli_defaults_match_the_library():
    import centre_node.commands.bundle as cmd
    from histodd_fed.bundle import releases
    from histodd_fed.federation import centre

    lib = (releases.DEFAULT_MAX_EPSILON, releases.DEFAULT_MAX_EPSILON_TOTAL, releases.DEFAULT_MAX_RELEASES)
    assert (cmd.DEFAULT_MAX_EPSILON, cmd.DEFAULT_MAX_EPSILON_TOTAL, cmd.DEFAULT_MAX_RELEASES) == lib == (8.0, 16.0, 10)
    assert (centre.DEFAULT_MAX_EPSILON, centre.DEFAULT_MAX_EPSILON_TOTAL, centre.DEFAULT_MAX_RELEASES) == lib


# ---------------------------------------------------------------------------- the Flower path
@pytest.fixture
def centre(tmp_path, monkeypatch):
    """C1 and C2 enrolled; C1's preparation, distillation and gate replaced by fakes (these tests
    attack the policy, not Histo-DD): a request's (ipc, seed) fixes the set's content, and
    ``dp_by_ipc`` makes some of them DP."""
    from histodd_fed.federation import centre_data, distil_cache, privacy_reports
    from histodd_fed.federation.enrol import enrol

    data = {c: tmp_path / "data" / c for c in ("C1", "C2")}
    cfgs, _ = enrol(tmp_path, data)
    calls: list[tuple] = []
    dp_by_ipc: dict[int, float] = {}
    train = _set(99, n=8)

    class FakePrepared:
        config_hash = "f" * 64
        test = train

        def __init__(self):
            self.train = train

        separate_slides = False

        def summary(self):
            return {"n_train_total": len(train)}

        def slide_sets(self):
            return None

    def distil_cached(cfg, preset, prepared, *, ipc, seed, per_slide=False, extra_overrides=None):
        calls.append((ipc, seed))
        ps = _set(1000 * ipc + seed, dp=dp_by_ipc.get(ipc), seed=seed, n=2 * ipc)
        return distil_cache.DistilResult(ps, f"{ipc}-{seed}", False, 0.0)

    monkeypatch.setattr(centre_data, "prepare", lambda cfg, preset, models=True: FakePrepared())
    monkeypatch.setattr(distil_cache, "distil_cached", distil_cached)
    monkeypatch.setattr(privacy_reports, "sent_set_report",
                        lambda ps, prepared, cfg: (False, {"gate": {"passed": True}}, "ok"))
    return cfgs, calls, dp_by_ipc


def _node(cfg, **policy):
    from histodd_fed.federation.centre import CentreConfig, CentreNode

    nc = {k: v for k, v in cfg.to_node_config().items() if not k.startswith("export-")}
    nc.update(policy)
    return CentreNode(CentreConfig.from_node_config(nc))


def _ask(node, **body):
    from histodd_fed.federation.envelope import Envelope

    return node.handle("distil", Envelope(body={"recipients": ["C2"], "nonce": NONCE, **body}))


def _blocked(rep) -> list[str]:
    return [i["error"] for i in rep.body.get("bundles", []) if i.get("blocked")]


def test_attack_coordinator_asks_for_set_after_set(centre):
    cfgs, calls, _ = centre
    node = _node(cfgs[0], **{"export-max-releases": 3})
    for ipc in (1, 2, 3):  # a new set each time (another ipc)
        rep = _ask(node, ipcs=[ipc])
        assert rep.body["ok"] and f"ipc{ipc}" in rep.blobs and not _blocked(rep), rep.body
    rep = _ask(node, ipcs=[4])
    assert rep.body["ok"] and not rep.blobs, rep.body
    (err,) = _blocked(rep)
    assert "max-releases" in err and "3 of 3" in err and "release 4" in err, err
    assert len(_ledger(cfgs[0].key_dir)) == 3
    rep = _ask(node, ipcs=[2])  # the same set again: not a new release, still sent
    assert "ipc2" in rep.blobs and not _blocked(rep), rep.body


def test_attack_coordinator_picks_new_seeds(centre):
    cfgs, calls, _ = centre
    node = _node(cfgs[0])  # no export-seeds: only the centre's own seed (0)
    rep = _ask(node, ipcs=[1], seed=7)
    assert rep.body["ok"] is False and "PolicyError" in rep.body["error"] and "requested seed" in rep.body["error"], rep.body
    assert calls == [] and not (cfgs[0].key_dir / "releases.json").exists()  # refused before any work
    rep = _ask(node, ipcs=[1])  # no seed asked: the centre's own
    assert rep.body["ok"] and calls == [(1, 0)], rep.body
    # a centre that lists seeds: each listed seed is a new set, counted by the ledger
    node = _node(cfgs[0], **{"export-seeds": "0,1,2,3", "export-max-releases": 3})
    for s in (1, 2):
        assert "ipc1" in _ask(node, ipcs=[1], seed=s).blobs
    rep = _ask(node, ipcs=[1], seed=3)
    assert not rep.blobs and "max-releases" in _blocked(rep)[0], rep.body
    assert sorted(e["seed"] for e in _ledger(cfgs[0].key_dir).values()) == [0, 1, 2]


def test_attack_dp_sets_past_the_epsilon_budgets_through_the_handler(centre):
    from histodd_fed.bundle import Ledger, load_identity, open_bundle
    from histodd_fed.bundle.trust import TrustStore

    cfgs, _, dp_by_ipc = centre
    dp_by_ipc.update({1: 3.0, 2: 3.0, 3: 3.0, 4: 2.0})
    node = _node(cfgs[0], **{"export-max-epsilon": "2.5"})
    rep = _ask(node, ipcs=[1])  # epsilon 3 > the per-release cap 2.5
    assert not rep.blobs and "max-epsilon refuses" in _blocked(rep)[0], rep.body
    node = _node(cfgs[0], **{"export-max-epsilon-total": "7"})
    rep = _ask(node, ipcs=[1, 2, 3])  # 3 + 3 fit, the third 3 would make 9 > 7
    assert set(rep.blobs) == {"ipc1", "ipc2"}, rep.body
    (err,) = _blocked(rep)
    assert "max-epsilon-total" in err and "6 of 7" in err and "requests 3" in err, err
    rep = _ask(node, ipcs=[4])  # 6 + 2 > 7 as well
    assert not rep.blobs
    c2 = cfgs[1]
    opened = open_bundle(_ask(node, ipcs=[2]).blobs["ipc2"], load_identity(c2.key_dir), TrustStore.load(c2.key_dir),
                         Ledger.in_key_dir(c2.key_dir))
    assert opened.manifest["dp"]["epsilon"] == 3.0
    assert opened.manifest["release"] == {"C2": {"count": 2, "epsilon_total": 6.0}}
    assert opened.manifest["extra"]["export_policy"]["max_epsilon_total"] == 7.0


@pytest.mark.parametrize("key,value", [("export-max-epsilon", "-1"), ("export-max-epsilon-total", "nan"),
                                       ("export-max-releases", "2.5"), ("export-max-releases", "-1"),
                                       ("export-seeds", "1,x")])
def test_bad_budget_node_config_is_refused(key, value):
    from histodd_fed.errors import ConfigError
    from histodd_fed.federation.centre import ExportPolicy

    with pytest.raises(ConfigError, match=key):
        ExportPolicy.from_node_config(lambda k, default=None: value if k == key else default)


def test_dp_records_as_the_distillers_write_them(tmp_path):
    """meta["dp"] as dm-dp writes it (extra keys) seals with the three manifest fields; dp None
    (dm-nodp, or DP off) is a non-DP set."""
    from histodd_fed.bundle import NO_LEDGER, generate_identity, open_bundle, seal
    from histodd_fed.bundle.releases import SetRelease
    from histodd_fed.bundle.trust import TrustStore

    a, b = generate_identity("C1", tmp_path / "a"), generate_identity("C2", tmp_path / "b")
    store = TrustStore.load(tmp_path / "b")
    store.add(a.public)
    ps = _set(0, dp=0.5)
    ps.meta["dp"].update(noise_multiplier=3.2, clip=1.0, unit="patch", embedding={"nets": 2})
    m = open_bundle(seal(ps, a, [b.public]), b, store, NO_LEDGER).manifest
    assert m["dp"] == {"epsilon": 0.5, "delta": 1e-5, "accountant": "rdp (test)"}
    assert m["distillation_config"]["dp"]["noise_multiplier"] == 3.2
    plain = _set(1)
    plain.meta.update(method="dm-nodp", dp=None)
    assert SetRelease.of(plain).dp is None
    assert "dp" not in open_bundle(seal(plain, a, [b.public]), b, store, NO_LEDGER).manifest
