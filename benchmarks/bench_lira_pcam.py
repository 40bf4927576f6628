"""LiRA on PCam: how well the online likelihood-ratio attack finds members of released sets, per recipe.

The textbook LiRA design (Carlini et al. 2022): a pool of ``--pool`` real PCam ``train`` patches
(``pool / 2`` per class, seeded, in the pcam preset's view: the centre 32 px), split at random into
members (half) and non-members. The *target* set is the recipe applied to the members; ``--shadows``
shadow sets are the recipe applied to balanced random halves of the pool (each patch IN for half of
them); a fresh evaluation ConvNet-3 w32 (200 epochs, flip / rotate; ``lira.DEFAULT_TRAIN_SPEC``) is
trained on every set (``histodd_fed.privacy.lira.run_lira``). The target model's accuracy on ``valid``
(``--valid-per-class`` per class, same view) is reported too.

Recipes (``--recipes``, comma-separated, run in order):

- ``random``, ``herding``: coresets, ipc ``--ipc``, the preset's coreset options (ConvNet-3 w32 herding net);
- ``dm``: the shipped DM recipe (``--preset pcam``, ``preset.distill_config(ipc)`` as ``centre-node
  distill`` builds it) with ``--dm-candidates`` best-of-K candidates for the target AND the shadows
  (the preset's 10 at ipc 10 - 5 until 2026-12-06 - with the gate-aware choice do not fit a 2-core CPU;
  1 turns best-of-K off);
- ``paper``: the paper's gradient matching (``configs/distill-paper.yaml``) on a short CPU schedule
  (``--paper-*`` options; printed and recorded);
- ``dp``: the preset's DP recipe (dm-dp, ``distill_dp`` section, ``--dp-epsilon``) when
  ``histodd_fed.distill`` has it; skipped with a message otherwise. ``dp@E`` runs it at epsilon ``E``
  (``dp@1,dp@8``: several budgets in one run).

The privacy-utility frontier (issue 20) is one command: every row of its table and both panels of its
plot (accuracy vs LiRA TPR; accuracy vs epsilon) come from this run's records:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lira_pcam.py --recipes random,herding,dm,paper,dp@1,dp@8 \
        --plot docs/img/privacy-frontier.png

Records go to ``--out`` (``benchmarks/results/lira_pcam.json``, merged by recipe name, written after
each recipe) and a markdown table is printed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_lira_pcam.py --recipes random,herding,dm
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "pcam-ai4all"


def _coreset_recipe(preset, method: str, ipc: int):
    from histodd_fed.release.recipes import Recipe

    cfg = dataclasses.asdict(preset.coreset_config(method=method, ipc=ipc))
    cfg.pop("seed")
    return Recipe("coreset", method, cfg), f"coreset {method}, ipc {ipc}, preset coreset options"


def _distill_recipe(cfg, method: str = "histo-dd"):
    from histodd_fed.release.recipes import Recipe

    d = cfg.to_dict()
    d.pop("seed")
    return Recipe("distill", method, d)


def build_recipe(name: str, preset, args):
    """(make_set, description) for one recipe name, or (None, why it is skipped)."""
    if name in ("random", "herding", "forgetting"):
        return _coreset_recipe(preset, name, args.ipc)
    if name == "dm":
        cfg = preset.distill_config(ipc=args.ipc, candidates=args.dm_candidates, device="cpu")
        shipped = preset.distill_config(ipc=args.ipc).candidates
        note = (f"preset {preset.name} DM recipe, ipc {args.ipc}, {cfg.outer_steps} steps, candidates "
                f"{cfg.candidates}" + (f" (the preset: {shipped}, gate-aware; {cfg.candidates} here for target and "
                                       "shadows, to fit the CPU)" if args.dm_candidates != shipped else ""))
        return _distill_recipe(cfg), note
    if name == "paper":
        from histodd_fed.distill import DistillConfig

        cfg = DistillConfig.from_yaml(REPO / "configs" / "distill-paper.yaml", ipc=args.ipc, image_size=32,
                                      model=args.paper_model, model_kwargs=json.loads(args.paper_model_kwargs),
                                      outer_steps=args.paper_outer, inner_steps=args.paper_inner,
                                      pool_size=args.paper_pool, pool_epochs=args.paper_pool_epochs, device="cpu")
        note = (f"distill-paper.yaml gradient matching (init real, per-class updates, DSA 'S' + stain), short CPU "
                f"schedule: {cfg.model} {cfg.model_kwargs}, 32 px, K={cfg.outer_steps} x U={cfg.inner_steps}, pool "
                f"{cfg.pool_size} x {cfg.pool_epochs} epochs (paper: resnetap10 w64, 64 px, 200 x 100, pool 5 x 5)")
        return _distill_recipe(cfg), note
    if name == "dp" or name.startswith("dp@"):
        import inspect

        epsilon = args.dp_epsilon
        if name.startswith("dp@"):
            try:
                epsilon = float(name[3:])
            except ValueError:
                raise SystemExit(f"recipe {name!r}: write dp@EPSILON, e.g. dp@1 or dp@8") from None

        if "dp" not in inspect.signature(preset.distill_config).parameters or not getattr(preset, "distill_dp", None):
            return None, "skipped: histodd_fed has no DP distillation recipe (preset distill_dp) in this tree"
        try:
            from histodd_fed.distill import dm_dp  # noqa: F401

            cfg = preset.distill_config(dp=True, ipc=args.ipc, dp_epsilon=epsilon, device="cpu")
        except Exception as exc:  # noqa: BLE001 - any failure of the optional recipe is reported and skipped
            return None, f"skipped: DP recipe not usable ({type(exc).__name__}: {exc})"
        note = (f"preset {preset.name} DP recipe (dm-dp), epsilon {cfg.dp_epsilon}, delta {cfg.dp_delta}, init "
                f"{cfg.init}, {cfg.outer_steps} steps (noise from OS entropy: not reproducible run to run)")
        return _distill_recipe(cfg, "dm-dp"), note
    raise SystemExit(f"unknown recipe {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="random,herding,dm")
    ap.add_argument("--pool", type=int, default=2000)
    ap.add_argument("--shadows", type=int, default=16)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--valid-per-class", type=int, default=500)
    ap.add_argument("--lira-epochs", type=int, default=None, help="evaluation classifier epochs (default 200)")
    ap.add_argument("--dm-candidates", type=int, default=1)
    ap.add_argument("--paper-model", default="convnet")
    ap.add_argument("--paper-model-kwargs", default='{"width": 32, "depth": 3}')
    ap.add_argument("--paper-outer", type=int, default=10)
    ap.add_argument("--paper-inner", type=int, default=10)
    ap.add_argument("--paper-pool", type=int, default=1)
    ap.add_argument("--paper-pool-epochs", type=int, default=2)
    ap.add_argument("--dp-epsilon", type=float, default=1.0)
    ap.add_argument("--arrays", type=Path, default=None, help="also save each recipe's phi arrays (npz) here")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "lira_pcam.json")
    ap.add_argument("--plot", type=Path, default=None,
                    help="write the frontier figure (benchmarks/plot_privacy_frontier.py) from --out's records")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from histodd_fed.patchset import load_image_folder
    from histodd_fed.preprocess import apply_view
    from histodd_fed.preset import load_preset
    from histodd_fed.privacy.lira import DEFAULT_TRAIN_SPEC, run_lira

    if not (DATA / "train").is_dir():
        raise SystemExit(f"{DATA}: PCam (pcam-ai4all) absent")
    preset = load_preset("pcam")
    t = time.perf_counter()
    raw = load_image_folder(DATA / "train", limit_per_class=args.pool // 2, seed=args.seed)
    pool = apply_view(raw, preset.view)
    valid = apply_view(load_image_folder(DATA / "valid", limit_per_class=args.valid_per_class, seed=args.seed),
                       preset.view)
    rng = np.random.default_rng([args.seed, 2022])
    is_member = np.zeros(len(pool), bool)
    is_member[rng.choice(len(pool), len(pool) // 2, replace=False)] = True
    members, non_members = pool.subset(np.flatnonzero(is_member)), pool.subset(np.flatnonzero(~is_member))
    print(f"pool {len(pool)} PCam train patches in view {preset.view.describe()} ({members.class_counts()} members, "
          f"{non_members.class_counts()} non-members), valid {len(valid)}; loaded in {time.perf_counter() - t:.0f}s",
          flush=True)
    spec = DEFAULT_TRAIN_SPEC if args.lira_epochs is None else dataclasses.replace(DEFAULT_TRAIN_SPEC,
                                                                                 epochs=args.lira_epochs)
    records = {}
    if args.out.exists():
        records = {r["recipe"]: r for r in json.loads(args.out.read_text()).get("records", [])}
    xv, yv = valid.to_tensors()
    for name in [r.strip() for r in args.recipes.split(",") if r.strip()]:
        make_set, note = build_recipe(name, preset, args)
        if make_set is None:
            print(f"{name}: {note}", flush=True)
            continue
        print(f"{name}: {note}", flush=True)
        t0 = time.perf_counter()
        target_seed = 10_000 + args.seed
        target = make_set(members, target_seed)
        t_target = time.perf_counter() - t0
        res = run_lira(target, members, non_members, make_set, shadows=args.shadows, train_spec=spec, seed=args.seed,
                       progress=True)
        with torch.no_grad():
            pred = torch.cat([res.target_model(xv[s:s + 512]).argmax(1) for s in range(0, len(xv), 512)])
        acc = float((pred == yv).float().mean())
        secs = time.perf_counter() - t0
        # coresets: the members the target set actually holds, and how many of them clear the 1%-FPR threshold
        in_set = None
        if "source_indices" in target.meta:
            held = np.asarray(target.meta["source_indices"], dtype=np.int64)       # rows of ``members``
            in_set = {"members_in_set": int(len(held)), "found_at_1pct_fpr": res.found_among(held, 0.01),
                      "found_at_0.1pct_fpr": res.found_among(held, 0.001)}
        rec = {"recipe": name, "description": note, "auc": round(res.auc, 4),
               "tpr_at_1pct_fpr": round(res.tpr_at_fpr["0.01"], 4), "tpr_at_0.1pct_fpr": round(res.tpr_at_fpr["0.001"], 4),
               "offline_auc": round(res.offline["auc"], 4),
               "set_auc": round(res.set_online["auc"], 4),
               "set_tpr_at_1pct_fpr": round(res.set_online["tpr_at_fpr"]["0.01"], 4),
               "set_tpr_at_0.1pct_fpr": round(res.set_online["tpr_at_fpr"]["0.001"], 4),
               "set_offline_auc": round(res.set_offline["auc"], 4),
               "set_offline_tpr_at_1pct_fpr": round(res.set_offline["tpr_at_fpr"]["0.01"], 4),
               "global_threshold_auc": round(res.baseline["auc"], 4),
               "global_threshold_tpr_at_1pct_fpr": round(res.baseline["tpr_at_fpr"]["0.01"], 4),
               "target_valid_accuracy": round(acc, 4), "target_set_size": len(target), "coreset_members": in_set,
               "target_accuracy_members": round(res.target_accuracy["members"], 4),
               "target_accuracy_non_members": round(res.target_accuracy["non_members"], 4),
               "shadows": res.shadows, "members": res.members, "non_members": res.non_members,
               "pool": len(pool), "variance": res.summary()["variance"], "seconds": round(secs, 1),
               "seconds_target_set": round(t_target, 1),
               "seconds_parts": {k: round(v, 1) for k, v in res.seconds.items()}, "seed": args.seed,
               "train_spec": res.train_spec, "threads": args.threads, "recipe_config": make_set.to_dict(),
               "dp_epsilon": (target.meta.get("dp") or {}).get("epsilon")}
        records[name] = rec
        if args.arrays is not None:
            args.arrays.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(args.arrays / f"{name}.npz", target_phi=res.target_phi, shadow_phi=res.shadow_phi,
                                keep=res.keep, is_member=res.is_member)
        print(f"{name}: AUC {rec['auc']:.3f}, TPR@1% {rec['tpr_at_1pct_fpr']:.3f}, TPR@0.1% "
              f"{rec['tpr_at_0.1pct_fpr']:.3f} (global threshold AUC {rec['global_threshold_auc']:.3f}), valid acc "
              f"{acc:.3f}, {secs:.0f}s" + (f"; of the {in_set['members_in_set']} members in the set, found at 1% FPR: "
                                           f"{in_set['found_at_1pct_fpr']}" if in_set else ""), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"benchmark": "benchmarks/bench_lira_pcam.py", "design": (
            "pool of PCam train patches (pcam view), random half = members; target = recipe(members); shadows = "
            "recipe(balanced random halves of the pool); online LiRA, per-patch Gaussians with a global variance"),
               "records": list(records.values())}
        tmp = args.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(args.out)
    print()
    print("| recipe | model: AUC | TPR @ 1% | TPR @ 0.1% | set images: AUC | TPR @ 1% | TPR @ 0.1% | set members found "
          "@ 1% (model / set images) | target valid acc | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in records.values():
        cm = r.get("coreset_members")
        found = (f"{max(cm['found_at_1pct_fpr'][k] for k in ('online', 'offline', 'global_threshold'))} / "
                 f"{max(cm['found_at_1pct_fpr'][k] for k in ('set_online', 'set_offline'))} of {cm['members_in_set']}"
                 if cm and isinstance(cm.get("found_at_1pct_fpr"), dict) else "-")
        print(f"| {r['recipe']} | {r['auc']:.3f} | {r['tpr_at_1pct_fpr']:.3f} | {r['tpr_at_0.1pct_fpr']:.3f} | "
              f"{r.get('set_auc', float('nan')):.3f} | {r.get('set_tpr_at_1pct_fpr', float('nan')):.3f} | "
              f"{r.get('set_tpr_at_0.1pct_fpr', float('nan')):.3f} | {found} | {r['target_valid_accuracy']:.3f} | "
              f"{r['seconds']:.0f} |")
    if args.plot is not None:
        from plot_privacy_frontier import plot_frontier

        plot_frontier(list(records.values()), args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
