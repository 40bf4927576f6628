"""Issue 24 item 5: a reader of a study's report cannot tell an edited number from a signed one.

A real study (two real centres on real PCam patches, real Ed25519 keys from the project's identity
code, the in-process transport) writes ``R/report.json``, ``results.csv`` and ``results.md``. Then,
as whoever can write the report (the coordinator, or anyone between it and the reader), edit it:

- change a number (consistently in ``rows``, ``raw_rows``, ``results.csv`` and ``results.md``);
- change it in ``results.csv`` only, or in ``results.md`` only;
- change a centre's signed identity facts (``centres``: train patch count);
- swap two rows' numbers (labels kept);
- drop the signature of the target's metrics reply, or its whole attestation;
- swap the signed body of the metrics reply with another signed reply's body of the same centre;
- re-sign an edited metrics reply with a key that is not in the reader's trust store;
- edit the signed body itself and its hash in the statement, keeping the centre's signature.

``coordinator verify-report R --trust FILE`` must refuse each with a one-line error naming the first
bad row (exit code non-zero) and accept the untouched report with ``OK`` and the row count. It runs
through the real entry point (``coordinator.cli.main`` in a subprocess), as a reader would.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from test_federation_study import _centres, _study


def _main(*args) -> subprocess.CompletedProcess:
    code = "import sys; from coordinator.cli import main; sys.argv = ['coordinator'] + sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200"}, cwd=Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One real study (baseline + Full rows at C2), its report dir and the coordinator's trust file."""
    from histodd_fed.federation.centre import CentreNode
    from histodd_fed.federation.coordinator import LocalTransport, run_transfer_study
    from histodd_fed.federation.study import write_report

    root = tmp_path_factory.mktemp("report-edit")
    cfgs, trust = _centres(root)
    cfg = _study(root, trust, ipcs=[])
    out = run_transfer_study(LocalTransport({10 + i: CentreNode(c) for i, c in enumerate(cfgs)}), cfg)
    assert not out.faults, [f.line() for f in out.faults]
    assert len(out.rows) == 2
    write_report(cfg, out)
    return root, cfg.study_dir, Path(trust)


@pytest.fixture()
def report(study, tmp_path):
    """A private copy of the study's report folder (each attack edits its own)."""
    root, study_dir, trust = study
    r = tmp_path / "R"
    shutil.copytree(study_dir, r, ignore=shutil.ignore_patterns("cache"))
    return r, trust, root


def _load(r: Path) -> dict:
    return json.loads((r / "report.json").read_text())


def _save(r: Path, rep: dict) -> None:
    (r / "report.json").write_text(json.dumps(rep, indent=2, sort_keys=True) + "\n")


def _train_att(rep: dict) -> dict:
    return next(a for a in rep["attestations"] if a["action"] == "train")


def _edit_csv(r: Path, row: int, col: str, value: str) -> None:
    rows = list(csv.DictReader(io.StringIO((r / "results.csv").read_text())))
    old = rows[row][col]
    rows[row][col] = value
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    (r / "results.csv").write_text(buf.getvalue())
    md = (r / "results.md").read_text()
    if old:
        (r / "results.md").write_text(md.replace(f"{float(old):.3f}", f"{float(value):.3f}"))


def _full_index(rep: dict) -> int:
    return next(i for i, row in enumerate(rep["rows"]) if row["transfer"] == "Full")


def _edit_number_everywhere(r: Path) -> None:
    """The Full row's patch balanced accuracy becomes 0.99 wherever the report shows it."""
    rep = _load(r)
    i = _full_index(rep)
    rep["rows"][i]["patch_bal_acc"] = 0.99
    for raw in rep["raw_rows"]:
        if raw["mode"] == "full":
            raw["patch_balanced_accuracy"] = 0.99
    _save(r, rep)
    _edit_csv(r, i, "patch_bal_acc", "0.99")


def _edit_csv_only(r: Path) -> None:
    _edit_csv(r, _full_index(_load(r)), "patch_auc", "0.999")


def _edit_md_only(r: Path) -> None:
    rep = _load(r)
    row = rep["rows"][_full_index(rep)]
    lines = (r / "results.md").read_text().splitlines(keepends=True)
    # only the Full row's patch_auc cell: another row (or column) may show the same number
    head = next(ln for ln in lines if ln.startswith("|") and "patch_auc" in ln)
    col = [c.strip() for c in head.strip().strip("|").split("|")].index("patch_auc")
    i = next(i for i, ln in enumerate(lines) if ln.startswith("|") and "| Full |" in ln)
    cells = lines[i].rstrip("\n").strip().strip("|").split("|")
    assert cells[col].strip() == f"{row['patch_auc']:.3f}", (cells, col)
    cells[col] = " 0.999 "
    lines[i] = "|" + "|".join(cells) + "|\n"
    (r / "results.md").write_text("".join(lines))


def _edit_centre(r: Path) -> None:
    rep = _load(r)
    rep["centres"]["C1"]["n_train"] = 10_000   # "the source had lots of data"
    _save(r, rep)


def _swap_rows(r: Path) -> None:
    rep = _load(r)
    a, b = rep["rows"][0], rep["rows"][1]
    for k in ("patch_bal_acc", "patch_auc", "patch_acc"):
        a[k], b[k] = b[k], a[k]
    _save(r, rep)


def _drop_signature(r: Path) -> None:
    rep = _load(r)
    att = _train_att(rep)
    att["proof"].pop("signature")
    _save(r, rep)


def _drop_attestation(r: Path) -> None:
    rep = _load(r)
    rep["attestations"] = [a for a in rep["attestations"] if a["action"] != "train"]
    _save(r, rep)


