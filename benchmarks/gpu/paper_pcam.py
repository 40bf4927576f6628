"""One-shot GPU run of the paper recipe on PCam (issue 22 item 4): engine timing, the paper schedule (or the
largest K that fits a time budget), the paper study's evaluation on ``valid`` and the export gate's verdict.

Run on the lent GPU machine by ``benchmarks/gpu/run_on_device.sh`` (one command, ``carry: [".gpu-data"]``), on
the PCam subset ``benchmarks/gpu/pack_pcam.py`` packed here. Each step is appended, as it finishes, to
``OUT/paper_gpu.json`` (rewritten atomically), so a run killed at its time limit still returns what it did:

a. ``a_device``   torch / CUDA / GPU facts;
b. ``b_timing``   seconds per outer step at the paper settings (configs/study-paper.yaml's distillation for ipc
                  10: ResNetAP-10 w64, 64 px, batch_real 64, per-class updates) with ``--timing-inner-steps`` U
                  (default 10, not the paper's 100: the per-inner-step rate is scaled to U = 100, and step c
                  measures U = 100 itself) for ``matching: reference`` and ``fast``, one warm-up outer step +
                  ``--timing-outer-steps`` timed, a random pool network (pool time is not in these numbers);
                  plus ``fast`` with ``update: joint`` (the batched vmap path; NOT the paper's per-class update,
                  information only). The library has no bf16 autocast / channels_last option: not timed.
c. ``c_distill``  the paper schedule (K 200 x U 100, pool 5 x 2 epochs) with the faster paper-recipe engine,
                  time-boxed: one outer step first (pool + set-up + one U = 100 step), then as many more as the
                  measured rate fits into ``--budget-s`` (resumed from the engine's checkpoint); records K run,
                  the paper's K, seconds per outer step and the extrapolated full-schedule time. The set's
                  initial / synthetic images go to ``OUT/synthetic_grid.png`` and ``OUT/synthetic_set.npz``;
d. ``d_eval``     the paper study's evaluation (configs/study-paper.yaml ``eval:``: ResNet18, 1000 epochs, lr
                  0.01, batch 256, DSA + stain augmentation) on all of ``valid``, one seed at a time (seed s =
                  seed s of the study's 5), as many seeds as the deadline allows; the initial images (random
                  real patches, the set's starting point) are evaluated with the same seeds when time is left;
e. ``e_gate``     the export gate's verdict (``histodd_fed.release.choose.release_verdict``: the full
                  ``check_export`` that ``centre-node export --patches`` runs) against the raw 96 px train
                  subset as the reference. Runs after the first evaluation seed, before the others.

``--smoke`` shrinks everything (20 patches per class, 32 px, ResNetAP-10 w8, 2 outer x 2 inner steps, 2
evaluation epochs, 1 seed) so the whole path runs on a CPU in well under a minute (tests/test_gpu_paper_script.py).
Imports only what the device has (torch, numpy, pyyaml, safetensors, tqdm, pillow, scipy, matplotlib): never
cryptography, flwr, openslide or opacus.

    python3 benchmarks/gpu/paper_pcam.py --data .gpu-data --out $OUT
    .venv/bin/python benchmarks/gpu/paper_pcam.py --data /tmp/tiny --out /tmp/smoke --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

T_START = time.perf_counter()
REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HISTODD_NO_PROGRESS", "1")

log = logging.getLogger("paper_pcam")

#: what ``--smoke`` changes in the distillation config (everything else is the paper preset's)
SMOKE_DISTILL = {"model_kwargs": {"width": 8}, "batch_real": 8, "batch_net": 8, "pool_size": 1, "pool_epochs": 1,
                 "pool_batch": 16, "outer_steps": 2, "inner_steps": 2}
#: ``--smoke`` patch size (the paper's 64 px costs ~4x on a CPU; the path is the same)
SMOKE_PX = 32
PAPER_U = 100
#: real patches per class the engine timing runs on (step b)
TIMING_PER_CLASS = 500


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def elapsed() -> float:
    return time.perf_counter() - T_START


class Record:
    """``OUT/paper_gpu.json``: the run's steps in order, rewritten atomically after every step."""

    def __init__(self, path: Path, header: dict) -> None:
        self.path = path
        self.doc = {**header, "started": now(), "steps": {}, "done": False}
        self.write()

    def step(self, name: str, data: dict) -> dict:
        self.doc["steps"][name] = {**data, "finished": now(), "elapsed_s": round(elapsed(), 2)}
        self.write()
        return self.doc["steps"][name]

    def write(self) -> None:
        from histodd_fed.atomic import atomic_write_text

        atomic_write_text(self.path, json.dumps(self.doc, indent=2, default=str) + "\n")


