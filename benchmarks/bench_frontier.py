"""Privacy-utility frontier on real PCam: accuracy / AUC against the export gate's statistics.

For every training set (Random / Herding coresets, Histo-DD at several recipes, budgets and inits,
Full) built from the *distil-from* patches, this script measures

- utility: a fresh evaluation network trained on the set (the `pcam` preset's evaluation recipe,
  ``--eval-seeds`` seeds), accuracy and ROC AUC on the *test* patches;
- privacy: the export gate's own audit against the distil-from patches in the set's view
  (max SSIM to a real patch, max structure correlation vs the real-real p99 line, min normalised
  L2 vs the real-real p1 line, membership-inference AUC with held-out real patches as non-members),
  and the gate's verdict as shipped (configs/privacy.yaml thresholds, nothing loosened).

Splits (never tune on `valid`):
- ``--split tune``: PCam ``train`` (5,000 / class) is split, seeded: 2,500 / class to distil from,
  1,000 / class to test on, the other 1,500 / class as the membership attack's non-members.
- ``--split valid``: distil from all of ``train`` (10,000), test on ``valid`` (3,000); the
  attack's non-members are 1,000 / class of ``valid`` (they never train anything).

Each (set, seed) row is appended to ``<out>/records.jsonl`` and skipped when present, so a killed
run continues. ``--table`` prints the Markdown table and writes ``frontier.png``.

    .venv/bin/python benchmarks/bench_frontier.py --split tune --out results/frontier-tune \
        --methods random,herding,histodd,mixture_priv --set-seeds 0,1,2
    .venv/bin/python benchmarks/bench_frontier.py --out results/frontier-tune --table
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from histodd_fed.formation import decode_set, pack_set  # noqa: E402
from histodd_fed.patchset import PatchSet, load_image_folder  # noqa: E402
from histodd_fed.preprocess import ViewSpec, apply_view  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "pcam-ai4all"
#: The views a run can use (``--view``): the preset's central 32 px, or the whole 96 px patch resized to 32 px
#: (the tissue around PCam's label region kept, at a third of the resolution).
VIEWS = {"crop": ViewSpec.centre_crop(96, 32), "resize": ViewSpec.resize(96, 32)}

#: Evaluation recipe (the `pcam` preset's; configs/study-cpu.yaml eval).
EVAL = {"arch": "convnet", "arch_kwargs": {"width": 32, "depth": 3}, "epochs": 200, "full_epochs": 30, "lr": 0.01,
        "batch_size": 128, "augmentation": "flip_rotate"}

#: The landed PCam recipe (configs/distill-pcam.yaml).
BASE = {"model": "convnet", "model_kwargs": {"width": 32, "depth": 3}, "image_size": 32, "init": "real",
        "outer_steps": 10, "inner_steps": 5, "lr_img": 0.01, "momentum_img": 0.5, "batch_real": 32, "distance": "l1",
        "pool_size": 1, "pool_epochs": 2, "pool_lr": 0.01, "pool_batch": 64, "alpha": 0.01, "net_steps": 1,
        "lr_net": 0.01, "batch_net": 64, "augmentation": "crop_cutout_flip_scale_rotate", "checkpoint_every": 0}

#: Histo-DD recipes: overrides of BASE. Every one tried goes into docs/pcam-tuning.md.
#: distribution matching (DM) on one untrained network, no network steps, from colour-coherent mixtures of
#: 4 (mean of a random anchor and 3 of its 16 colour-nearest patches): the base of the dm_* recipes below
DM = {"objective": "distribution", "init": "mixture", "init_mix": 4, "init_colour_pool": 16, "pool_epochs": 0,
      "pool_size": 1, "net_steps": 0, "outer_steps": 400, "inner_steps": 1, "batch_real": 128, "lr_img": 1.0,
      "momentum_img": 0.5}

RECIPES: dict[str, dict] = {
    "histodd": {},
    "noise_long": {"init": "noise", "outer_steps": 100, "inner_steps": 10, "lr_img": 0.03, "lr_schedule": "cosine"},
    "mixture": {"init": "mixture", "init_mix": 16, "outer_steps": 60, "inner_steps": 10, "lr_img": 0.03,
                "lr_schedule": "cosine"},
    "mixture_priv": {"init": "mixture", "init_mix": 16, "outer_steps": 60, "inner_steps": 10, "lr_img": 0.03,
                     "lr_schedule": "cosine", "privacy_step": 0.01},
    "real_priv": {"outer_steps": 60, "inner_steps": 10, "lr_img": 0.03, "lr_schedule": "cosine", "privacy_step": 0.01},
    "mosaic0": {"init": "mosaic", "outer_steps": 1, "inner_steps": 1, "lr_img": 1e-9},   # the init alone
    "mosaic": {"init": "mosaic", "outer_steps": 60, "inner_steps": 10, "lr_img": 0.01, "lr_schedule": "cosine"},
    "mosaic_priv": {"init": "mosaic", "outer_steps": 60, "inner_steps": 10, "lr_img": 0.01, "lr_schedule": "cosine",
                    "privacy_step": 0.01},
    # DP matching (histodd_fed.distill.dp): noise init, untrained pool, network steps on synthetic images
    "dp": {"init": "noise", "pool_epochs": 0, "dp_noise": 1.0, "dp_clip": 1.0, "batch_real": 64, "outer_steps": 40,
           "inner_steps": 10, "distance": "mse", "lr_img": 0.3, "lr_schedule": "cosine",
           "augmentation": "crop_flip_rotate"},
    "cmosaic0": {"init": "mosaic", "init_colour_pool": 16, "outer_steps": 1, "inner_steps": 1, "lr_img": 1e-9},
    "cmosaic": {"init": "mosaic", "init_colour_pool": 16, "outer_steps": 60, "inner_steps": 10, "lr_img": 0.01,
                "lr_schedule": "cosine"},
    "cmix4_0": {"init": "mixture", "init_mix": 4, "init_colour_pool": 16, "outer_steps": 1, "inner_steps": 1,
                "lr_img": 1e-9},
    # distribution matching (DM) on untrained networks, no network steps
    "dm_cmix": {**DM},
    "dm_cmix_long": {**DM, "outer_steps": 1200},
    "dm_cmix8": {**DM, "init_mix": 8, "init_colour_pool": 32},
    # the shipped `--preset pcam` recipe with one candidate (mixtures of 8, every block's output)
    "dm_cmix8_all": {**DM, "init_mix": 8, "init_colour_pool": 32, "dm_layers": "all"},
    "dm_cmix_km": {**DM, "init_anchor": "kmeans"},
    "dm_cmix_km_priv": {**DM, "init_anchor": "kmeans", "privacy_step": 0.01},
    "dm_noise": {"objective": "distribution", "init": "noise", "pool_epochs": 0, "pool_size": 1, "net_steps": 0,
                 "outer_steps": 400, "inner_steps": 1, "batch_real": 128, "lr_img": 1.0, "momentum_img": 0.5},
    # multi-formation (histodd_fed.formation): each stored 32 px image holds 2 x 2 tiles of 16 px, decoded
    # into 4 training images: ipc 10's bytes, 40 training images per class
    "dm_cmix_f2": {**DM, "formation": 2},
    "dm_cmix_km_f2": {**DM, "init_anchor": "kmeans", "formation": 2},
    "cmix4_f2_0": {"objective": "distribution", "init": "mixture", "init_mix": 4, "init_colour_pool": 16,
                   "pool_epochs": 0, "pool_size": 1, "net_steps": 0, "outer_steps": 1, "inner_steps": 1,
                   "lr_img": 1e-9, "formation": 2},
    # DM as published samples a fresh random network every step; the recipes above reuse ONE untrained
    # network (pool_size 1) for all 400 steps. pool_size 400: a different random initialisation per step.
    "dm_cmix_p400": {**DM, "pool_size": 400},
    "dm_cmix_km_p400": {**DM, "init_anchor": "kmeans", "pool_size": 400},
    "dm_cmix_p1000": {**DM, "pool_size": 1000, "outer_steps": 1000, "batch_real": 256},
    "dm_cmix2": {**DM, "init_mix": 2},
    # DM from colour-coherent 2 x 2 mosaics (quadrants of 4 colour-near real patches: real morphology at
    # 16 px, no real patch's layout; the gate passes mosaics, the tile-corr column shows the quadrant copying)
    "dm_cmosaic": {"objective": "distribution", "init": "mosaic", "init_colour_pool": 16, "pool_epochs": 0,
                   "pool_size": 1, "net_steps": 0, "outer_steps": 400, "inner_steps": 1, "batch_real": 128,
                   "lr_img": 1.0, "momentum_img": 0.5},
    # best of 5 (histodd_fed.distill.select): 5 candidate sets of dm_cmix2 from all but 500 patches per class,
    # the one that trains best on those 500 / class kept (the centre's own held-out patches; never test/valid)
    "dm_cmix2_best5": {**DM, "init_mix": 2, "candidates": 5},
    "dm_cmix_best5": {**DM, "candidates": 5},
    # DM matching more of the embedding (session 5): every block's output (layer-wise, as CAFE / DataDAM),
    # second moments as well as means, or both
    "dm_cmix2_all": {**DM, "init_mix": 2, "dm_layers": "all"},
    "dm_cmix2_m2": {**DM, "init_mix": 2, "dm_moments": 2},
    "dm_cmix2_all_m2": {**DM, "init_mix": 2, "dm_layers": "all", "dm_moments": 2},
    "dm_cmix2_all_best5": {**DM, "init_mix": 2, "dm_layers": "all", "candidates": 5},
    # session 6, ipc 50 (the preset's distill_by_ipc): the privacy term pushes the few images that keep a
    # real patch's layout away (without it 4 of 4 ipc-50 sets were blocked on the tuning split), and the
    # best of 5 is the most accurate candidate the export gate passes (candidate_gate)
    "dm_cmix2_all_priv_best5g": {**DM, "init_mix": 2, "dm_layers": "all", "privacy_step": 0.01, "candidates": 5,
                                 "candidate_gate": True},
    # IDM-style: networks trained briefly on the real patches (1 epoch each), 20 of them
    "dm_cmix_p20e1": {**DM, "pool_epochs": 1, "pool_size": 20},
    "mixture_pc": {"init": "mixture", "init_mix": 16, "outer_steps": 60, "inner_steps": 10, "lr_img": 0.03,
                   "lr_schedule": "cosine", "update": "per_class", "dsa_mode": "single"},
}


def load_split(split: str, seed: int = 0) -> tuple[PatchSet, PatchSet, PatchSet]:
    """(distil-from, test, non-members), all raw 96 px."""
    train = load_image_folder(DATA / "train")
    rng = np.random.default_rng(seed)
    if split == "valid":
        test = load_image_folder(DATA / "valid")
        hold = []
        for c in range(test.num_classes):
            idx = np.flatnonzero(test.labels == c)
            hold.append(np.sort(rng.choice(idx, size=min(1000, len(idx)), replace=False)))
        return train, test, test.subset(np.sort(np.concatenate(hold)))
    parts: dict[str, list] = {"distil": [], "test": [], "hold": []}
    for c in range(train.num_classes):
        idx = rng.permutation(np.flatnonzero(train.labels == c))
        parts["distil"].append(idx[:2500])
        parts["test"].append(idx[2500:3500])
        parts["hold"].append(idx[3500:])
    return tuple(train.subset(np.sort(np.concatenate(parts[k]))) for k in ("distil", "test", "hold"))


def build(method: str, real: PatchSet, ipc: int, seed: int, work: Path, threads: int) -> tuple[PatchSet, float]:
    """The training set of ``method`` from viewed real patches, and the seconds it took (Histo-DD sets
    are saved with a grid of initial vs final images under ``work/sets``)."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if method == "full":
        return real, 0.0
    if method in ("random_best5", "herding_best5"):   # the DM recipe's best-of-5 selection, on real coresets
        from histodd_fed.coreset import CoresetConfig, build_coreset
        from histodd_fed.distill.select import holdout_split
        from histodd_fed.training.evaluation import evaluate_sets

        keep, hold = holdout_split(real, 500, seed)
        source, held = real.subset(keep), real.subset(hold)
        best, best_acc = None, -1.0
        for k in range(5):
            cfg = CoresetConfig(method=method.split("_")[0], ipc=ipc, seed=seed * 1000 + k, arch="convnet",
                                arch_kwargs={"width": 32, "depth": 3}, feature_epochs=3)
            core = build_coreset(source, cfg, progress=False)
            ev = evaluate_sets({"c": core}, held, "convnet", seeds=2, epochs=200, augmentation="flip_rotate",
                               arch_kwargs={"width": 32, "depth": 3}, progress=False)["c"]
            acc = float(ev.summary()["accuracy_mean"])
            if acc > best_acc:
                best, best_acc = core, acc
        return best, time.perf_counter() - t0
    if method in ("random", "herding", "random_f2", "herding_f2"):
        from histodd_fed.coreset import CoresetConfig, build_coreset

        base, _, f = method.partition("_f")
        f = int(f or 1)
        cfg = CoresetConfig(method=base, ipc=ipc * f * f, seed=seed, arch="convnet",
                            arch_kwargs={"width": 32, "depth": 3}, feature_epochs=3)
        core = build_coreset(real, cfg, progress=False)
        if f > 1:   # the same storage as ipc real patches: 4 real patches at 16 px packed per stored image
            core = pack_set(core, f)
        return core, time.perf_counter() - t0
    from histodd_fed.distill import DistillConfig, run_distillation

    name, _, extra = method.partition("@")
    over = dict(RECIPES[name])
    for kv in filter(None, extra.split(",")):
        k, v = kv.split("=")
        over[k] = json.loads(v)
    cfg = DistillConfig.from_dict({**BASE, **over, "ipc": ipc, "seed": seed})
    res = run_distillation(real, cfg, work_dir=work, progress=False)
    secs = time.perf_counter() - t0
    from histodd_fed.distill.plots import save_grid

    tag = f"{method.replace('@', '_').replace('=', '').replace(',', '_')}-ipc{ipc}-s{seed}"
    (work / "sets").mkdir(parents=True, exist_ok=True)
    res.patchset.save(work / "sets" / tag)
    save_grid(res.initial_images, res.patchset.images, res.patchset.labels, res.patchset.class_names,
              work / "sets" / f"{tag}.png")
    return res.patchset, secs


