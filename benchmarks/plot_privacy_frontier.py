"""The privacy-utility frontier of issue 20 as one picture, from the benchmarks' records.

Left: accuracy of each recipe's set (the LiRA bench's target model on `valid`) against LiRA's TPR at 1 % FPR
(benchmarks/results/lira_pcam.json). Right: dm-dp accuracy on `valid` against epsilon, next to its no-noise
control and Random-10 (benchmarks/results/dp_pcam.json).

    .venv/bin/python benchmarks/plot_privacy_frontier.py --out docs/img/privacy-frontier.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lira", type=Path, default=RESULTS / "lira_pcam.json")
    ap.add_argument("--dp", type=Path, default=RESULTS / "dp_pcam.json")
    ap.add_argument("--out", type=Path, default=Path("docs/img/privacy-frontier.png"))
    a = ap.parse_args()
    lira = json.loads(a.lira.read_text())["records"]
    dp = json.loads(a.dp.read_text())["summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for r in lira:
        ax1.scatter(r["tpr_at_1pct_fpr"], 100 * r["target_valid_accuracy"], s=40)
        ax1.annotate(r["recipe"], (r["tpr_at_1pct_fpr"], 100 * r["target_valid_accuracy"]), textcoords="offset points",
                     xytext=(4, 4), fontsize=8)
    ax1.axvline(0.01, color="grey", ls=":", lw=1)
    ax1.text(0.0102, ax1.get_ylim()[0] + 0.5, "chance", fontsize=7, color="grey")
    ax1.set_xlabel("LiRA TPR at 1% FPR (16 shadows, pool 2,000)")
    ax1.set_ylabel("accuracy on PCam valid (%)")
    ax1.set_title("membership attack vs utility (one set each)")
    eps = sorted((float(v["epsilon"]), k) for k, v in dp.items() if k.startswith("dmdp_eps=") and v.get("epsilon"))
    xs = [e for e, _ in eps]
    ys = [100 * dp[k]["accuracy_mean"] for _, k in eps]
    es = [100 * dp[k]["accuracy_std_over_sets"] for _, k in eps]
    ax2.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label="dm-dp")
    for key, label, style in (("dmdp_eps=inf", "same pipeline, no noise", "--"), ("random", "Random-10", ":")):
        if key in dp:
            ax2.axhline(100 * dp[key]["accuracy_mean"], ls=style, color="grey", label=label)
    ax2.set_xscale("log")
    ax2.set_xlabel("epsilon (delta 1e-5)")
    ax2.set_ylabel("accuracy on PCam valid (%)")
    ax2.set_title("DP sets: accuracy vs epsilon (3 sets)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
