"""Issue 24 item 8: terminal escapes reach the operator's terminal.

Attack: a file named with OSC title / clear-screen / colour sequences and a newline that fakes a
second line is handed to ``centre-node inspect`` / ``verify`` / ``open``: the one-line error printed
the name raw. A trusted sender's class names with escape sequences, printed by ``open``, are
checked too. Both run the real entry point (``centre_node.cli.main`` in a subprocess), the
only place that prints the error line: ``typer.testing.CliRunner`` catches the exception before
``main`` prints it, which is why the earlier escaping test passed with the escaping removed (and its
forged ``created`` is refused before anything is printed).

The path scrubbing of what a centre sends the coordinator (``federation.centre.scrub``) is tested on
the text itself: since error replies carry only a code and a fixed message (item 4), no end-to-end
reply reaches it with a path any more, so the earlier reply test passes with it removed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from histodd_fed.bundle import TrustStore, generate_identity
from histodd_fed.bundle.hostile import forge_bundle
from histodd_fed.patchset import PatchSet

EVIL = "x\x1b]0;owned\x07\x1b[2J\x1b[31m\rOK: bundle verified\nerror: none\x9b1m"


def _main(*args, cwd=None) -> subprocess.CompletedProcess:
    code = "import sys; from centre_node.cli import main; sys.argv = ['centre-node'] + sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=120, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"})


def _clean(out: bytes) -> str:
    text = out.decode("utf-8", errors="strict")
    for c in ("\x1b", "\x07", "\r", "\x9b"):
        assert c not in text, repr(text)
    return text


def _ps(names=("normal", "tumour")) -> PatchSet:
    rng = np.random.default_rng(0)
    return PatchSet(images=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), labels=np.array([0, 1, 0, 1]),
                    class_names=list(names), kind="synthetic", meta={"seed": 0})


@pytest.fixture()
def keys(tmp_path):
    c1, c2 = generate_identity("C1", tmp_path / "C1"), generate_identity("C2", tmp_path / "C2")
    store = TrustStore.load(tmp_path / "C2")
    store.add(c1.public)
    store.save()
    return tmp_path, c1, c2


@pytest.mark.parametrize("cmd", ["inspect", "verify", "open"])
def test_attack_file_name_with_escapes_in_the_error_line(keys, cmd):
    tmp_path, *_ = keys
    bad = tmp_path / f"{EVIL}.hdb"
    bad.write_bytes(b"not a bundle at all" * 4)
    args = {"inspect": [str(bad)], "verify": [str(bad), "--keys", str(tmp_path / "C2")],
            "open": [str(bad), "--keys", str(tmp_path / "C2"), "--out", str(tmp_path / "o")]}[cmd]
    r = _main(cmd, *args)
    assert r.returncode == 2, r
    err = _clean(r.stderr)
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "not a histodd bundle" in lines[0] or "too short" in lines[0], err
    assert "\\x1b]0;owned\\x07" in lines[0], err  # shown escaped, so the operator sees what it was


def test_class_names_with_escapes_printed_by_open(keys):
    """(Held before the fix too: the counts were printed as a dict repr; now escaped explicitly.)"""
    tmp_path, c1, c2 = keys
    b = tmp_path / "b.hdb"
    b.write_bytes(forge_bundle(_ps(("normal", "\x1b]0;owned\x07\x1b[2Jtumour")), c1, [c2.public]))
    r = _main("open", str(b), "--keys", str(tmp_path / "C2"), "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r
    out = _clean(r.stdout) + _clean(r.stderr)
    assert "opened bundle" in out and "\\x1b]0;owned" in out, out


def test_printable_escapes_everything_but_printable_ascii():
    from histodd_fed.terminal import error_line, printable

    assert printable("C1 ok/é") == "C1 ok/\\xe9"
    assert printable({"a\x1b": ["\x07", 3]}) == {"a\\x1b": ["\\x07", 3]}
    assert printable("tab\there\nnew") == "tab\\there\\nnew"
    assert error_line(ValueError(f"{EVIL}: bad")).count("\n") == 0


def test_scrub_removes_every_local_path(tmp_path):
    from histodd_fed.federation.centre import CentreConfig, scrub

    real = tmp_path / "hospital" / "Doe_Jane_1961"
    real.mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(real)
    cfg = CentreConfig(centre_id="C1", data=link / "slides.csv", key_dir=link / "keys", work_dir=link / "work")
    text = (f"{real / 'work' / 'x.pt'}: bad; {link / 'keys'} and {real}/slides.csv\n"
            "see /var/lib/ward-7/MRN-1.tiff or ~/notes/p.txt")
    out = scrub(text, cfg)
    for secret in (str(tmp_path), "Doe_Jane", "ward-7", "MRN-1", "notes", "\n"):
        assert secret not in out, out
    assert "<work-dir>" in out and "<key-dir>" in out and "<path>" in out, out
