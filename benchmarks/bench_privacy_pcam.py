"""Privacy audit on PCam: Random, Herding, Histo-DD (init real / init noise) at 10 images per class.

The centre's data: 500 patches per class of ``pcam-ai4all/train`` at 32 px (members); the
holdout: 250 per class of ``pcam-ai4all/valid`` (non-members). Every set is audited with
``configs/privacy.yaml`` (one shared encoder, trained once) and the export gate is run on each.

    timeout 900 .venv/bin/python benchmarks/bench_privacy_pcam.py --out runs/privacy-pcam

Writes per-set reports (``audit-NAME/audit.md`` ...), the sets themselves, ``summary.json`` and
``summary.md`` (the table of docs/notes/2026-11-privacy-audit-pcam.md), and ``run_config.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "pcam-ai4all"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/privacy-pcam"))
    ap.add_argument("--per-class", type=int, default=500)
    ap.add_argument("--holdout-per-class", type=int, default=250)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sets", default="random,herding,histodd-real,histodd-noise",
                    help="comma-separated, of: random, herding, histodd-real, histodd-noise, histodd-real-lowlr")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from histodd_fed.coreset.builders import build_coreset
    from histodd_fed.distill import DistillConfig, distill
    from histodd_fed.patchset import load_image_folder
    from histodd_fed.privacy.audit import AuditConfig, run_audit
    from histodd_fed.privacy.classifier import train_model
    from histodd_fed.privacy.gate import PrivacyRiskError, check_export
    from histodd_fed.runconfig import write_run_config

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    write_run_config(out, "benchmarks/bench_privacy_pcam.py", vars(args))
    times: dict[str, float] = {}
    t = time.perf_counter()
    real = load_image_folder(DATA / "train", size=32, limit_per_class=args.per_class, seed=args.seed)
    hold = load_image_folder(DATA / "valid", size=32, limit_per_class=args.holdout_per_class, seed=args.seed)
    real.save(out / "real")
    hold.save(out / "holdout")
    times["load"] = time.perf_counter() - t

    cfg = AuditConfig.from_yaml(REPO / "configs" / "privacy.yaml", seed=args.seed)
    t = time.perf_counter()
    encoder = train_model(cfg.memorisation.encoder, real, seed=args.seed, desc="encoder")
    times["encoder"] = time.perf_counter() - t

    builders = {
        "random": lambda: build_coreset(real, method="random", ipc=args.ipc, seed=args.seed),
        "herding": lambda: build_coreset(real, method="herding", ipc=args.ipc, seed=args.seed, arch="convnet",
                                         arch_kwargs={"width": 32}, feature_epochs=2),
        "histodd-real": lambda: distill(real, DistillConfig.from_yaml(REPO / "configs" / "distill-cpu.yaml", ipc=args.ipc,
                                                                      init="real", seed=args.seed), out / "distill-work"),
        "histodd-noise": lambda: distill(real, DistillConfig.from_yaml(REPO / "configs" / "distill-cpu.yaml", ipc=args.ipc,
                                                                       init="noise", seed=args.seed), out / "distill-work"),
        # Histo-DD from real patches with a 10x smaller image learning rate than distill-cpu.yaml's
        # (0.01) and 5 steps: images stay near their starting patches - a lightly edited copy the
        # gate should catch.
        "histodd-real-lowlr": lambda: distill(real, DistillConfig.from_yaml(
            REPO / "configs" / "distill-cpu.yaml", ipc=args.ipc, init="real", seed=args.seed, lr_img=0.001, outer_steps=5),
            out / "distill-work"),
    }
    rows = {}
    for name in args.sets.split(","):
        t = time.perf_counter()
        ps = builders[name]()
        times[f"build {name}"] = time.perf_counter() - t
        ps.save(out / "sets" / name)
        t = time.perf_counter()
        rep = run_audit(ps, real, hold, cfg, out_dir=out / f"audit-{name}", encoder=encoder,
                        paths={"synthetic": str(out / "sets" / name), "real": str(out / "real"),
                               "holdout": str(out / "holdout")})
        times[f"audit {name}"] = time.perf_counter() - t
        s = rep.summary()
        gate = ("blocked: " + "; ".join(rep.risks)) if rep.risks else "passes"  # the gate applies these same rules
        rows[name] = {"summary": s, "gate": gate, "complete": ps.meta.get("complete", True)}
        print(f"{name}: max SSIM {s['ssim']['closest']:.3f} min L2 {s['l2']['closest']:.4f} "
              f"AUC {s['membership']['max_auc'] if s['membership'] else None} -> {gate}", flush=True)

    # The export gate end to end on the random coreset (memorisation rules only: no holdout given).
    t = time.perf_counter()
    if "random" in rows:
        try:
            check_export(builders["random"](), real, cfg, accept_risk=False)
            rows["random"]["check_export"] = "passed"
        except PrivacyRiskError as exc:
            rows["random"]["check_export"] = f"PrivacyRiskError: {exc}"
    times["gate random"] = time.perf_counter() - t
    (out / "summary.json").write_text(json.dumps({"rows": rows, "seconds": times}, indent=2) + "\n")
    lines = ["| set | max SSIM (pair) | real-real SSIM, closest 1% | min L2 | real-real L2 p1 | below L2 p1 | below L2 p5 | "
             "min cosine | below cos p1 | attack AUC (loss / conf) | TPR@1% FPR | gate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        s = r["summary"]
        m = s["membership"]
        lines.append(
            f"| {name} | {s['ssim']['closest']:.3f} ({s['ssim']['closest_pair'][0]}, {s['ssim']['closest_pair'][1]}) | "
            f"{s['ssim']['real_real_p1']:.3f} | {s['l2']['closest']:.4f} | {s['l2']['real_real_p1']:.4f} | "
            f"{s['l2']['fraction_below_p1']:.2f} | {s['l2']['fraction_below_p5']:.2f} | {s['cosine']['closest']:.4f} | "
            f"{s['cosine']['fraction_below_p1']:.2f} | {m['loss']['auc']:.3f} / {m['confidence']['auc']:.3f} | "
            f"{m['loss']['tpr_at_fpr_1%']:.3f} | {'BLOCKED' if s['flagged'] else 'passes'} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