def evaluate(train: PatchSet, test: PatchSet, seeds: int, full: bool) -> dict:
    from histodd_fed.training.evaluation import evaluate_sets

    ev = evaluate_sets({"set": train}, test, EVAL["arch"], seeds=seeds,
                       epochs=EVAL["full_epochs"] if full else EVAL["epochs"], lr=EVAL["lr"],
                       batch_size=EVAL["batch_size"], augmentation=EVAL["augmentation"],
                       arch_kwargs=EVAL["arch_kwargs"], progress=False)["set"]
    s = ev.summary()
    return {k: s[k] for k in ("accuracy_mean", "accuracy_std", "auc_mean", "auc_std", "balanced_accuracy_mean",
                              "accuracy_per_seed", "auc_per_seed")}


def audit(syn: PatchSet, real: PatchSet, hold: PatchSet) -> dict:
    """The export gate's audit (configs/privacy.yaml as shipped) with the membership attack."""
    from histodd_fed.privacy.audit import AuditConfig, run_view_audits

    cfg = AuditConfig.from_yaml(ROOT / "configs" / "privacy.yaml")
    rep = run_view_audits(syn, real, hold, cfg)   # multi-formation sets: decoded images and tiles, worst decides
    mem = rep.memorisation.metrics
    out = {"passed": not rep.risks, "risks": list(rep.risks),
           "max_ssim": float(mem["ssim"].synthetic_nn.max()),
           "min_l2": float(mem["l2"].synthetic_nn.min()), "l2_line": float(mem["l2"].reference_threshold(1.0)),
           "max_structure": float(mem["structure"].synthetic_nn.max()),
           "structure_line": float(mem["structure"].reference_threshold(1.0)),
           "mia_auc": None if rep.membership is None else float(rep.membership.max_auc)}
    return out


