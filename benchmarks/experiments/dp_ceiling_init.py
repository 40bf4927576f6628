"""Where the pcam preset's value comes from, and why dm-dp cannot reach it (issue 20, DP item): tuning
split of PCam train (4,000 / class distilled from, 1,000 / class tested; benchmarks/bench_dp_pcam.py's
`load_split("tune")`), one set per row, the preset's evaluation (ConvNet-3 w32, 200 epochs, 3 seeds).
Each row prints one JSON line (records: benchmarks/results/dp_ceiling.jsonl).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/dp_ceiling_init.py p1          # mixtures of 8, no matching
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/dp_ceiling_init.py p2 10       # public tiles picked by a real-data teacher
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/dp_ceiling_init.py p3          # k-means cluster means (10 / class)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/dp_ceiling_init.py p4 noise    # DM (preset) from noise
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/dp_ceiling_init.py p5 64 128   # DM from mixtures of 64 (256 512)

None of these is DP: they bound what a DP set could reach (a DP set cannot start from few real patches).
"""
import sys, json, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
import numpy as np, torch
torch.set_num_threads(1)
from bench_dp_pcam import load_split, evaluate
from histodd_fed.preset import load_preset
from histodd_fed.preprocess import apply_view
from histodd_fed.patchset import PatchSet
from histodd_fed.distill.dm_dp import load_public_patches
from histodd_fed.training.evaluation import build_seeded_model, predict_probs
from histodd_fed.training.trainer import train_classifier
which = sys.argv[1]
preset = load_preset("pcam")
real, test = load_split("tune")
real, test = apply_view(real, preset.view), apply_view(test, preset.view)
def rep(name, ps, extra={}):
    r = evaluate(ps, test, preset, 3); print(json.dumps({"probe": name, **extra, "acc": r["accuracy_mean"], "std": r["accuracy_std"], "auc": r["auc_mean"]}), flush=True)
if which == "p1":
    from histodd_fed.distill.engine import distill
    cfg = preset.distill_config(ipc=10, seed=0, outer_steps=1, lr_img=1e-9, candidates=1, candidate_gate=False)
    res = distill(real, cfg, progress=False)
    rep("mix8_init_only", res)
if which == "p2":
    t0 = time.time()
    m = build_seeded_model("convnet", seed=0, num_classes=2, image_size=32, width=32, depth=3)
    m = train_classifier(m, real, epochs=int(sys.argv[2]) if len(sys.argv) > 2 else 10, lr=0.01, batch_size=128, augmentation="flip_rotate", progress=False).model
    acc = (predict_probs(m, test.images).argmax(1) == test.labels).mean()
    print("teacher acc", acc, time.time() - t0, flush=True)
    pub, names = load_public_patches(str(ROOT.parent / "shared/data/camelyon17-stain-tiles"), 32, 4)
    print("public", pub.shape, flush=True)
    p = predict_probs(m, pub)
    grey = pub.astype(np.float32).mean(-1).std((1, 2)) / 255
    ok = grey > 0.05
    rng = np.random.default_rng(0)
    imgs_single, imgs_mix, labs = [], [], []
    for c in range(2):
        sc = np.where(ok, p[:, c], -1)
        top = np.argsort(-sc)[:256]
        imgs_single.append(pub[top[:10]])
        cs = pub[top].reshape(len(top), -1, 3).mean(1)
        for k in range(10):
            a = rng.choice(top)
            d = ((cs - pub[a].reshape(-1, 3).mean(0)) ** 2).sum(1)
            nn = top[np.argsort(d)[:8]]
            imgs_mix.append(pub[nn].astype(np.float32).mean(0).round().astype(np.uint8))
        labs += [c] * 10
    ps1 = PatchSet(images=np.concatenate(imgs_single), labels=np.array(labs), class_names=real.class_names, kind="synthetic")
    ps2 = PatchSet(images=np.stack(imgs_mix), labels=np.array(labs), class_names=real.class_names, kind="synthetic")
    np.save("/tmp/p2_mix.npy", ps2.images)
    rep("public_top10_teacher", ps1)
    rep("public_mix8_teacher", ps2)
if which == "p3":
    from histodd_fed.distill.initialisation import kmeans_anchors
    rng = np.random.default_rng(0)
    X = real.images.astype(np.float32) / 255
    for feat_name in ("rgb", "4x4"):
        imgs, labs = [], []
        for c in range(2):
            xc = X[real.labels == c]
            if feat_name == "rgb":
                f = xc.reshape(len(xc), -1, 3).mean(1)
            else:
                f = xc.reshape(len(xc), 4, 8, 4, 8, 3).mean((2, 4)).reshape(len(xc), -1)
            # plain k-means
            cent = f[rng.choice(len(f), 10, replace=False)]
            for _ in range(25):
                a = ((f[:, None] - cent[None]) ** 2).sum(-1).argmin(1)
                cent = np.stack([f[a == k].mean(0) if (a == k).any() else cent[k] for k in range(10)])
            for k in range(10):
                imgs.append((xc[a == k].mean(0) * 255).round().astype(np.uint8)); labs.append(c)
        ps = PatchSet(images=np.stack(imgs), labels=np.array(labs), class_names=real.class_names, kind="synthetic")
        np.save(f"/tmp/p3_{feat_name}.npy", ps.images)
        rep(f"cluster_means_{feat_name}", ps)
if which == "p4":
    from histodd_fed.distill.engine import distill
    init = sys.argv[2]
    cfg = preset.distill_config(ipc=10, seed=0, init=init, candidates=1, candidate_gate=False)
    res = distill(real, cfg, progress=False)
    np.save(f"/tmp/p4_{init}.npy", res.images)
    rep(f"dm_engine_init_{init}", res)
if which == "p5":
    from histodd_fed.distill.engine import distill
    mix, pool = int(sys.argv[2]), int(sys.argv[3])
    cfg = preset.distill_config(ipc=10, seed=0, init_mix=mix, init_colour_pool=pool, candidates=1, candidate_gate=False)
    res = distill(real, cfg, progress=False)
    np.save(f"/tmp/p5_{mix}_{pool}.npy", res.images)
    rep(f"dm_engine_mix{mix}_pool{pool}", res)
