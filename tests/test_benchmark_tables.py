"""The benchmark tables that set runs side by side: benchmarks/ipc_curve.py (ipcs of one pair) and
benchmarks/compare_sources.py (pooled vs single sources) pair rows only when the shared rows agree seed by seed."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest



def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ipc_curve = _load("ipc_curve")
compare_sources = _load("compare_sources")

FIELDS = ["target", "sources", "seed", "transfer", "patch_bal_acc", "patch_acc", "patch_auc", "slide_auc",
          "patch_bytes", "fault"]


def _run(root: Path, name: str, rows: list[tuple[str, int, float, str]], target: str = "H2", sources: str = "H0",
         append: bool = False) -> Path:
    d = root / name
    d.mkdir(exist_ok=append)
    path = d / "summary_per_seed.csv"
    with path.open("a" if append else "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if not append:
            w.writeheader()
        for transfer, seed, bal, pbytes in rows:
            w.writerow({"target": target, "sources": sources, "seed": seed, "transfer": transfer, "patch_bal_acc": bal,
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


def test_compare_sources_reads_one_target_of_a_leave_one_out_run(tmp_path: Path) -> None:
    loo = _run(tmp_path, "loo", [r for s in (0, 1) for r in _base(s, "") + [("+ ipc 10", s, 0.66 + s / 100, "")]],
               sources="H0+H1")
    _run(tmp_path, "loo", [("target alone", 0, 0.5, ""), ("+ ipc 10", 0, 0.9, "")], target="H3", sources="H1+H2",
         append=True)
    single = _run(tmp_path, "single", [r for s in (0, 1) for r in _base(s, "") + [("+ ipc 10", s, 0.64 + s / 100, "")]])
    with pytest.raises(SystemExit, match="2 targets; .* --target"):
        compare_sources.compare(loo, [single])
    res = compare_sources.compare(loo, [single], target="H2")
    row = next(r for r in res["rows"] if r["transfer"] == "+ ipc 10" and r["metric"] == "patch_bal_acc")
    assert res["seeds"] == [0, 1] and row["best_single"] == "H0"
    assert row["pooled_minus_best"]["mean"] == pytest.approx(0.02)
    other = _run(tmp_path, "other", [("target alone", 0, 0.61, ""), ("+ ipc 10", 0, 0.66, "")])
    with pytest.raises(SystemExit, match="'target alone' of seed 0 differs"):
        compare_sources.compare(loo, [other], target="H2")