def _swap_bodies(r: Path) -> None:
    """The metrics reply's signed body swapped with the same centre's identity reply body."""
    rep = _load(r)
    train = _train_att(rep)
    ident = next(a for a in rep["attestations"] if a["action"] == "identity" and a["centre"] == train["centre"])
    if "body_b64" in train:
        train["body_b64"], ident["body_b64"] = ident["body_b64"], train["body_b64"]
    else:   # no signed body kept: swap the rows themselves, which nothing binds
        rep["raw_rows"].reverse()
    _save(r, rep)


def _foreign_key(r: Path, root: Path) -> None:
    """Edit the number, rebuild the signed body and statement, sign them with the attacker's own key."""
    from histodd_fed.bundle.identity import generate_identity
    from histodd_fed.federation.envelope import canonical, sign_statement

    forger = generate_identity("C2", root / "forger" / r.parent.name)   # a C2 key nobody pinned
    _edit_number_everywhere(r)
    rep = _load(r)
    att = _train_att(rep)
    st = dict(att["proof"]["statement"], sign_key_id=forger.public.sign_key_id)
    if "body_b64" in att:
        body = json.loads(base64.b64decode(att["body_b64"]))
        for row in body["rows"]:
            if row["mode"] == "full":
                row["patch_balanced_accuracy"] = 0.99
        raw = canonical(body)
        att["body_b64"] = base64.b64encode(raw).decode()
        import hashlib

        st["content_sha256"] = hashlib.sha256(raw).hexdigest()
    att["proof"] = sign_statement(forger, st)
    if "statement_b64" in att:
        att["statement_b64"] = base64.b64encode(canonical(st)).decode()
    for raw_row in rep["raw_rows"]:
        raw_row["attested_by"] = forger.public.sign_key_id
    _save(r, rep)


def _forged_body(r: Path) -> None:
    """Edit the number inside the signed body and fix up its hash in the statement; keep the signature."""
    import hashlib

    from histodd_fed.federation.envelope import canonical

    _edit_number_everywhere(r)
    rep = _load(r)
    att = _train_att(rep)
    st = att["proof"]["statement"]
    if "body_b64" in att:
        body = json.loads(base64.b64decode(att["body_b64"]))
        for row in body["rows"]:
            if row["mode"] == "full":
                row["patch_balanced_accuracy"] = 0.99
        raw = canonical(body)
        att["body_b64"] = base64.b64encode(raw).decode()
        st["content_sha256"] = hashlib.sha256(raw).hexdigest()
        att["statement_b64"] = base64.b64encode(canonical(st)).decode()
    _save(r, rep)


def test_attack_untouched_report_verifies(report):
    r, trust, _ = report
    res = _main("verify-report", str(r), "--trust", str(trust))
    out = res.stdout.decode()
    assert res.returncode == 0, (out, res.stderr.decode())
    assert out.startswith("OK:") and "2 rows" in out, out


@pytest.mark.parametrize("attack, expect", [
    ("edit_number", ["row", "Full", "patch_bal", "0.99"]),
    ("edit_csv_only", ["results.csv", "Full", "patch_auc"]),
    ("edit_md_only", ["results.md", "Full", "patch_auc"]),
    ("edit_centre", ["centre C1", "n_train", "10000"]),
    ("swap_rows", ["row", "patch_"]),
    ("drop_signature", ["train", "signature"]),
    ("drop_attestation", ["row", "not signed"]),
    ("swap_bodies", ["attestation", "C2", "body does not hash"]),
    ("foreign_key", ["train", "not the pinned key"]),
    ("forged_body", ["train", "signature does not verify"]),
])
def test_attack_report_edit_is_named(report, attack, expect):
    r, trust, root = report
    {"edit_number": _edit_number_everywhere, "edit_csv_only": _edit_csv_only, "edit_md_only": _edit_md_only,
     "edit_centre": _edit_centre, "swap_rows": _swap_rows,
     "drop_signature": _drop_signature, "drop_attestation": _drop_attestation, "swap_bodies": _swap_bodies,
     "foreign_key": lambda p: _foreign_key(p, root), "forged_body": _forged_body}[attack](r)
    res = _main("verify-report", str(r), "--trust", str(trust))
    err = res.stderr.decode()
    assert res.returncode != 0, (attack, res.stdout.decode(), err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in expect:
        assert word in lines[0], (attack, word, lines[0])


def test_attack_report_from_another_trust_store_is_refused(report, tmp_path):
    """A reader whose trust store pins other keys for C1/C2 refuses every signed reply."""
    from histodd_fed.bundle.identity import generate_identity
    from histodd_fed.bundle.trust import TrustStore

    r, _, _ = report
    other = TrustStore.load(tmp_path / "reader" / "trust.json")
    for c in ("C1", "C2"):
        other.add(generate_identity(c, tmp_path / "other" / c).public)
    other.save()
    res = _main("verify-report", str(r), "--trust", str(other.path))
    assert res.returncode != 0 and "not the pinned key" in res.stderr.decode(), res.stderr.decode()


def test_report_rewritten_from_report_json_keeps_the_signed_bodies(report):
    """The flwr-simulation / deployment paths rewrite the report from the ServerApp's report.json."""
    from coordinator.cli import _outcome_from_report
    from histodd_fed.federation.coordinator import StudyConfig
    from histodd_fed.federation.study import write_report

    r, trust, _ = report
    rep = _load(r)
    outcome = _outcome_from_report(rep)
    cfg = StudyConfig(ipcs=[], preset="tiny", fine_tune_epochs=1, study_dir=r, trust=trust, runtime="local")
    write_report(cfg, outcome)
    res = _main("verify-report", str(r), "--trust", str(trust))
    assert res.returncode == 0, res.stderr.decode()
