"""Issue 14 item 10 (bundle parts).

Attacks: (a) a header whose ``created`` carries terminal control sequences, shown by ``centre-node
inspect`` before any signature check; (b) the manifest sealed by ``centre-node export`` tells every
recipient the sender's local directories; (c) a FIFO given as the bundle file blocks the reader
forever (``open()`` of a FIFO waits for a writer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
from typer.testing import CliRunner

from centre_node.cli import app
from histodd_fed.bundle import FormatError, TrustStore, generate_identity
from histodd_fed.bundle.hostile import forge_bundle
from histodd_fed.patchset import PatchSet

runner = CliRunner()


def _ps() -> PatchSet:
    rng = np.random.default_rng(0)
    return PatchSet(images=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), labels=np.array([0, 1, 0, 1]),
                    class_names=["normal", "tumour"], kind="synthetic", meta={"seed": 0})


def test_attack_control_characters_in_created_are_not_printed(tmp_path):
    c1, c2 = generate_identity("C1", tmp_path / "C1"), generate_identity("C2", tmp_path / "C2")
    # the file name carries escapes too: CliRunner never prints the error line (main() does), and the
    # forged created is refused before anything else is printed, so the name is what reaches the terminal
    evil = tmp_path / "evil\x1b[2J\x1b]0;t\x07.hdb"
    evil.write_bytes(forge_bundle(_ps(), c1, [c2.public], created="\x1b]0;owned\x07\x1b[2J\x1b[31mOK\r"))
    for args in (["inspect", str(evil)], ["inspect", str(evil), "--json"], ["verify", str(evil), "--keys", str(tmp_path / "C2")]):
        r = runner.invoke(app, args)
        assert type(r.exception) is FormatError and "ISO-8601" in str(r.exception), repr(r.exception)
        assert "\n" not in str(r.exception)
        code = "import sys; from centre_node.cli import main; sys.argv = ['centre-node'] + sys.argv[1:]; main()"
        p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        printed = p.stdout + p.stderr
        assert p.returncode == 2 and "ISO-8601" in printed, printed
        assert "\x1b" not in printed and "\x07" not in printed and "\r" not in printed, repr(printed)
    good = tmp_path / "good.hdb"
    good.write_bytes(forge_bundle(_ps(), c1, [c2.public], created="2026-01-02T03:04:05+00:00"))
    assert "2026-01-02T03:04:05+00:00" in runner.invoke(app, ["inspect", str(good)]).output


def test_attack_manifest_does_not_leak_local_paths(tmp_path):
    k1, k2 = tmp_path / "site-secret-k1", tmp_path / "site-secret-k2"
    for c, k in (("C1", k1), ("C2", k2)):
        generate_identity(c, k)
    for me, other in ((k1, k2), (k2, k1)):
        s = TrustStore.load(me)
        from histodd_fed.bundle import load_public_identity
        s.add(load_public_identity(other))
        s.save()
    ps = _ps()
    ref = ps.save(tmp_path / "hospital-share" / "patients-2026")     # the gate's reference: --patches
    ps.meta = {"seed": 0, "source": str(tmp_path / "hospital-share" / "patients-2026"), "ipc": 2}
    syn = ps.save(tmp_path / "hospital-share" / "synthetic-set")
    out = tmp_path / "b.hdb"
    r = runner.invoke(app, ["export", "--synthetic", str(syn), "--patches", str(ref), "--to", "C2", "--keys", str(k1),
                            "--out", str(out), "--accept-privacy-risk"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["open", str(out), "--keys", str(k2), "--out", str(tmp_path / "opened")])
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "opened" / "bundle_receipt.json").read_text())["manifest"]
    text = json.dumps(manifest)
    assert "hospital-share" not in text and str(tmp_path) not in text, text
    assert manifest["distillation_config"]["seed"] == 0 and manifest["extra"]["accepted_privacy_risk"] is True


def test_attack_fifo_instead_of_a_bundle_does_not_block(tmp_path):
    generate_identity("C2", tmp_path / "C2")
    fifo = tmp_path / "bundle.hdb"
    os.mkfifo(fifo)
    script = (
        "import sys\nfrom typer.testing import CliRunner\nfrom centre_node.cli import app\n"
        "for args in (['inspect', sys.argv[1]], ['verify', sys.argv[1], '--keys', sys.argv[2]],\n"
        "             ['open', sys.argv[1], '--keys', sys.argv[2], '--out', sys.argv[3]]):\n"
        "    r = CliRunner().invoke(app, args)\n"
        "    print(type(r.exception).__name__, '|', r.exception)\n")
    try:
        p = subprocess.run([sys.executable, "-c", script, str(fifo), str(tmp_path / "C2"), str(tmp_path / "o")],
                           capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("reading a FIFO blocked")
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 3 and all(ln.startswith("FormatError | ") and "not a regular file" in ln for ln in lines), p
    assert not (tmp_path / "o").exists()