def error_entry(exc: BaseException) -> dict:
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc().splitlines()[-8:]}


# ------------------------------------------------------------------------------------------------ steps
def device_facts(device: str) -> dict:
    import numpy as np
    import torch

    from histodd_fed.distill.engine import resolve_device

    dev = resolve_device(device)
    facts = {"ok": True, "torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
             "device": str(dev), "cuda_available": torch.cuda.is_available(), "cpu_count": os.cpu_count(),
             "torch_threads": torch.get_num_threads(), "cudnn_benchmark": torch.backends.cudnn.benchmark,
             "cuda": torch.version.cuda}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        facts.update(gpu=torch.cuda.get_device_name(dev), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                     capability=f"{p.major}.{p.minor}")
    else:
        facts["gpu"] = None
    return facts


def load_data(data: Path, preset, smoke: bool, seed: int):
    """(raw train = the gate's reference, study data in the paper preset's view) by the project's loaders:
    ``load_image_folder`` + ``prepare`` = what ``load_patches`` does, without reading the train folder twice."""
    from histodd_fed.patchset import load_image_folder
    from histodd_fed.preprocess import prepare
    from histodd_fed.studies.context import load_study_data

    limit = 20 if smoke else None
    t0 = time.perf_counter()
    raw_train = load_image_folder(data / "train", limit_per_class=limit, seed=seed)
    train = prepare(raw_train, crop=preset.crop_center, size=preset.image_size, where=str(data / "train"))
    test = load_image_folder(data / "valid", limit_per_class=limit, seed=seed + 1)
    test = prepare(test, crop=preset.crop_center, size=preset.image_size, where=str(data / "valid"))
    study = load_study_data(train, test, preset)
    info = {"train": study.train.class_counts(), "valid": study.test.class_counts(),
            "source_px": raw_train.image_size, "image_size": study.train.image_size,
            "view": study.train.meta.get("view"), "load_s": round(time.perf_counter() - t0, 2)}
    pack = data / "pack.json"
    if pack.exists():
        info["pack"] = json.loads(pack.read_text())
    return raw_train, study, info


def time_engines(real, base_cfg, inner: int, outer: int, per_class: int = TIMING_PER_CLASS) -> dict:
    """Seconds per outer step (median of ``outer`` timed steps after one warm-up) of the engines, on a seeded
    subset of ``per_class`` real patches per class (a step samples ``batch_real`` of them whatever their
    number; the subset only shortens each run's set-up: resizing, stain estimation, hashing)."""
    import torch

    from histodd_fed.distill import run_distillation
    from histodd_fed.training.data import limit_per_class

    real = limit_per_class(real, per_class, seed=0)

    variants = [("reference", {"matching": "reference"}, True), ("fast", {"matching": "fast"}, True),
                ("fast_joint", {"matching": "fast", "update": "joint"}, False)]
    rows = []
    for name, over, paper in variants:
        cfg = dataclasses.replace(base_cfg, outer_steps=outer + 1, inner_steps=inner, pool_size=1, pool_epochs=0,
                                  checkpoint_every=0, **over)
        row = {"engine": name, "matching": cfg.matching, "update": cfg.update, "paper_recipe": paper}
        try:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            res = run_distillation(real, cfg, work_dir=None, progress=False)
            secs = [r["seconds"] for r in res.patchset.meta["loss_curve"]]
            step = statistics.median(secs[1:]) if len(secs) > 1 else secs[0]
            row.update(ok=True, inner_steps=inner, warmup_outer_s=secs[0], timed_outer_s=secs[1:],
                       outer_s=round(step, 4), inner_s=round(step / inner, 5),
                       outer_s_at_paper_u=round(step / inner * PAPER_U, 3),
                       run_wall_s=round(time.perf_counter() - t0, 2))
            if torch.cuda.is_available():
                row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        except Exception as exc:  # noqa: BLE001 - one engine failing must not cost the lease
            row.update(error_entry(exc))
        rows.append(row)
        log.info("timing %s: %s", name, {k: row.get(k) for k in ("outer_s", "inner_s", "error")})
    ok = [r for r in rows if r.get("ok") and r["paper_recipe"]]
    fastest = min(ok, key=lambda r: r["outer_s"]) if ok else None
    ref = next((r for r in rows if r["engine"] == "reference" and r.get("ok")), None)
    for r in rows:
        if ref and r.get("ok"):
            r["speedup_vs_reference"] = round(ref["outer_s"] / r["outer_s"], 3)
    return {"ok": bool(ok), "rows": rows, "real_per_class": real.class_counts(), "faster_paper_engine": None if fastest is None else fastest["engine"],
            "note": (f"U = {inner} inner steps per timed outer step (not the paper's {PAPER_U}); outer_s_at_paper_u "
                     f"= inner_s x {PAPER_U}. With update: per_class (the paper's) both matching settings run the "
                     "same per-class loop (GradientMatching.per_class_steps); fast_joint is the batched vmap path "
                     "with one joint image step, not the paper's update. bf16 autocast / channels_last: no "
                     "library option, not timed. Pool: one random network (no pool training in these numbers).")}


