"""DP distribution matching (dm-dp) on real PCam: utility at epsilon 1 and 8, a no-noise control, Random-10.

One run builds, for every set seed, the `pcam` preset's DP recipe (``distill_dp``) at each epsilon
(``inf``: the same pipeline with the exact class means, no noise - a control, not a DP set) and the
preset's Random coreset, and evaluates each with the preset's evaluation recipe (ConvNet-3 w32,
200 epochs, flip_rotate, ``--eval-seeds`` seeds), accuracy and AUC on the test patches.

Splits (never tune on ``valid``):
- ``--split tune``: PCam ``train`` split per class (seeded 0): 4,000 / class to distil from, the other
  1,000 / class to test on. Knobs are chosen here (``--set key=value`` overrides the DP recipe).
- ``--split valid``: distil from all of ``train`` (5,000 / class), test on ``valid`` (1,500 / class).

Rows go to ``<out>.records.jsonl`` (a killed run continues); the summary to ``--out``.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_dp_pcam.py --split valid --eps 1,8,inf --random \
        --set-seeds 0,1,2 --out benchmarks/results/dp_pcam.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from histodd_fed.patchset import PatchSet, load_image_folder  # noqa: E402
from histodd_fed.preprocess import apply_view  # noqa: E402
from histodd_fed.preset import load_preset  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "pcam-ai4all"


def load_split(split: str) -> tuple[PatchSet, PatchSet]:
    """(distil-from, test) raw 96 px."""
    train = load_image_folder(DATA / "train")
    if split == "valid":
        return train, load_image_folder(DATA / "valid")
    rng = np.random.default_rng(0)
    dist, test = [], []
    for c in range(train.num_classes):
        idx = rng.permutation(np.flatnonzero(train.labels == c))
        dist.append(idx[:4000])
        test.append(idx[4000:5000])
    return train.subset(np.sort(np.concatenate(dist))), train.subset(np.sort(np.concatenate(test)))


def parse_sets(items: list[str]) -> dict:
    out = {}
    for kv in items:
        k, v = kv.split("=", 1)
        out[k] = json.loads(v) if v[:1] in "0123456789-[{tfn\"." else v
    return out


def build(method: str, real: PatchSet, preset, ipc: int, seed: int, over: dict, cache: dict) -> tuple[PatchSet, dict]:
    t0 = time.perf_counter()
    if method == "random":
        from histodd_fed.coreset import build_coreset

        core = build_coreset(real, preset.coreset_config(method="random", ipc=ipc, seed=seed), progress=False)
        return core, {"seconds": round(time.perf_counter() - t0, 1)}
    from histodd_fed.distill.dm_dp import run_dm_dp

    eps = method.split("=", 1)[1]
    noise = eps != "inf"
    cfg = preset.distill_config(dp=True, ipc=ipc, seed=seed, dp_epsilon=float(eps) if noise else 1.0, **over)
    # one embedding pass per set seed: the exact clipped sums are shared by its epsilons, each adds fresh noise
    res = run_dm_dp(real, cfg, progress=False, add_noise=noise, sums_cache=cache.setdefault(seed, {}))
    m = res.patchset.meta
    info = {"seconds": round(time.perf_counter() - t0, 1), "final_loss": m["final_loss"],
            "first_loss": m["loss_curve"][0]["mean"]}
    if m["dp"]:
        info.update({k: m["dp"][k] for k in ("epsilon", "delta", "noise_multiplier", "clip")})
    return res.patchset, info


def evaluate(train: PatchSet, test: PatchSet, preset, seeds: int) -> dict:
    from histodd_fed.training.evaluation import evaluate_sets

    ev = preset.eval
    s = evaluate_sets({"set": train}, test, ev.arch, seeds=seeds, epochs=ev.epochs_for(train.kind), lr=ev.lr,
                      batch_size=ev.batch_size, augmentation=ev.augmentation, arch_kwargs=ev.arch_kwargs,
                      progress=False)["set"].summary()
    return {k: s[k] for k in ("accuracy_mean", "accuracy_std", "auc_mean", "balanced_accuracy_mean",
                              "accuracy_per_seed", "auc_per_seed")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("tune", "valid"), default="tune")
    ap.add_argument("--eps", default="1,8,inf", help="comma list of epsilons (inf: no-noise control)")
    ap.add_argument("--random", action="store_true", help="also Random-ipc (the preset's coreset)")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--set-seeds", default="0,1,2")
    ap.add_argument("--eval-seeds", type=int, default=None, help="default: the preset's (3)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="DP recipe override key=value")
    ap.add_argument("--tag", default="", help="label of this recipe variant in the records")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    preset = load_preset("pcam")
    over = parse_sets(args.sets)
    eval_seeds = args.eval_seeds or preset.eval.seeds
    real, test = load_split(args.split)
    real, test = apply_view(real, preset.view), apply_view(test, preset.view)
    methods = [f"dmdp_eps={e}" for e in args.eps.split(",") if e] + (["random"] if args.random else [])
    rec_path = args.out.with_suffix(".records.jsonl")
    rec_path.parent.mkdir(parents=True, exist_ok=True)
    done, cache = set(), {}
    if rec_path.exists():
        for line in rec_path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["split"], r["tag"], r["method"], r["seed"], r["ipc"]))
    for seed in [int(s) for s in args.set_seeds.split(",")]:
        for method in methods:
            tag = args.tag if method != "random" else ""
            key = (args.split, tag, method, seed, args.ipc)
            if key in done:
                continue
            syn, info = build(method, real, preset, args.ipc, seed, over if method != "random" else {}, cache)
            row = {"split": args.split, "tag": tag, "method": method, "seed": seed, "ipc": args.ipc,
                   "overrides": over if method != "random" else {}, **info,
                   **evaluate(syn, test, preset, eval_seeds)}
            print(json.dumps({k: row[k] for k in ("method", "seed", "accuracy_mean", "auc_mean", "seconds")}),
                  flush=True)
            with rec_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in rec_path.read_text().splitlines()]
    rows = [r for r in rows if r["split"] == args.split and r["ipc"] == args.ipc and r["tag"] in (args.tag, "")]
    summary = {}
    for method in methods:
        rs = [r for r in rows if r["method"] == method and r["tag"] == (args.tag if method != "random" else "")]
        if not rs:
            continue
        accs = [r["accuracy_mean"] for r in rs]
        summary[method] = {"sets": len(rs), "accuracy_mean": float(np.mean(accs)),
                           "accuracy_std_over_sets": float(np.std(accs)),
                           "auc_mean": float(np.mean([r["auc_mean"] for r in rs])),
                           "per_set": {r["seed"]: r["accuracy_mean"] for r in rs},
                           **({"epsilon": rs[0]["epsilon"], "noise_multiplier": rs[0]["noise_multiplier"]}
                              if "epsilon" in rs[0] else {})}
    out = {"split": args.split, "ipc": args.ipc, "eval_seeds": eval_seeds, "tag": args.tag, "overrides": over,
           "recipe": preset.distill_config(dp=True, dp_epsilon=1.0, ipc=args.ipc, **over).to_dict(),
           "command": " ".join(["benchmarks/bench_dp_pcam.py"] + sys.argv[1:]), "summary": summary}
    args.out.write_text(json.dumps(out, indent=2, default=lambda v: None if isinstance(v, float) and math.isinf(v) else v))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
