"""Layers only point down (issue 21): the distiller does not know the privacy audit or anything above it,
the audit does not know the distiller, the shared leaves import neither, and nothing in federation/ imports
the centre node (centre.py) it serves. Reads every import statement, including those inside functions, of
the package's source files."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "histodd_fed"

#: what a centre does, one module per purpose (the centre node calls them)
CENTRE_WORK = ("federation.centre_identity", "federation.centre_data", "federation.stain_mapping",
               "federation.distil_cache", "federation.privacy_reports", "federation.centre_bundles",
               "federation.fine_tuning")

#: package (or leaf module) -> the packages it must never import
FORBIDDEN = {
    "distill": ("privacy", "release", "federation", "bundle", "studies"),
    "privacy": ("distill", "release", "federation", "bundle", "studies"),
    "content_hash.py": ("distill", "privacy", "release", "federation", "bundle"),
    "structure.py": ("distill", "privacy", "release", "federation", "bundle"),
    "image_similarity.py": ("distill", "privacy", "release", "federation", "bundle"),
    # the centre's settings sit below everything a centre does
    "federation/centre_config.py": ("federation.centre",) + CENTRE_WORK,
    # the centre node sits on top of the federation package: nothing in it imports back up into it
    "federation": ("federation.centre",),
}

#: federation modules that sit above the centre node and may import it: none (only centre_node/ and
#: coordinator/cli.py, outside the package, import histodd_fed.federation.centre)
ABOVE_CENTRE: tuple[str, ...] = ()

#: package -> its files (relative to histodd_fed/) that its entry in FORBIDDEN does not bind
EXEMPT = {"federation": ABOVE_CENTRE}


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a source file imports (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    pkg = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def violations(layer: str, banned: tuple[str, ...]) -> list[str]:
    files = [PKG / layer] if layer.endswith(".py") else sorted((PKG / layer).rglob("*.py"))
    files = [f for f in files if f.relative_to(PKG).as_posix() not in EXEMPT.get(layer, ())]
    banned = tuple(b.replace("/", ".") for b in banned)
    bad = []
    for f in files:
        for mod in sorted(imported_modules(f)):
            if any(mod == f"histodd_fed.{b}" or mod.startswith(f"histodd_fed.{b}.") for b in banned):
                bad.append(f"{f.relative_to(PKG.parent)} imports {mod}")
    return bad


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_higher_ones(layer):
    assert violations(layer, FORBIDDEN[layer]) == []


def test_the_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    # a planted upward import, hidden in a function body, must be reported (the check can fail)
    layer = tmp_path / "histodd_fed" / "distill"
    layer.mkdir(parents=True)
    (layer / "planted.py").write_text("def f():\n    from histodd_fed.privacy.gate import check_export\n"
                                      "    from ..release import choose\n")
    monkeypatch.setattr(__import__(__name__), "PKG", tmp_path / "histodd_fed")
    assert violations("distill", FORBIDDEN["distill"]) == [
        "histodd_fed/distill/planted.py imports histodd_fed.privacy.gate",
        "histodd_fed/distill/planted.py imports histodd_fed.privacy.gate.check_export",
        "histodd_fed/distill/planted.py imports histodd_fed.release",
        "histodd_fed/distill/planted.py imports histodd_fed.release.choose",
    ]


def test_the_check_sees_a_federation_module_importing_the_centre_node(tmp_path, monkeypatch):
    # a planted import of centre.py, in any spelling, is reported; centre_config (a name that begins like
    # it) is not; a module declared above the centre node (ABOVE_CENTRE) may import it
    fed = tmp_path / "histodd_fed" / "federation"
    fed.mkdir(parents=True)
    (fed / "planted.py").write_text("from .centre_config import CentreConfig\n\n\ndef f():\n"
                                    "    from . import centre\n    import histodd_fed.federation.centre as node\n")
    (fed / "above.py").write_text("from histodd_fed.federation.centre import CentreNode\n")
    monkeypatch.setattr(__import__(__name__), "PKG", tmp_path / "histodd_fed")
    assert violations("federation", FORBIDDEN["federation"]) == [
        "histodd_fed/federation/above.py imports histodd_fed.federation.centre",
        "histodd_fed/federation/above.py imports histodd_fed.federation.centre.CentreNode",
        "histodd_fed/federation/planted.py imports histodd_fed.federation.centre",
    ]
    monkeypatch.setitem(EXEMPT, "federation", ("federation/above.py",))
    assert violations("federation", FORBIDDEN["federation"]) == [
        "histodd_fed/federation/planted.py imports histodd_fed.federation.centre",
    ]
