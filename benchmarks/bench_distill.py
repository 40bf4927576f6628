"""Outer-step timing of Histo-DD gradient matching: ConvNet and ResNetAP-10 at 32/64/96 px.

Runs on CPU or GPU (device "auto"); imports only torch/numpy (+ safetensors, tqdm, pyyaml through
histodd_fed), never flwr or openslide. Input: random-texture patches (2 classes), so it needs no
data set. One outer step = U inner steps, each matching every class (real batch ``--batch-real``,
ipc synthetic images) and one model update on real data. Prints a Markdown table; writes JSON.

    .venv/bin/python benchmarks/bench_distill.py results/bench_distill.json --inner-steps 10
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histodd_fed.distill import DistillConfig, run_distillation  # noqa: E402
from histodd_fed.patchset import PatchSet  # noqa: E402


def texture_patches(n_per_class: int, size: int, seed: int = 0) -> PatchSet:
    """Smooth random H&E-like colour fields (pinkish / purplish classes)."""
    rng = np.random.default_rng(seed)
    ims, labels = [], []
    base = {0: np.array([230, 160, 200]), 1: np.array([150, 90, 170])}
    for c in (0, 1):
        low = rng.normal(0, 30, size=(n_per_class, 8, 8, 3))
        up = torch.nn.functional.interpolate(torch.from_numpy(low).permute(0, 3, 1, 2).float(), size=(size, size),
                                             mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
        ims.append(np.clip(base[c] + up + rng.normal(0, 8, size=up.shape), 0, 255).astype(np.uint8))
        labels += [c] * n_per_class
    return PatchSet(images=np.concatenate(ims), labels=np.array(labels), class_names=["a", "b"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json_out", type=Path)
    ap.add_argument("--models", nargs="+", default=["convnet", "resnetap10"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96])
    ap.add_argument("--outer-steps", type=int, default=3, help="timed outer steps (after one warm-up step)")
    ap.add_argument("--inner-steps", type=int, default=10)
    ap.add_argument("--batch-real", type=int, default=128)
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--matching", nargs="+", default=["reference", "fast"],
                    help="matching paths to time on the same data and network (ratio printed when both)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for model in args.models:
      for size in args.sizes:
        for matching in args.matching:
            real = texture_patches(max(args.batch_real, 64), size)
            cfg = DistillConfig(model=model, model_kwargs={}, image_size=size, ipc=args.ipc, matching=matching,
                                outer_steps=args.outer_steps + 1, inner_steps=args.inner_steps,
                                batch_real=args.batch_real, batch_net=args.batch_real, pool_size=1, pool_epochs=0,
                                device=args.device, checkpoint_every=0, lr_img=0.01)
            t0 = time.perf_counter()
            res = run_distillation(real, cfg, work_dir=None, progress=False)
            wall = time.perf_counter() - t0
            secs = [r["seconds"] for r in res.patchset.meta["loss_curve"]]
            step = statistics.median(secs[1:]) if len(secs) > 1 else secs[0]
            row = {"model": model, "image_size": size, "matching": matching, "outer_step_s": round(step, 4),
                   "inner_step_s": round(step / args.inner_steps, 5), "warmup_step_s": round(secs[0], 4),
                   "device": res.patchset.meta["device"], "wall_s": round(wall, 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    dev = rows[0]["device"] if rows else "?"
    name = torch.cuda.get_device_name(0) if dev.startswith("cuda") else platform.processor() or platform.machine()
    print(f"\nHisto-DD outer step (U={args.inner_steps}, 2 classes, batch_real={args.batch_real}, "
          f"ipc={args.ipc}) on {dev} ({name}), torch {torch.__version__}\n")
    print("| model | px | matching | s / outer step | s / inner step | reference / fast |\n|---|---|---|---|---|---|")
    ref = {(r["model"], r["image_size"]): r["outer_step_s"] for r in rows if r["matching"] == "reference"}
    for r in rows:
        key = (r["model"], r["image_size"])
        ratio = f"{ref[key] / r['outer_step_s']:.2f}x" if r["matching"] == "fast" and key in ref else ""
        r["speedup_vs_reference"] = ratio
        print(f"| {r['model']} | {r['image_size']} | {r['matching']} | {r['outer_step_s']:.3f} | "
              f"{r['inner_step_s']:.4f} | {ratio} |")
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({"device": dev, "device_name": name, "torch": torch.__version__,
                                         "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