def distill_boxed(real, cfg, budget_s: float, work: Path) -> tuple[dict, object]:
    """The paper schedule ``cfg`` time-boxed to ``budget_s`` seconds (pool, set-up and steps included):
    one outer step, then as many as the measured rate fits, resumed from the engine's checkpoint."""
    from histodd_fed.distill import run_distillation

    t0 = time.perf_counter()
    calls, res = [], None
    k_paper = cfg.outer_steps
    n = 1
    pool_s = None
    while True:
        tc = time.perf_counter()
        res = run_distillation(real, cfg, work_dir=work, progress=False, stop_after_steps=n)
        meta = res.patchset.meta
        wall = time.perf_counter() - tc
        t = meta["timings"]
        calls.append({"outer_steps": t["outer_steps_this_call"], "wall_s": round(wall, 2), "pool_s": t["pool_s"],
                      "stains_s": t["stains_s"], "matching_s": t["matching_s"]})
        if pool_s is None:
            pool_s = t["pool_s"]
        if meta["complete"]:
            break
        steps = [r["seconds"] for r in meta["loss_curve"]]
        rate = statistics.median(steps[1:]) if len(steps) > 1 else steps[0]   # step 0 carries the warm-up
        setup = max(0.0, wall - t["matching_s"] - t["pool_s"])                 # a resumed call's set-up
        left = budget_s - (time.perf_counter() - t0)
        n = min(k_paper - meta["steps_done"], int((left - setup) // (rate * 1.05)))
        log.info("distill: %d/%d outer steps, %.2f s per step, %.0f s of the budget left: %d more",
                 meta["steps_done"], k_paper, rate, left, max(n, 0))
        if n < 1:
            break
    meta = res.patchset.meta
    steps = [r["seconds"] for r in meta["loss_curve"]]
    step_s = statistics.median(steps[1:]) if len(steps) > 1 else steps[0]
    setup_first = calls[0]["wall_s"] - calls[0]["matching_s"] - calls[0]["pool_s"]
    full = pool_s + setup_first + k_paper * step_s
    out = {"ok": True, "k_run": meta["steps_done"], "k_paper": k_paper, "u": cfg.inner_steps,
           "complete": meta["complete"], "matching": cfg.matching, "update": cfg.update,
           "budget_s": budget_s, "wall_s": round(time.perf_counter() - t0, 2), "pool_s": pool_s,
           "setup_first_call_s": round(setup_first, 2), "outer_step_s_median": round(step_s, 4),
           "outer_step_s_first": steps[0], "inner_step_s": round(step_s / cfg.inner_steps, 5),
           "full_schedule_s_extrapolated": round(full, 1),
           "full_schedule_min_extrapolated": round(full / 60, 2),
           "goal_full_schedule_le_600_s": bool(full <= 600),
           "calls": calls, "lr_img_effective": meta.get("lr_img_effective"), "drift": meta.get("drift"),
           "loss_curve": [{k: r[k] for k in ("step", "mean", "seconds")} for r in meta["loss_curve"]],
           "config": cfg.to_dict()}
    return out, res


def evaluate_one(ps, test, ev, seed: int, device: str, epochs: int) -> dict:
    """One seed of the paper study's evaluation (``StudyRun.evaluate`` with seeds [seed])."""
    from histodd_fed.training.evaluation import evaluate_sets

    t0 = time.perf_counter()
    r = evaluate_sets({"set": ps}, test, ev.arch, [seed], epochs, lr=ev.lr, batch_size=ev.batch_size,
                      augmentation=ev.augmentation, arch_kwargs=ev.arch_kwargs, device=device, progress=False)["set"]
    m = r.runs[0]
    return {"seed": seed, "accuracy": m.accuracy, "balanced_accuracy": m.balanced_accuracy, "auc": m.auc,
            "n_test": m.n, "epoch_s": r.epoch_seconds[0], "wall_s": round(time.perf_counter() - t0, 2)}


def summarise(runs: list[dict]) -> dict:
    out = {"seeds": [r["seed"] for r in runs]}
    for k in ("accuracy", "balanced_accuracy", "auc"):
        v = [r[k] for r in runs if not math.isnan(r[k])]
        out[f"{k}_mean"] = statistics.fmean(v) if v else math.nan
        out[f"{k}_std"] = statistics.pstdev(v) if len(v) > 1 else 0.0
    return out


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=REPO / ".gpu-data", help="folder pack_pcam.py wrote")
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                    help="output folder (default $OUT)")
    ap.add_argument("--budget-s", type=float, default=330.0,
                    help="seconds for the distillation (pool, set-up and outer steps)")
    ap.add_argument("--deadline-s", type=float, default=500.0,
                    help="the whole script ends its work by then (evaluation seeds stop adding)")
    ap.add_argument("--reserve-s", type=float, default=120.0,
                    help="seconds kept after the distillation for the first evaluation seed and the gate")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--timing-inner-steps", type=int, default=10)
    ap.add_argument("--timing-outer-steps", type=int, default=2, help="timed outer steps after one warm-up")
    ap.add_argument("--eval-seeds", type=int, default=None, help="at most this many (default: the preset's 5)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU-sized run of the whole path (tests)")
    args = ap.parse_args(argv)
    if args.out is None:
        ap.error("--out is required when $OUT is not set")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.timing_inner_steps, args.timing_outer_steps = 2, 1
    rec = Record(args.out / "paper_gpu.json",
                 {"script": "benchmarks/gpu/paper_pcam.py", "issue": "22 item 4", "smoke": args.smoke,
                  "args": {k: str(v) for k, v in vars(args).items()}})
    failed = []

    def run_step(name: str, fn):
        log.info("step %s (%.0f s elapsed)", name, elapsed())
        try:
            data = fn()
        except Exception as exc:  # noqa: BLE001 - record it, go on with what can still run
            log.exception("step %s failed", name)
            failed.append(name)
            rec.step(name, error_entry(exc))
            return None
        rec.step(name, data)
        return data

    # a. device
    run_step("a_device", lambda: device_facts(args.device))

    # data + the paper preset (configs/study-paper.yaml, its distillation = configs/distill-paper.yaml)
    from histodd_fed.studies.presets import load_preset
    from histodd_fed.studies.training_sets import distill_config

    preset = load_preset("paper", device=args.device, image_size=SMOKE_PX if args.smoke else None)
    cfg = distill_config(preset, args.ipc)
    if args.smoke:
        cfg = dataclasses.replace(cfg, **SMOKE_DISTILL)
    ev = preset.eval
    epochs = 2 if args.smoke else ev.epochs
    n_seeds = args.eval_seeds or (1 if args.smoke else ev.seeds)
    box: dict = {}

    def step_data():
        box["raw"], box["study"], info = load_data(args.data, preset, args.smoke, preset.seed)
        return {"ok": True, **info, "distill_config": {k: getattr(cfg, k) for k in (
            "model", "model_kwargs", "image_size", "ipc", "outer_steps", "inner_steps", "batch_real", "batch_net",
            "pool_size", "pool_epochs", "update", "dsa_mode", "augmentation", "input_norm", "distance")},
            "eval": {**dataclasses.asdict(ev), "epochs_used": epochs, "seeds_max": n_seeds}}

    if run_step("data", step_data) is None:
        rec.doc["done"] = True
        rec.write()
        return 1
    study = box["study"]

    # b. engine timing
    timing = run_step("b_timing", lambda: time_engines(study.train, cfg, args.timing_inner_steps,
                                                      args.timing_outer_steps))
    engine = (timing or {}).get("faster_paper_engine") or cfg.matching

    # c. the distillation
    def step_distill():
        budget = min(args.budget_s, args.deadline_s - elapsed() - args.reserve_s)
        if budget <= 0:
            raise RuntimeError(f"no time left for the distillation ({elapsed():.0f} s elapsed)")
        with tempfile.TemporaryDirectory(prefix="paper-gpu-") as work:   # pool cache + checkpoints
            out, res = distill_boxed(study.train, dataclasses.replace(cfg, matching=engine), budget, Path(work))
        out["budget_s_requested"] = args.budget_s
        out["engine_from_timing"] = timing is not None
        box["res"] = res
        try:
            import numpy as np

            from histodd_fed.distill.plots import save_grid

            ps = res.patchset
            save_grid(res.initial_images, ps.images, ps.labels, ps.class_names, args.out / "synthetic_grid.png")
            np.savez_compressed(args.out / "synthetic_set.npz", images=ps.images, labels=ps.labels,
                                initial=res.initial_images, class_names=np.array(ps.class_names))
            out["files"] = ["synthetic_grid.png", "synthetic_set.npz"]
        except Exception as exc:  # noqa: BLE001 - the figure must not cost the run
            out["files_error"] = f"{type(exc).__name__}: {exc}"
        try:
            import torch

            if torch.cuda.is_available():
                out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        except Exception:  # noqa: BLE001
            pass
        return out

    dist = run_step("c_distill", step_distill)

    # d + e. evaluation seed 0, the gate, then more seeds (and the initial images) while the deadline allows
    if dist is not None:
        from histodd_fed.patchset import PatchSet

        res = box["res"]
        syn = res.patchset
        initial = PatchSet(images=res.initial_images, labels=syn.labels.copy(), class_names=list(syn.class_names),
                           kind="real", meta={"view": syn.meta.get("view")})
        evals: dict = {"synthetic": [], "initial": []}
        note = (f"{ev.arch}, {epochs} epochs, lr {ev.lr}, batch {ev.batch_size}, augmentation {ev.augmentation} "
                f"(configs/study-paper.yaml eval:), on all of valid; seed s = the study's seed s; up to {n_seeds} "
                "seeds while --deadline-s allows; 'initial' = the set's starting images (random real patches)")

        def eval_record() -> dict:
            d = {"ok": bool(evals["synthetic"]), "protocol": note, "seeds_planned": n_seeds, **evals,
                 "synthetic_summary": summarise(evals["synthetic"]) if evals["synthetic"] else None,
                 "initial_summary": summarise(evals["initial"]) if evals["initial"] else None}
            if len(evals["synthetic"]) < n_seeds:
                d["note"] = f"{len(evals['synthetic'])} of {n_seeds} seeds fitted the deadline"
            return d

        def eval_seed(kind: str, ps, s: int) -> None:
            r = evaluate_one(ps, study.test, ev, s, args.device, epochs)
            evals[kind].append(r)
            log.info("eval %s seed %d: acc %.4f (%.0f s)", kind, s, r["accuracy"], r["wall_s"])
            rec.step("d_eval", eval_record())

        def step_gate():
            from histodd_fed.release.choose import release_verdict

            t0 = time.perf_counter()
            v = release_verdict(syn, box["raw"])
            return {"ok": True, "passed": bool(v["passed"]), "reasons": v["reasons"], "message": v["message"],
                    "copies": v["copies"], "views": v["views"], "seconds": round(time.perf_counter() - t0, 2),
                    "reference": {"patches": len(box["raw"]), "px": box["raw"].image_size,
                                  "counts": box["raw"].class_counts(),
                                  "what": "the raw packed train subset, as `centre-node export --patches` loads it"}}

        seed_s = None
        try:
            t0 = time.perf_counter()
            eval_seed("synthetic", syn, 0)
            seed_s = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001
            log.exception("evaluation failed")
            failed.append("d_eval")
            rec.step("d_eval", error_entry(exc))
        run_step("e_gate", step_gate)
        if seed_s is not None:
            plan = [("initial", initial, 0)] + [(k, p, s) for s in range(1, n_seeds)
                                                for k, p in (("synthetic", syn), ("initial", initial))]
            for kind, ps, s in plan:
                if args.deadline_s - elapsed() < 1.15 * seed_s + 5:
                    log.info("deadline: %s seed %d left out", kind, s)
                    continue
                try:
                    eval_seed(kind, ps, s)
                except Exception as exc:  # noqa: BLE001
                    log.exception("evaluation %s seed %d failed", kind, s)
                    rec.doc["steps"].setdefault("d_eval", {}).setdefault("errors", []).append(
                        f"{kind} seed {s}: {type(exc).__name__}: {exc}")
                    rec.write()
    rec.doc["done"] = True
    rec.doc["failed_steps"] = failed
    rec.doc["total_s"] = round(elapsed(), 2)
    rec.write()
    s = rec.doc["steps"]
    d, g = s.get("c_distill") or {}, s.get("e_gate") or {}
    e = (s.get("d_eval") or {}).get("synthetic_summary") or {}
    print(json.dumps({"device": (s.get("a_device") or {}).get("gpu") or (s.get("a_device") or {}).get("device"),
                      "faster_engine": (timing or {}).get("faster_paper_engine"),
                      "k_run": d.get("k_run"), "k_paper": d.get("k_paper"),
                      "outer_step_s": d.get("outer_step_s_median"),
                      "full_schedule_min": d.get("full_schedule_min_extrapolated"),
                      "accuracy_mean": e.get("accuracy_mean"), "eval_seeds": e.get("seeds"),
                      "gate_passed": g.get("passed"), "failed": failed, "total_s": rec.doc["total_s"]}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
