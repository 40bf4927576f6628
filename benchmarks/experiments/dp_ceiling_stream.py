"""Streaming DP distribution matching (a fresh random ConvNet-3 per step, a Poisson subsample of each
class, per-patch clipped flattened block maps, Gaussian noise, Opacus PRV accounting over the steps),
from noise: a probe of whether more queries fix dm-dp (issue 20, DP item). Tuning split as in
dp_ceiling_init.py; prints one JSON line per run (records: benchmarks/results/dp_ceiling.jsonl). The clip is
a quantile of 256 real patches' norms - a probe only, not a DP release.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/dp_ceiling_stream.py eps=inf
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/dp_ceiling_stream.py eps=1
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/dp_ceiling_stream.py eps=inf T=1500 lr=5
"""
import sys, json, time, math, warnings
from pathlib import Path
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
import numpy as np, torch
torch.set_num_threads(1)
from bench_dp_pcam import load_split, evaluate
from histodd_fed.preset import load_preset
from histodd_fed.preprocess import apply_view
from histodd_fed.patchset import PatchSet
from histodd_fed.augment import build_augmentation
from histodd_fed.distill.dm_dp import embed, clip_rows
from histodd_fed.distill.pool import build_model
args = dict(a.split("=") for a in sys.argv[1:])
eps = float(args.get("eps", "1")); T = int(args.get("T", "400")); bs = int(args.get("bs", "128"))
lr = float(args.get("lr", "1")); pool = int(args.get("pool", "0")); init = args.get("init", "noise")
clipq = float(args.get("clipq", "0.5")); seed = int(args.get("seed", "0")); layers = args.get("layers", "all")
preset = load_preset("pcam")
real, test = load_split("tune")
real, test = apply_view(real, preset.view), apply_view(test, preset.view)
cfg = preset.distill_config(ipc=10, seed=seed, candidates=1)
x_real, y_real = real.to_tensors()
k, ipc = 2, 10
n_c = [(y_real == c).sum().item() for c in range(k)]
q = bs / min(n_c)
aug = build_augmentation(cfg.augmentation)
def net_at(t):
    torch.manual_seed(seed * 100003 + t)
    n = build_model(cfg, k).eval()
    for p in n.parameters(): p.requires_grad_(False)
    return n
# clip: quantile of norms on 256 images under net 0 (prototype only)
with torch.no_grad():
    e0 = embed([net_at(0)], aug(x_real[:256], torch.Generator().manual_seed(1)), layers, pool)
C = float(e0.norm(dim=1).quantile(clipq))
cs = 0.25 * C
if math.isinf(eps):
    sigma = 0.0
else:
    from opacus.accountants.utils import get_noise_multiplier
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sigma = float(get_noise_multiplier(target_epsilon=eps, target_delta=1e-5, sample_rate=q, steps=T, accountant="prv", epsilon_tolerance=0.01))
sens = math.sqrt(C**2 + cs**2)
print(json.dumps({"C": C, "q": q, "sigma": sigma, "dim": e0.shape[1]}), flush=True)
sec = torch.Generator().manual_seed(12345)
gen = torch.Generator().manual_seed(seed)
if init == "noise":
    x0 = torch.rand((k * ipc, 3, 32, 32), generator=gen)
elif init == "grey":
    x0 = 0.5 + 0.1 * torch.randn((k * ipc, 3, 32, 32), generator=gen)
x_syn = x0.clone().requires_grad_(True)
opt = torch.optim.SGD([x_syn], lr=lr, momentum=0.5)
t0 = time.time()
for t in range(T):
    net = net_at(t)
    with torch.no_grad():
        m = torch.rand(len(x_real), generator=sec) < q
        xb, yb = x_real[m], y_real[m]
        e = clip_rows(embed([net], aug(xb, sec), layers, pool), C)
        sums = torch.zeros(k, e.shape[1]).index_add_(0, yb, e)
        cnt = torch.bincount(yb, minlength=k).float()
        sums += sigma * sens * torch.randn(sums.shape, generator=sec)
        cnt = (cs * cnt + sigma * sens * torch.randn(k, generator=sec)) / cs
        tgt = sums / cnt.clamp_min(1.0)[:, None]
    es = clip_rows(embed([net], aug(x_syn, gen), layers, pool), C).reshape(k, ipc, -1).mean(1)
    loss = (es - tgt).pow(2).sum()
    opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad(): x_syn.clamp_(0, 1)
    if t % 100 == 0: print(t, float(loss.detach()), round(time.time() - t0), flush=True)
out = (x_syn.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
ps = PatchSet(images=out, labels=np.repeat(np.arange(k), ipc), class_names=real.class_names, kind="synthetic")
tag = "_".join(f"{a}{b}" for a, b in sorted(args.items()))
np.save(f"/tmp/stream_{tag}.npy", out)
r = evaluate(ps, test, preset, 3)
print(json.dumps({"probe": "stream", **args, "sigma": sigma, "acc": r["accuracy_mean"], "std": r["accuracy_std"], "auc": r["auc_mean"], "s": round(time.time() - t0)}), flush=True)
