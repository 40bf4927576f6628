"""benchmarks/ipc_curve.py merges runs of one pair only when their shared rows agree seed by seed."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "ipc_curve", Path(__file__).resolve().parents[1] / "benchmarks" / "ipc_curve.py")
ipc_curve = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(ipc_curve)

FIELDS = ["target", "sources", "seed", "transfer", "patch_bal_acc", "patch_acc", "patch_auc", "slide_auc",
          "patch_bytes", "fault"]


def _run(root: Path, name: str, rows: list[tuple[str, int, float, str]]) -> Path:
    d = root / name
    d.mkdir()
    with (d / "summary_per_seed.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for transfer, seed, bal, pbytes in rows:
            w.writerow({"target": "H2", "sources": "H0", "seed": seed, "transfer": transfer, "patch_bal_acc": bal,
                        "patch_acc": bal, "patch_auc": bal, "slide_auc": 0.5 + seed / 10, "patch_bytes": pbytes,
                        "fault": ""})
    return d


def _base(seed: int, full_bytes: str) -> list[tuple[str, int, float, str]]:
    return [("target alone", seed, 0.60 + seed / 100, ""), ("+ Full", seed, 0.70 + seed / 100, full_bytes)]


def test_merges_ipcs_over_one_baseline_and_fills_columns_an_older_run_lacks(tmp_path: Path) -> None:
    old = _run(tmp_path, "old", [r for s in (0, 1, 2) for r in _base(s, "") + [("+ ipc 10", s, 0.64 + s / 100, "")]])
    new = _run(tmp_path, "new", [r for s in (0, 1) for r in _base(s, "1000") + [("+ ipc 20", s, 0.66 + s / 100, "20")]])
    res = ipc_curve.merge([old, new])
    assert res["seeds"] == [0, 1]
    rows = {r["transfer"]: r for r in res["rows"]}
    assert list(rows) == ["target alone", "+ ipc 10", "+ ipc 20", "+ Full"]
    assert rows["+ ipc 10"]["gain"]["mean"] == pytest.approx(0.04)
    assert rows["+ ipc 10"]["share_of_full_gain"] == pytest.approx(0.4)
    assert rows["+ ipc 20"]["share_of_full_gain"] == pytest.approx(0.6)
    assert rows["+ ipc 20"]["patch_bytes_vs_full"] == pytest.approx(0.02)   # Full's bytes from the newer run
    assert "patch_bytes_vs_full" not in rows["+ ipc 10"]                     # never guessed
    out = tmp_path / "curve.png"
    ipc_curve.plot(res, out)
    assert out.stat().st_size > 1000
    assert "| + ipc 20 | 0.665 " in ipc_curve.markdown(res)


def test_refuses_runs_whose_baseline_differs(tmp_path: Path) -> None:
    a = _run(tmp_path, "a", _base(0, "") + [("+ ipc 10", 0, 0.65, "")])
    b = _run(tmp_path, "b", [("target alone", 0, 0.61, ""), ("+ Full", 0, 0.70, ""), ("+ ipc 20", 0, 0.66, "")])
    with pytest.raises(SystemExit, match="'target alone' of seed 0 differs"):
        ipc_curve.merge([a, b])
