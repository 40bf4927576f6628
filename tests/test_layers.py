"""Layers only point down (issue 21): the distiller does not know the privacy audit or anything above it,
the audit does not know the distiller, and the shared leaves import neither. Reads every import statement,
including those inside functions, of the package's source files."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "histodd_fed"

#: package (or leaf module) -> the packages it must never import
FORBIDDEN = {
    "distill": ("privacy", "release", "federation", "bundle", "studies"),
    "privacy": ("distill", "release", "federation", "bundle", "studies"),
    "content_hash.py": ("distill", "privacy", "release", "federation", "bundle"),
    "structure.py": ("distill", "privacy", "release", "federation", "bundle"),
    # the centre's settings and its local work sit below the centre node: nothing imports back up into it
    "federation/centre_config.py": ("federation.centre", "federation.local_work"),
    "federation/local_work.py": ("federation.centre",),
    "federation/enrol.py": ("federation.centre",),
    "federation/coordinator.py": ("federation.centre",),
}


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
