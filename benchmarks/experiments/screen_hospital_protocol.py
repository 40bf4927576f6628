"""Which target fine-tuning protocol lets "+ Full" show a gain (issue 23, item 1), chosen WITHOUT any
target's test set: a tuning pair made only of PCam `train` data.

Tuning pair: source = H0's source train patches (2,000, H0 stains); tuning target = H3's SOURCE train
patches (2,000 PCam `train` patches re-stained to H3, never a reported target's test set): 50 / class
drawn (seeded) as the target's own labelled data, the other 1,900 as its test set. Each arm pre-trains
the target's classifier on its own 100 patches as the centre does (resnet18, 32 px centre crop), then
fine-tunes it "alone" (own data) and "+ Full" (own + all 2,000 source patches, union protocol) and,
when an ipc-10 set of H0 is given, "+ ipc 10". One JSON line per (arm, seed):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/screen_hospital_protocol.py CENTRES [IPC10_SET] \
        --arms base,lr10,lr10_aug,lr10_long,pre30_lr10 --seeds 0,1,2 >> benchmarks/results/hospital_protocol_screen.jsonl

Arms (pre-train epochs / lr; fine-tune epochs / lr / received share / augmentation):
    base        3 / 1e-2; 15 / 5e-4 / 0.8 / none       (pcam-c17-hospitals today, its longest select_grid row)
    lr10        3 / 1e-2; 15 / 5e-3 / 0.8 / none
    lr10_aug    3 / 1e-2; 15 / 5e-3 / 0.8 / flip_rotate
    lr10_long   3 / 1e-2; 40 / 5e-3 / 0.8 / flip_rotate
    pre30_lr10  30 / 1e-2; 15 / 5e-3 / 0.8 / flip_rotate
    lr20_s95    3 / 1e-2; 15 / 1e-2 / 0.95 / flip_rotate
    r_s95_lr20_e5 / r_s95_lr10_e5 / r_s95_lr20_e15   3 / 1e-2; 5 / 1e-2 (5e-3, 1e-2 x 15 epochs) / 0.95 / none
    cn          ConvNet-3 w32 (the pcam evaluation net), pre-trained 100 / 1e-2 flip_rotate; 30 / 1e-2 / 0.8 / flip_rotate
    cn_s95      the same, share 0.95
    cn_ft3      the same, fine-tune lr 3e-3
    cn_sj       cn with stain jitter (stainjitter_flip_rotate) in pre-training and fine-tuning
    cn_long     cn, 100 fine-tuning epochs at share 0.95
    cn_norm, cn_long_norm   cn / cn_long with every received set Macenko-mapped into the target's colours
(resnet18 arms pre-train without augmentation, as the centre does)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from histodd_fed.federation.fine_tuning import mixed_training_set  # noqa: E402
from histodd_fed.patchset import PatchSet  # noqa: E402
from histodd_fed.preprocess import prepare, resize_to  # noqa: E402
from histodd_fed.training import build_seeded_model, fine_tune, train_classifier  # noqa: E402
from histodd_fed.training.metrics import binary_auc  # noqa: E402
from histodd_fed.training.evaluation import predict_probs  # noqa: E402

RESNET = ("resnet18", {"small_stem": False})
CONVNET = ("convnet", {"width": 32, "depth": 3})   # the pcam preset's evaluation network
ARMS = {  # name: (network, pre_epochs, pre_lr, ft_epochs, ft_lr, share, augmentation)
    "base": (RESNET, 3, 1e-2, 15, 5e-4, 0.8, None),
    "lr10": (RESNET, 3, 1e-2, 15, 5e-3, 0.8, None),
    "lr10_aug": (RESNET, 3, 1e-2, 15, 5e-3, 0.8, "flip_rotate"),
    "lr10_long": (RESNET, 3, 1e-2, 40, 5e-3, 0.8, "flip_rotate"),
    "pre30_lr10": (RESNET, 30, 1e-2, 15, 5e-3, 0.8, "flip_rotate"),
    "lr20_s95": (RESNET, 3, 1e-2, 15, 1e-2, 0.95, "flip_rotate"),
    "r_s95_lr20_e5": (RESNET, 3, 1e-2, 5, 1e-2, 0.95, None),
    "r_s95_lr10_e5": (RESNET, 3, 1e-2, 5, 5e-3, 0.95, None),
    "r_s95_lr20_e15": (RESNET, 3, 1e-2, 15, 1e-2, 0.95, None),
    "cn": (CONVNET, 100, 1e-2, 30, 1e-2, 0.8, "flip_rotate"),
    "cn_s95": (CONVNET, 100, 1e-2, 30, 1e-2, 0.95, "flip_rotate"),
    "cn_ft3": (CONVNET, 100, 1e-2, 30, 3e-3, 0.8, "flip_rotate"),
    "cn_sj": (CONVNET, 100, 1e-2, 30, 1e-2, 0.8, "stainjitter_flip_rotate"),
    "cn_long": (CONVNET, 100, 1e-2, 100, 1e-2, 0.95, "flip_rotate"),
}
NORMALISED = {"cn_norm": "cn", "cn_long_norm": "cn_long"}  # the arm with received sets Macenko-mapped to the target


def view(ps: PatchSet) -> PatchSet:
    return prepare(ps, crop=32, size=32) if ps.image_size > 32 else resize_to(ps, 32)


def split_target(ps: PatchSet, per_class: int, seed: int) -> tuple[PatchSet, PatchSet]:
    rng = np.random.default_rng(seed)
    own = np.concatenate([rng.choice(np.flatnonzero(ps.labels == c), per_class, replace=False)
                          for c in range(ps.num_classes)])
    rest = np.setdiff1d(np.arange(len(ps)), own)
    return ps.subset(own), ps.subset(rest)


def bal_acc(model, test: PatchSet) -> tuple[float, float]:
    p = predict_probs(model, test.images, device="cpu")
    pred = p.argmax(1)
    acc = float(np.mean([np.mean(pred[test.labels == c] == c) for c in range(test.num_classes)]))
    return acc, float(binary_auc(p[:, 1], test.labels == 1))


def run_arm(name: str, own: PatchSet, test: PatchSet, received: dict[str, PatchSet], seed: int) -> dict:
    if name in NORMALISED:
        from histodd_fed.federation.stain_mapping import stain_normalise_to

        received = {k: stain_normalise_to(v, own)[0] for k, v in received.items()}
    (arch, kw), pre_ep, pre_lr, ft_ep, ft_lr, share, aug = ARMS[NORMALISED.get(name, name)]
    base = build_seeded_model(arch, seed=seed, num_classes=2, image_size=32, **kw)
    base = train_classifier(base, own, epochs=pre_ep, lr=pre_lr, batch_size=32, seed=seed, device="cpu",
                            augmentation=None if arch == "resnet18" else aug, progress=False).model
    state = {k: v.clone() for k, v in base.state_dict().items()}
    out = {"arm": name, "seed": seed}
    for row, rec in [("alone", None), *received.items()]:
        base.load_state_dict(state)
        t0 = time.perf_counter()
        train = mixed_training_set(own, rec, share=share, seed=seed)
        model = fine_tune(base, train, epochs=ft_ep, lr=ft_lr, batch_size=32, augmentation=aug, seed=seed,
                          device="cpu", progress=False).model
        acc, auc = bal_acc(model, test)
        out[row] = {"bal_acc": round(acc, 4), "auc": round(auc, 4), "s": round(time.perf_counter() - t0, 1)}
    for row in received:
        out[f"gain_{row}"] = round(out[row]["bal_acc"] - out["alone"]["bal_acc"], 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("centres")
    ap.add_argument("ipc10", nargs="?", default=None)
    ap.add_argument("--arms", default="base,lr10,lr10_aug")
    ap.add_argument("--seeds", default="0,1,2")
    a = ap.parse_args()
    torch.set_num_threads(1)
    c = Path(a.centres)
    full = view(PatchSet.load(c / "H0" / "source" / "train"))
    tune = view(PatchSet.load(c / "H3" / "source" / "train"))
    received = {"full": full}
    if a.ipc10:
        received["ipc10"] = resize_to(PatchSet.load(a.ipc10), 32)
    for seed in [int(s) for s in a.seeds.split(",")]:
        own, test = split_target(tune, 50, seed)
        for arm in a.arms.split(","):
            print(json.dumps(run_arm(arm, own, test, received, seed)), flush=True)


if __name__ == "__main__":
    main()