def tile_stats(syn: PatchSet, real: PatchSet, grid: int = 2, reference: int = 500, seed: int = 0) -> dict:
    """Sub-patch copying, which the gate's whole-patch rules do not see: each synthetic tile of a
    ``grid`` x ``grid`` split against the same tile of every real patch (structure correlation of the
    grey tile), with the real-real reference (tiles of ``reference`` real patches against the other
    real patches' tiles, exact duplicates excluded). Returns the largest and median synthetic values
    and the real-real p90 and median (PCam repeats tissue between patches: the real-real p99 is 1.0)."""
    import torch

    from histodd_fed.structure import structure_vectors

    xs, _ = syn.to_tensors()
    xr, _ = real.to_tensors()
    h = xs.shape[-1] // grid
    rng = np.random.default_rng(seed)
    q = torch.from_numpy(rng.choice(len(real), min(reference, len(real)), replace=False))
    syn_max, ref_nn = [], []
    flat = xr.flatten(1)
    same = (torch.cdist(flat[q], flat) == 0)          # a patch and its exact copies
    for i in range(grid):
        for j in range(grid):
            sl = (slice(None), slice(None), slice(i * h, (i + 1) * h), slice(j * h, (j + 1) * h))
            vr = structure_vectors(xr[sl], 1).float()
            vs = structure_vectors(xs[sl], 1).float()
            syn_max.append((vs @ vr.T).max(1).values)
            c = vr[q] @ vr.T
            c[same] = -2.0
            ref_nn.append(c.max(1).values)
    ref = torch.cat(ref_nn)
    return {"tile_corr": float(torch.stack(syn_max).max()), "tile_corr_median": float(torch.stack(syn_max).median()),
            "tile_line": float(torch.quantile(ref, 0.9)), "tile_ref_median": float(ref.median())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--split", choices=("tune", "valid"), default="tune")
    ap.add_argument("--methods", default="random,herding,histodd,full")
    ap.add_argument("--split-seed", type=int, default=0,
                    help="seed of the tune split of train (rows record split 'tune' for 0, 'tuneS' otherwise)")
    ap.add_argument("--view", choices=sorted(VIEWS), default="crop",
                    help="crop: the central 32 px (the preset's view); resize: the 96 px patch resized to 32 px "
                         "(rows record split 'SPLIT-resize')")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--set-seeds", default="0,1,2")
    ap.add_argument("--eval-seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-audit", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the table of --out and write frontier.png")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    rec_path = args.out / "records.jsonl"
    if args.table:
        table(rec_path, args.out)
        return
    if not DATA.is_dir():
        raise SystemExit(f"{DATA}: PCam folder not found (../shared/data)")
    done = set()
    if rec_path.exists():
        for line in rec_path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["method"], r["ipc"], r["set_seed"], r["split"]))
    t0 = time.perf_counter()
    real_raw, test_raw, hold_raw = load_split(args.split, args.split_seed)
    split = args.split if args.split_seed == 0 else f"{args.split}{args.split_seed}"
    if args.view != "crop":
        split += f"-{args.view}"
    view = VIEWS[args.view]
    real, test, hold = (apply_view(p, view) for p in (real_raw, test_raw, hold_raw))
    print(f"[frontier] split {split}: distil-from {len(real)} test {len(test)} non-members {len(hold)} "
          f"({view.describe()}), loaded in {time.perf_counter() - t0:.0f}s", flush=True)
    methods: list[str] = []   # "a,b@k=v,k2=v2": the overrides of one recipe are comma-separated too
    for part in args.methods.split(","):
        if "=" in part and "@" not in part and methods:
            methods[-1] += "," + part
        else:
            methods.append(part)
    for method in methods:
        seeds = [0] if method == "full" else [int(s) for s in args.set_seeds.split(",")]
        for seed in seeds:
            key = (method, args.ipc, seed, split)
            if key in done:
                continue
            syn, secs = build(method, real, args.ipc, seed, args.out / "work", args.threads)
            row = {"method": method, "ipc": args.ipc, "set_seed": seed, "split": split, "n_real": len(real),
                   "n_train": len(syn), "build_seconds": round(secs, 1)}
            row.update(evaluate(syn, test, args.eval_seeds, method == "full"))
            if method != "full" and not args.no_audit:
                row["gate"] = audit(syn, real, hold)
                row["gate"].update(tile_stats(decode_set(syn), real))
            with rec_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            g = row.get("gate") or {}
            print(f"[frontier] {method} ipc {args.ipc} seed {seed}: acc {row['accuracy_mean']:.4f} auc "
                  f"{row['auc_mean']:.4f} build {secs:.0f}s gate {'-' if not g else 'pass' if g.get('passed') else 'BLOCK'} "
                  f"ssim {g.get('max_ssim', math.nan):.3f} struct {g.get('max_structure', math.nan):.3f}/"
                  f"{g.get('structure_line', math.nan):.3f} l2 {g.get('min_l2', math.nan):.4f}/"
                  f"{g.get('l2_line', math.nan):.4f} mia {g.get('mia_auc')} tile {g.get('tile_corr', math.nan):.3f}/"
                  f"{g.get('tile_line', math.nan):.3f}", flush=True)


