"""The copy detector on PCam: every disguised copy flagged? how often are real held-out patches flagged? how fast?

One run measures, against the centre's real patches (PCam `train`, 10,000 raw 96-px patches):

1. attacks: 20 real patches per attack of histodd_fed.privacy.copy_attacks (dihedral transforms, shifts
   inside the raw patch, colour changes, re-staining, blur / noise / JPEG, mixtures of 2-4), in the
   pcam preset's view (centre crop 32) and in the resize-only view; flagged count out of 20;
2. false flags: real held-out patches (PCam `valid`, other slides) audited as if they were synthetic:
   the R^2 distribution and the share flagged (per image, and for sets of 20);
3. distilled sets given with --sets (the shipped recipe's): R^2 per set and whether any image is flagged;
4. seconds for 20 images against all real patches in both views.

    .venv/bin/python benchmarks/bench_copy_detector.py --real ../shared/data/pcam-ai4all/train \
        --heldout ../shared/data/pcam-ai4all/valid --n-heldout 400 --out benchmarks/results/copy_detector.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from histodd_fed.atomic import atomic_write_json
from histodd_fed.patchset import PatchSet, load_image_folder
from histodd_fed.preprocess import ViewSpec, apply_view_images, audit_views, recorded_view
from histodd_fed.privacy.copies import CopyDetectorConfig, detect_copies
from histodd_fed.privacy.copy_attacks import ATTACKS, make_attack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", required=True, type=Path)
    ap.add_argument("--heldout", type=Path)
    ap.add_argument("--n-heldout", type=int, default=400)
    ap.add_argument("--n-attack", type=int, default=20)
    ap.add_argument("--attacks", default="all")
    ap.add_argument("--sets", default="", help="comma-separated synthetic set directories")
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/copy_detector.json"))
    a = ap.parse_args()
    cfg = CopyDetectorConfig() if a.threshold is None else CopyDetectorConfig(threshold=a.threshold)
    t = time.perf_counter()
    real = load_image_folder(a.real)
    load_s = time.perf_counter() - t
    crop, rs = ViewSpec.centre_crop(real.image_size, 32), ViewSpec.resize(real.image_size, 32)
    views = audit_views(crop, real.image_size, 32)
    rng = np.random.default_rng(a.seed)
    out: dict = {"config": cfg.__dict__, "n_real": len(real), "load_seconds": round(load_s, 1), "attacks": [],
                 "heldout": None, "sets": []}
    names_all = list(ATTACKS) if a.attacks == "all" else [n for n in a.attacks.split(",") if n and n != "none"]
    for view_name, view in (("crop 32", crop), ("resize 32", rs)):
        # every attack's images in one set per view (the detector looks at each image on its own)
        images, truth, names = [], [], []
        for name in names_all:
            if view_name == "resize 32" and name.startswith("shift"):
                continue          # a resize-only view covers the whole raw patch: no room to move inside it
            k = int(name.split()[-1]) if name.startswith("mixture") else 1
            idx = rng.choice(len(real), a.n_attack * k, replace=False)
            imgs, src = make_attack(name, real.images[idx], view, seed=a.seed)
            images.append(imgs)
            truth += [{int(idx[j]) for j in s_} for s_ in src]
            names += [name] * len(imgs)
        if not images:
            continue
        t = time.perf_counter()
        rep = detect_copies(np.concatenate(images), real.images, views, cfg)
        sec = time.perf_counter() - t
        flat = real.images.reshape(len(real), -1)
        for name in dict.fromkeys(names):
            rows = [(f, tr) for f, n, tr in zip(rep.findings, names, truth) if n == name]
            # a source counts as true when it is a true source or a byte-identical copy of one (PCam holds duplicates)
            def hit(f, tr):
                return any(np.array_equal(flat[s_], flat[t_]) for s_ in f.sources for t_ in tr)
            row = {"attack": name, "view": view_name, "n": len(rows), "flagged": sum(f.flagged for f, _ in rows),
                   "flagged_with_true_source": sum(f.flagged and hit(f, tr) for f, tr in rows),
                   "bland": sum(f.kind == "bland" for f, _ in rows), "min_r2": round(min(f.r2 for f, _ in rows), 4)}
            out["attacks"].append(row)
            print(json.dumps(row), flush=True)
        out.setdefault("attack_seconds", {})[view_name] = {"images": len(names), "seconds": round(sec, 1)}
    # speed: 20 images (the first 20 attack images of the last view) against every real patch, both views
    if a.n_attack:
        t = time.perf_counter()
        imgs20, _ = make_attack("rot90", real.images[rng.choice(len(real), 20, replace=False)], crop, seed=a.seed)
        detect_copies(imgs20, real.images, views, cfg)
        out["speed_20_images_s"] = round(time.perf_counter() - t, 1)
        print(json.dumps({"speed_20_images_s": out["speed_20_images_s"], "n_real": len(real)}), flush=True)
    if a.heldout is not None:
        held = load_image_folder(a.heldout, limit_per_class=a.n_heldout // 2, seed=a.seed)
        r2s, flagged, bland = [], 0, 0
        t = time.perf_counter()
        for view in (crop, rs):
            imgs = apply_view_images(held.images, view)
            rep = detect_copies(imgs, real.images, views, cfg)
            r2s += [f.r2 for f in rep.findings if f.kind != "bland"]
            flagged += len(rep.flagged)
            bland += sum(f.kind == "bland" for f in rep.findings)
        n = 2 * len(held)
        p = flagged / n
        out["heldout"] = {"n": n, "flagged": flagged, "bland": bland, "per_image_rate": round(p, 5),
                          "set_of_20_rate": round(1 - (1 - p) ** 20, 4),
                          "r2_p50": round(float(np.percentile(r2s, 50)), 4), "r2_p99": round(float(np.percentile(r2s, 99)), 4),
                          "r2_max": round(float(np.max(r2s)), 4), "seconds": round(time.perf_counter() - t, 1)}
        print(json.dumps(out["heldout"]), flush=True)
    for s in [x for x in a.sets.split(",") if x]:
        ps = PatchSet.load(s)
        v = recorded_view(ps)
        t = time.perf_counter()
        rep = detect_copies(ps.images, real.images, audit_views(v, real.image_size, ps.image_size), cfg)
        row = {"set": Path(s).name, "method": ps.meta.get("method"), "n": len(ps), "flagged": len(rep.flagged),
               "max_r2": rep.summary()["max_r2"], "median_r2": rep.summary()["median_r2"],
               "seconds": round(time.perf_counter() - t, 1)}
        out["sets"].append(row)
        print(json.dumps(row), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(a.out, out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
