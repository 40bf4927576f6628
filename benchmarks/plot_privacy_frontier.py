"""The privacy-utility frontier of issue 20 as one picture, from ONE run of benchmarks/bench_lira_pcam.py.

Left: accuracy of each recipe's set (the LiRA bench's target model on `valid`) against LiRA's TPR at 1 % FPR.
Right: the DP recipe's accuracy against epsilon (records ``dp`` / ``dp@E``), with the non-DP DM recipe and the
Random / Herding coresets of the same run as reference lines. Every point is one record of the same file.

    .venv/bin/python benchmarks/plot_privacy_frontier.py --lira benchmarks/results/lira_pcam.json \\
        --out docs/img/privacy-frontier.png

(``bench_lira_pcam.py --plot PATH`` calls :func:`plot_frontier` at the end of its run.)
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _epsilon(record: dict) -> float | None:
    eps = record.get("dp_epsilon")
    if eps is None:
        eps = (record.get("recipe_config") or {}).get("config", {}).get("dp_epsilon")
    if eps is None:   # records from before dp_epsilon was recorded: "..., epsilon 1.0, delta ..." in the description
        m = re.search(r"epsilon ([0-9.]+)", record.get("description", ""))
        eps = m.group(1) if m else None
    return float(eps) if eps is not None else None


def plot_frontier(records: list[dict], out: Path) -> None:
    """Write the two-panel frontier PNG of ``records`` (bench_lira_pcam.py's ``records``) to ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    pool = {r.get("pool") for r in records}
    shadows = {r.get("shadows") for r in records}
    for i, r in enumerate(records):
        x, y = r["tpr_at_1pct_fpr"], 100 * r["target_valid_accuracy"]
        colour = f"C{i}"
        ax1.scatter(x, y, s=40, color=colour, label="through the trained model" if i == 0 else None)
        xs = r.get("set_tpr_at_1pct_fpr")
        if xs is not None:   # the released-images observable: hollow, joined to the model point
            ax1.plot([x, xs], [y, y], color=colour, lw=0.8, ls="--")
            ax1.scatter(xs, y, s=40, facecolors="none", edgecolors=colour,
                        label="through the released images" if not any("set_tpr_at_1pct_fpr" in q for q in records[:i])
                        else None)
        ax1.annotate(r["recipe"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax1.axvline(0.01, color="grey", ls=":", lw=1)
    ax1.text(0.0102, ax1.get_ylim()[0] + 0.5, "chance", fontsize=7, color="grey")
    ax1.set_xlabel(f"LiRA TPR at 1% FPR ({'/'.join(map(str, sorted(shadows)))} shadows, "
                   f"pool {'/'.join(map(str, sorted(pool)))})")
    ax1.set_ylabel("accuracy on PCam valid (%)")
    ax1.set_title("membership attack vs utility (one set each)")
    ax1.legend(fontsize=7, loc="center right")
    dp = sorted((e, 100 * r["target_valid_accuracy"]) for r in records
                if r["recipe"].startswith("dp") and (e := _epsilon(r)) is not None)
    if dp:
        ax2.plot([e for e, _ in dp], [a for _, a in dp], marker="o", label="dm-dp")
        ax2.set_xscale("log")
    for name, label, style in (("dm", "DM (no DP)", "--"), ("random", "Random-10", ":"), ("herding", "Herding-10", "-.")):
        for r in records:
            if r["recipe"] == name:
                ax2.axhline(100 * r["target_valid_accuracy"], ls=style, color="grey", label=label)
    ax2.set_xlabel("epsilon (delta 1e-5)")
    ax2.set_ylabel("accuracy on PCam valid (%)")
    ax2.set_title("DP sets: accuracy vs epsilon (one set each)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lira", type=Path, default=RESULTS / "lira_pcam.json")
    ap.add_argument("--out", type=Path, default=Path("docs/img/privacy-frontier.png"))
    a = ap.parse_args()
    plot_frontier(json.loads(a.lira.read_text())["records"], a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
