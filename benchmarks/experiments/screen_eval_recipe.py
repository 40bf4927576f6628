"""Screen evaluation recipes on real PCam: the same training sets under several recipes, side by side.

The issue-12 targets compare a synthetic set with Random / Herding coresets and Full *under the same
evaluation recipe*, so a recipe change must be measured on every row at once. For one split of
``benchmarks/bench_frontier.py`` (``tune`` with ``--split-seed``, or ``valid`` for the final check),
this script builds Random and Herding coresets (set seeds 0, 1, 2; as the frontier bench), loads the
saved synthetic sets given with ``--sets NAME=DIR,DIR,...`` (sets the frontier bench wrote under
``<out>/work/sets``), optionally trains Full, and evaluates every set under every recipe named in
``--recipes`` (see RECIPES). One JSON row per (recipe, set) is appended to ``<out>/records.jsonl``
(skipped when present, so a killed run continues); ``--table`` prints the comparison.

    .venv/bin/python benchmarks/experiments/screen_eval_recipe.py --split tune --out /tmp/ev-t0 \\
        --sets dm=/tmp/fr/best-t0/work/sets/dm_cmix2_best5-ipc10-s0,... --recipes base,dsa --full
    .venv/bin/python benchmarks/experiments/screen_eval_recipe.py --out /tmp/ev-t0 --table
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from bench_frontier import EVAL, VIEW, build, load_split  # noqa: E402

from histodd_fed.patchset import PatchSet  # noqa: E402
from histodd_fed.preprocess import apply_view  # noqa: E402

#: name -> evaluation recipe (evaluate_sets keywords; ``full_epochs`` for the Full row)
BASE = {k: v for k, v in EVAL.items() if k not in ("arch", "arch_kwargs")}   # the pcam preset's recipe
RECIPES: dict[str, dict] = {
    "base": BASE,                                                          # the pcam preset's recipe
    "dsa": {**BASE, "augmentation": "crop_cutout_flip_scale_rotate"},      # DSA's ops (DC/DM papers' evaluation)
    "dsa500": {**BASE, "epochs": 500, "augmentation": "crop_cutout_flip_scale_rotate"},
    "crop": {**BASE, "augmentation": "crop_flip_rotate"},
    "dsacolor": {**BASE, "augmentation": "color_crop_cutout_flip_scale_rotate"},
    "base500": {**BASE, "epochs": 500},
    "base1000": {**BASE, "epochs": 1000},
    "lr03": {**BASE, "lr": 0.03},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--split", choices=("tune", "valid"), default="tune")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--sets", default="", help="NAME=DIR,DIR,...;NAME=... saved synthetic sets (PatchSet dirs)")
    ap.add_argument("--baselines", default="random,herding")
    ap.add_argument("--full", action="store_true", help="also train Full (all distil-from patches)")
    ap.add_argument("--recipes", default="base,dsa")
    ap.add_argument("--eval-seeds", type=int, default=3)
    ap.add_argument("--table", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rec = args.out / "records.jsonl"
    if args.table:
        return table(rec)
    import torch

    from histodd_fed.training.evaluation import evaluate_sets

    torch.set_num_threads(1)
    done = {(r["recipe"], r["set"]) for r in map(json.loads, rec.read_text().splitlines())} if rec.exists() else set()
    real_raw, test_raw, _ = load_split(args.split, args.split_seed)
    real, test = apply_view(real_raw, VIEW), apply_view(test_raw, VIEW)
    sets: dict[str, PatchSet] = {}
    for base in filter(None, args.baselines.split(",")):
        for s in (0, 1, 2):
            sets[f"{base}-s{s}"] = build(base, real, 10, s, args.out / "work", 2)[0]
    for group in filter(None, args.sets.split(";")):
        name, _, dirs = group.partition("=")
        for s, d in enumerate(dirs.split(",")):
            sets[f"{name}-s{s}"] = PatchSet.load(Path(d))
    if args.full:
        sets["full"] = real
    for rname in args.recipes.split(","):
        r = RECIPES[rname]
        for sname, ps in sets.items():
            if (rname, sname) in done:
                continue
            t0 = time.perf_counter()
            full = sname == "full"
            ev = evaluate_sets({sname: ps}, test, EVAL["arch"], seeds=args.eval_seeds,
                               epochs=r["full_epochs"] if full else r["epochs"], lr=r["lr"],
                               batch_size=r["batch_size"], augmentation=r["augmentation"],
                               arch_kwargs=EVAL["arch_kwargs"], progress=False)[sname].summary()
            row = {"recipe": rname, "set": sname, "split": args.split, "split_seed": args.split_seed,
                   "accuracy_mean": ev["accuracy_mean"], "auc_mean": ev["auc_mean"],
                   "seconds": round(time.perf_counter() - t0, 1)}
            with rec.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[eval-screen] {rname} {sname}: acc {row['accuracy_mean']:.4f} auc {row['auc_mean']:.4f} "
                  f"({row['seconds']} s)", flush=True)


def table(rec: Path) -> None:
    rows = [json.loads(line) for line in rec.read_text().splitlines()]
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        groups.setdefault((r["recipe"], r["set"].rsplit("-s", 1)[0]), []).append(r["accuracy_mean"] * 100)
    recipes = sorted({k[0] for k in groups})
    names = sorted({k[1] for k in groups})
    print("| set | " + " | ".join(recipes) + " |")
    print("|---|" + "---|" * len(recipes))
    for n in names:
        cells = []
        for rc in recipes:
            v = groups.get((rc, n))
            cells.append("-" if not v else f"{np.mean(v):.1f} ± {np.std(v):.1f} ({len(v)})")
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
