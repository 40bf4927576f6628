"""How much does best-of-K buy, and how well does the held-out score pick? (issue 20, utility)

The `pcam` preset keeps the best of 5 candidate sets by their accuracy on 500 patches per class held out
of the centre's own data (``histodd_fed.distill.select``). This screen distils ``--candidates`` single
candidates of the preset's recipe on a tuning split of PCam ``train`` (``bench_frontier.load_split``:
2,500 / class to distil from, 1,000 / class to test on), exactly as ``run_best_of`` would (same held-out
split, same candidate seeds ``seed * 1000 + k``), and records for every candidate

- its held-out score with ``--score-seeds`` evaluation seeds (per-seed accuracies kept, so a score with
  fewer seeds is the mean of the first ones), and
- its accuracy on the split's test patches (the preset's evaluation: 3 seeds, 200 epochs, flip_rotate).

``--analyse`` then estimates, by drawing subsets of the recorded candidates, the expected test accuracy
of the candidate a best-of-K choice keeps (K = 1, 3, 5, 8, 10, ...) with 1, 2 or 4 scoring seeds, and
the rank correlation of score and test accuracy. Nothing here reads PCam ``valid``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/screen_selection.py --split-seed 0 --seed 0 \\
        --candidates 16 --out benchmarks/results/selection_screen.jsonl
    .venv/bin/python benchmarks/experiments/screen_selection.py --out benchmarks/results/selection_screen.jsonl --analyse
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def run(args: argparse.Namespace) -> None:
    import torch

    from bench_frontier import EVAL, VIEWS, load_split
    from histodd_fed.distill import run_distillation
    from histodd_fed.distill.select import candidate_config, holdout_split
    from histodd_fed.preprocess import apply_view
    from histodd_fed.preset import load_preset
    from histodd_fed.training.evaluation import evaluate_sets

    torch.set_num_threads(args.threads)
    done = set()
    if args.out.exists():
        for line in args.out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["split_seed"], r["seed"], r["candidate"], r["recipe"]))
    real_raw, test_raw, _ = load_split("tune", args.split_seed)
    real, test = apply_view(real_raw, VIEWS["crop"]), apply_view(test_raw, VIEWS["crop"])
    overrides = {k: json.loads(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    config = load_preset("pcam").distill_config(ipc=10, seed=args.seed, **overrides)
    keep, hold = holdout_split(real, config.candidate_holdout, config.seed)
    source, held = real.subset(keep), real.subset(hold)
    for k in range(args.candidates):
        if (args.split_seed, args.seed, k, args.recipe) in done:
            continue
        t0 = time.perf_counter()
        cand = candidate_config(config, k)
        res = run_distillation(source, cand, None, progress=False)
        secs = time.perf_counter() - t0

        def ev(data, seeds: int) -> list[float]:
            out = evaluate_sets({"c": res.patchset}, data, config.model, seeds=seeds, epochs=EVAL["epochs"],
                                augmentation=EVAL["augmentation"], arch_kwargs=dict(config.model_kwargs),
                                progress=False)["c"]
            return [round(float(a), 4) for a in out.summary()["accuracy_per_seed"]]

        row = {"recipe": args.recipe, "split_seed": args.split_seed, "seed": args.seed, "candidate": k,
               "candidate_seed": cand.seed, "overrides": overrides, "distill_s": round(secs, 1),
               "heldout_per_seed": ev(held, args.score_seeds), "test_per_seed": ev(test, 3)}
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[selection] split {args.split_seed} seed {args.seed} candidate {k}: held-out "
              f"{np.mean(row['heldout_per_seed']):.4f} test {np.mean(row['test_per_seed']):.4f} ({secs:.0f}s)",
              flush=True)


def kept_accuracy(test: np.ndarray, score: np.ndarray, k: int, rng, draws: int) -> float:
    """Expected test accuracy of the candidate best-of-``k`` keeps (highest ``score``), over draws of k candidates."""
    n = len(test)
    if k >= n:
        return float(test[np.argmax(score)])
    picks = [test[sub[np.argmax(score[sub])]] for sub in (rng.choice(n, k, replace=False) for _ in range(draws))]
    return float(np.mean(picks))


def analyse(path: Path, draws: int = 4000, plot: Path | None = None) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["recipe"], r["split_seed"], r["seed"]), []).append(r)
    rng = np.random.default_rng(0)
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for key, rs in sorted(groups.items()):
        test = np.array([np.mean(r["test_per_seed"]) for r in rs])
        held = np.array([r["heldout_per_seed"] for r in rs])
        n, n_seeds = held.shape
        ranks = lambda v: np.argsort(np.argsort(v))   # noqa: E731
        rho = float(np.corrcoef(ranks(held.mean(1)), ranks(test))[0, 1])
        print(f"\n{key[0]} split {key[1]} seed {key[2]}: {n} candidates; test mean {test.mean() * 100:.1f} "
              f"(min {test.min() * 100:.1f}, max {test.max() * 100:.1f}); held-out vs test rank corr {rho:+.2f}")
        score_seeds = [s for s in (1, 2, n_seeds) if s <= n_seeds]
        print("| K | " + " | ".join(f"score seeds {s}" for s in score_seeds) + " |")
        ks = [k for k in (1, 3, 5, 8, 10, 16) if k <= n]
        table = {k: {s: kept_accuracy(test, held[:, :s].mean(1), k, rng, draws) for s in score_seeds} for k in ks}
        for k in ks:
            print(f"| {k} | " + " | ".join(f"{table[k][s] * 100:.1f}" for s in score_seeds) + " |")
        shipped = 2 if 2 in score_seeds else score_seeds[0]     # the preset scores with 2 seeds
        curves[f"{key[0]}, split {key[1]}"] = (ks, [table[k][shipped] * 100 for k in ks])
    if plot is not None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, (ks, vals) in curves.items():
            ax.plot(ks, vals, marker="o", label=label)
        ax.set_xlabel("candidates K (best of K, 2 scoring seeds)")
        ax.set_ylabel("kept candidate's test accuracy %")
        ax.set_title("best of K on tuning splits of PCam train")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"plot: {plot}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="the distill --seed whose candidates are drawn")
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--score-seeds", type=int, default=4)
    ap.add_argument("--recipe", default="preset", help="a name for the recipe (rows are grouped by it)")
    ap.add_argument("--set", action="append", default=[], help="KEY=JSON override of the preset's distill config")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--analyse", action="store_true")
    ap.add_argument("--plot", type=Path, help="with --analyse: a PNG of the kept candidate's accuracy against K")
    args = ap.parse_args()
    if args.analyse:
        analyse(args.out, plot=args.plot)
    else:
        run(args)


if __name__ == "__main__":
    main()
