"""Images per class against Full, from several runs of one source -> target pair: one table, one plot.

``coordinator transfer`` resumes a run only with the ipcs it started with, so an ipc added later is its own
run (``--ipc 20 --out R20`` beside ``--ipc 10,50 --out R``). This merges such runs: their "target alone"
and "+ Full" rows must agree cell for cell seed by seed (same centres, preset, seeds - the protocol is
deterministic), else the run is refused, so every "+ ipc N" row is paired with the same baseline. For each
row: mean balanced accuracy, the gain over "target alone" (paired by seed, 95% t-interval), its share of
Full's gain, the patch set's bytes against Full's patch part, and slide AUC. Only seeds every run has count.

    python benchmarks/ipc_curve.py R R20 --md OUT.md --json OUT.json --png OUT.png
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_sources import fmt_stat  # noqa: E402

from histodd_fed.federation.benchmark_summary import BASE, t_interval  # noqa: E402

FULL = "+ Full"
SHARED = (BASE, FULL)
CHECKED = ("patch_bal_acc", "patch_acc", "patch_auc")


def _num(v: str | None) -> float | None:
    return float(v) if v not in (None, "") else None


def _rows(run: Path) -> tuple[str, str, dict[tuple[str, int], dict[str, str]]]:
    path = run / "summary_per_seed.csv"
    if not path.is_file():
        raise SystemExit(f"{run}: no summary_per_seed.csv (not a coordinator transfer run folder)")
    rows = [r for r in csv.DictReader(path.open()) if not r.get("fault")]
    pairs = {(r["target"], r["sources"]) for r in rows if r["transfer"] != BASE}
    if len(pairs) != 1:
        raise SystemExit(f"{path}: {len(pairs)} source -> target pairs; give runs of one pair")
    target, sources = pairs.pop()
    return target, sources, {(r["transfer"], int(r["seed"])): r for r in rows}


def merge(runs: list[Path]) -> dict:
    (target, sources, merged), rest = _rows(runs[0]), runs[1:]
    seeds = {s for (tr, s) in merged if tr == BASE}
    for run in rest:
        t, src, rows = _rows(run)
        if (t, src) != (target, sources):
            raise SystemExit(f"{run}: {src} -> {t}, the first run's is {sources} -> {target}")
        seeds &= {s for (tr, s) in rows if tr == BASE}
        for key, row in rows.items():
            if key in merged and key[0] in SHARED:
                a, b = merged[key], row
                if any(not math.isclose(float(a[m]), float(b[m]), abs_tol=1e-9) for m in CHECKED):
                    raise SystemExit(f"{run}: '{key[0]}' of seed {key[1]} differs from {runs[0]}'s: "
                                     "not the same centres, preset or seeds")
                for k, v in b.items():   # a column the older run predates (patch_bytes)
                    if a.get(k) in (None, "") and v not in (None, ""):
                        a[k] = v
            elif key in merged:
                raise SystemExit(f"{run}: '{key[0]}' seed {key[1]} is in two runs; give each ipc once")
            else:
                merged[key] = row
    seeds = sorted(seeds)
    if not seeds:
        raise SystemExit("no seed is in every run")
    transfers = sorted({tr for (tr, _) in merged if tr not in SHARED},
                       key=lambda tr: int(tr.split()[-1]) if tr.split()[-1].isdigit() else 10**9)
    order = [BASE] + transfers + [FULL]

    def values(tr: str, m: str) -> list[float] | None:
        v = [_num(merged.get((tr, s), {}).get(m)) for s in seeds]
        return None if any(x is None for x in v) else v  # type: ignore[return-value]

    def stats(v: list[float] | None) -> dict[str, float | None] | None:
        if v is None:
            return None
        mean, lo, hi = t_interval(v)
        return {"mean": mean, "ci95_low": lo, "ci95_high": hi}

    alone = values(BASE, "patch_bal_acc")
    full_gain = [f - a for f, a in zip(values(FULL, "patch_bal_acc") or [], alone or [])]
    full_patch = values(FULL, "patch_bytes")
    table = []
    for tr in order:
        bal, slide = values(tr, "patch_bal_acc"), values(tr, "slide_auc")
        row: dict = {"transfer": tr, "patch_bal_acc": stats(bal), "slide_auc": stats(slide)}
        if tr != BASE and bal is not None and alone is not None:
            gain = [b - a for b, a in zip(bal, alone)]
            row["gain"] = stats(gain)
            row["share_of_full_gain"] = (sum(gain) / sum(full_gain)) if full_gain and sum(full_gain) > 0 else None
            s_alone = values(BASE, "slide_auc")
            row["slide_auc_gain"] = stats([x - y for x, y in zip(slide, s_alone)]) if slide and s_alone else None
        pb = values(tr, "patch_bytes")
        if pb and full_patch:
            row["patch_bytes_mean"] = sum(pb) / len(pb)
            row["patch_bytes_vs_full"] = sum(pb) / sum(full_patch)
        table.append(row)
    return {"target": target, "sources": sources, "seeds": seeds, "rows": table, "runs": [str(r) for r in runs]}


def markdown(res: dict) -> str:
    head = ["transfer", "patch bal. acc.", "gain [95% CI]", "share of Full's gain", "patch set / Full's",
            "slide AUC", "slide AUC gain [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        share = r.get("share_of_full_gain")
        vs = r.get("patch_bytes_vs_full")
        lines.append("| " + " | ".join([
            r["transfer"], fmt_stat(r["patch_bal_acc"]), fmt_stat(r.get("gain"), True),
            f"{share * 100:.0f}%" if share is not None else "-",
            f"{vs * 100:.2f}%" if vs is not None else "-",
            fmt_stat(r["slide_auc"]), fmt_stat(r.get("slide_auc_gain"), True)]) + " |")
    return "\n".join(lines) + "\n"


def plot(res: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["transfer"]: r for r in res["rows"]}
    ipc = [r for r in res["rows"] if r["transfer"] not in SHARED and r.get("gain")]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    xs = [int(r["transfer"].split()[-1]) for r in ipc]
    ys = [r["gain"]["mean"] for r in ipc]
    err = [[r["gain"]["mean"] - r["gain"]["ci95_low"] for r in ipc], [r["gain"]["ci95_high"] - r["gain"]["mean"] for r in ipc]]
    ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=4, label="+ ipc N (synthetic)")
    fg = rows.get(FULL, {}).get("gain")
    if fg:
        ax.axhline(fg["mean"], color="k", lw=1, label="+ Full (all source patches)")
        ax.axhspan(fg["ci95_low"], fg["ci95_high"], color="k", alpha=0.1)
    ax.axhline(0, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("synthetic images per class")
    ax.set_ylabel("balanced-accuracy gain over target alone")
    ax.set_title(f"{res['sources']} -> {res['target']}, {len(res['seeds'])} seeds (95% CI)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="run folders of one source -> target pair")
    ap.add_argument("--json", type=Path, help="write the merged table as JSON here")
    ap.add_argument("--md", type=Path, help="write the markdown table here")
    ap.add_argument("--png", type=Path, help="write the gain-vs-ipc plot here")
    a = ap.parse_args()
    res = merge(a.runs)
    text = markdown(res)
    print(text, end="")
    for path, body in ((a.json, json.dumps(res, indent=1) + "\n"), (a.md, text)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
    if a.png:
        plot(res, a.png)


if __name__ == "__main__":
    main()