def table(rec_path: Path, out: Path) -> None:
    rows = [json.loads(line) for line in rec_path.read_text().splitlines()] if rec_path.exists() else []
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["split"], r["method"], r["ipc"]), []).append(r)
    print("| split | method | ipc | sets | accuracy % | AUC % | gate pass | max SSIM | max structure (line) | "
          "min L2 (line) | MIA AUC | max tile corr (real-real p90) | build s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    pts = []
    for (split, method, ipc), rs in sorted(groups.items()):
        acc = np.array([r["accuracy_mean"] for r in rs]) * 100
        auc = np.array([r["auc_mean"] for r in rs]) * 100
        gs = [r.get("gate") for r in rs if r.get("gate")]

        def agg(k, f=max):
            v = [g[k] for g in gs if g.get(k) is not None]
            return f(v) if v else math.nan

        npass = sum(bool(g["passed"]) for g in gs)
        print(f"| {split} | {method} | {ipc} | {len(rs)} | {acc.mean():.1f} ± {acc.std():.1f} | "
              f"{auc.mean():.1f} ± {auc.std():.1f} | {f'{npass}/{len(gs)}' if gs else '-'} | {agg('max_ssim'):.3f} | "
              f"{agg('max_structure'):.3f} ({agg('structure_line'):.3f}) | {agg('min_l2', min):.4f} "
              f"({agg('l2_line'):.4f}) | {agg('mia_auc'):.3f} | {agg('tile_corr'):.3f} ({agg('tile_line'):.3f}) | "
              f"{np.mean([r['build_seconds'] for r in rs]):.0f} |")
        for r in rs:
            pts.append((split, method if ipc == 10 else f"{method} ipc{ipc}", r))
    if not pts:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    stats = [("max_ssim", "max SSIM to a real patch", None), ("max_structure", "max structure correlation",
                                                              "structure_line"), ("mia_auc", "membership AUC", None)]
    methods = sorted({m for _, m, _ in pts})
    colours = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}
    full = [r for _, m, r in pts if m == "full"]
    for ax, (k, label, line_key) in zip(axes, stats):
        for _, m, r in pts:
            g = r.get("gate")
            if not g or g.get(k) is None:
                continue
            ax.scatter(g[k], r["accuracy_mean"] * 100, color=colours[m], marker="o" if g["passed"] else "x",
                       label=m, s=40)
        line = {"max_ssim": 0.95, "mia_auc": 0.6}.get(k)
        if line_key:
            vals = [r["gate"][line_key] for _, _, r in pts if r.get("gate")]
            line = float(np.mean(vals)) if vals else None
        if line is not None:
            ax.axvline(line, color="red", ls="--", lw=1, label="gate line")
        for r in full:
            ax.axhline(r["accuracy_mean"] * 100, color="k", ls=":", lw=1, label="Full")
        ax.set_xlabel(label + " (o pass, x blocked)")
        ax.set_ylabel("accuracy %")
        h, lab = ax.get_legend_handles_labels()
        uniq = dict(zip(lab, h))
        ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    fig.suptitle(f"PCam privacy-utility frontier ({rec_path.parent.name})")
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=110)
    print(f"wrote {out / 'frontier.png'}")


if __name__ == "__main__":
    main()
