"""Several sources into one target against each single source: paired by seed, one table.

Reads the ``summary_per_seed.csv`` of one pooled run (``--sources A,B,...``) and of single-source runs into
the same target (``--sources A`` ...), all made with the same centres, preset and seeds, and reports for
every transfer row ("+ ipc 10", "+ Full", ...) and metric: each run's mean, the pooled run minus each
single source (paired by seed, mean and 95% t-interval), and the pooled run minus the best single source.
"Best" is the single source with the highest mean on the same test seeds - the comparison most
favourable to the single sources. "target alone" must agree cell for cell across the runs (same target,
same seeds): a run whose alone row differs is refused, so the pairs are real pairs. Only the seeds every
run has are compared.

    python benchmarks/compare_sources.py --pooled R2 --single R_H0 R_H1 R_H3 R_H4 \\
        --out benchmarks/results/pcam_hospitals/pooled_vs_single_h2.json --md OUT.md
    python benchmarks/compare_sources.py --pooled R3 --target H4 --single R_H0 R_H1 R_H2 R_H3   # R3: --target all
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histodd_fed.federation.benchmark_summary import BASE, t_interval  # noqa: E402

METRICS = ("patch_bal_acc", "patch_auc", "slide_auc")


def per_seed(run: Path, target: str | None = None) -> tuple[str, str, dict[tuple[str, int], dict[str, float | None]]]:
    """(target, sources, {(transfer, seed): {metric: value}}) of one run folder; ``target`` keeps that target's rows
    only (a ``--target all`` run holds five)."""
    path = run / "summary_per_seed.csv"
    if not path.is_file():
        raise SystemExit(f"{run}: no summary_per_seed.csv (not a finished coordinator transfer run)")
    rows = [r for r in csv.DictReader(path.open()) if target is None or r["target"] == target]
    if not rows:
        raise SystemExit(f"{path}: empty" + (f" for target {target}" if target else ""))
    targets = {r["target"] for r in rows}
    if len(targets) != 1:
        raise SystemExit(f"{path}: {len(targets)} targets; give runs into one target or name it with --target")
    out: dict[tuple[str, int], dict[str, float | None]] = {}
    for r in rows:
        if r.get("fault"):
            continue
        out[(r["transfer"], int(r["seed"]))] = {m: (float(r[m]) if r.get(m) not in (None, "") else None)
                                                for m in METRICS}
    sources = next(r["sources"] for r in rows if r["transfer"] != BASE)
    return targets.pop(), sources, out


def _stats(vals: list[float]) -> dict[str, float | None]:
    mean, lo, hi = t_interval(vals)
    return {"mean": mean, "ci95_low": lo, "ci95_high": hi, "n": len(vals)}


def compare(pooled: Path, singles: list[Path], target: str | None = None) -> dict:
    target, pooled_name, pooled_rows = per_seed(pooled, target)
    runs = {}
    for s in singles:
        t, name, rows = per_seed(s, target)
        if t != target:
            raise SystemExit(f"{s}: target {t}, the pooled run's is {target}")
        runs[name] = rows
    seeds = set(seed for (tr, seed) in pooled_rows if tr == BASE)
    for rows in runs.values():   # the seeds every run has
        seeds &= {seed for (tr, seed) in rows if tr == BASE}
    seeds = sorted(seeds)
    if not seeds:
        raise SystemExit("no seed is in every run")
    for name, rows in runs.items():   # the same "target alone" seed by seed: real pairs
        for seed in seeds:
            a, b = pooled_rows[(BASE, seed)], rows[(BASE, seed)]
            if any(a[m] is not None and b[m] is not None and not math.isclose(a[m], b[m], abs_tol=1e-9)
                   for m in METRICS if m != "slide_auc"):
                raise SystemExit(f"{name}: 'target alone' of seed {seed} differs from the pooled run's "
                                 f"({a} vs {b}): not the same target, centres or seeds")
    transfers = sorted({tr for (tr, _) in pooled_rows if tr != BASE})
    table = []
    for tr in transfers:
        for m in METRICS:
            p = {seed: pooled_rows.get((tr, seed), {}).get(m) for seed in seeds}
            if any(v is None for v in p.values()):
                continue
            entry = {"transfer": tr, "metric": m, "seeds": sorted(p), "pooled": {pooled_name: _stats(list(p.values()))},
                     "single": {}, "pooled_minus_single": {}}
            best, best_mean = None, -math.inf
            for name, rows in runs.items():
                s = {seed: rows.get((tr, seed), {}).get(m) for seed in p}
                if any(v is None for v in s.values()):
                    continue
                entry["single"][name] = _stats(list(s.values()))
                entry["pooled_minus_single"][name] = _stats([p[k] - s[k] for k in p])
                if entry["single"][name]["mean"] > best_mean:
                    best, best_mean = name, entry["single"][name]["mean"]
            entry["best_single"] = best
            entry["pooled_minus_best"] = entry["pooled_minus_single"].get(best) if best else None
            table.append(entry)
    return {"target": target, "pooled": pooled_name, "singles": list(runs), "seeds": seeds, "rows": table,
            "runs": {"pooled": str(pooled), "single": [str(s) for s in singles]}}


def fmt_stat(st: dict | None, signed: bool = False) -> str:
    if not st or st.get("mean") is None:
        return "-"
    f = "{:+.3f}" if signed else "{:.3f}"
    if st.get("ci95_low") is None:
        return f.format(st["mean"])
    return f"{f.format(st['mean'])} [{f.format(st['ci95_low'])}, {f.format(st['ci95_high'])}]"


def markdown(res: dict) -> str:
    singles = res["singles"]
    head = ["transfer", "metric", f"pooled ({res['pooled']})"] + singles + ["best single", "pooled - best single"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        cells = [r["transfer"], r["metric"], fmt_stat(next(iter(r["pooled"].values())))]
        cells += [fmt_stat(r["single"].get(s)) for s in singles]
        cells += [r["best_single"] or "-", fmt_stat(r["pooled_minus_best"], signed=True)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pooled", type=Path, required=True, help="run folder of the several-sources transfer")
    ap.add_argument("--single", type=Path, nargs="+", required=True, help="run folders of single-source transfers")
    ap.add_argument("--out", type=Path, help="write the comparison as JSON here")
    ap.add_argument("--md", type=Path, help="write the markdown table here")
    ap.add_argument("--target", help="compare this target's rows only (e.g. H4 of a --target all run)")
    a = ap.parse_args()
    res = compare(a.pooled, a.single, a.target)
    text = markdown(res)
    print(text, end="")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=1) + "\n")
    if a.md:
        a.md.write_text(text)


if __name__ == "__main__":
    main()
