"""Tune the PCam CPU preset (issue #5) on a split of ``train`` only: never on ``valid``.

The centre's ``pcam-ai4all/train`` folder is split (seeded) into a *tuning-train* part (500 patches
per class, as the CPU preset) and a disjoint *tuning-val* part (500 per class). Every training set
(Random / Herding / Forgetting coresets, Histo-DD variants, the full tuning-train set) is built from
tuning-train with the study's own builders (``histodd_fed.studies.training_sets.build_set``, cached
under ``<out>/sets``) and evaluated on tuning-val with the study's evaluation
(``histodd_fed.training.evaluation.evaluate_sets``), for one or more evaluation augmentations.

Each evaluated (set, evaluation recipe) pair is appended to ``<out>/records.jsonl`` (and skipped when
it is already there), so a time-boxed run can be continued; ``--table`` prints the Markdown table.

    timeout 1500 .venv/bin/python benchmarks/experiments/tune_pcam.py --out results/pcam-tuning \
        --methods random,herding,forgetting,histodd,full \
        --eval-augs color_crop_cutout_flip_scale_rotate,crop_cutout_flip_scale_rotate,flip_rotate
    .venv/bin/python benchmarks/experiments/tune_pcam.py --out results/pcam-tuning --table

Histo-DD variants (``--variants``) are named in :data:`VARIANTS` (overrides of the ``distill:``
section of ``--preset``); ``histodd`` alone means the preset's own distillation settings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from histodd_fed.runconfig import config_hash, write_run_config  # noqa: E402
from histodd_fed.studies.context import fingerprint  # noqa: E402
from histodd_fed.studies.presets import StudyPreset, load_preset  # noqa: E402
from histodd_fed.studies.training_sets import StudyData, build_set  # noqa: E402
from histodd_fed.training.data import load_patches  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "pcam-ai4all"
NO_COLOUR = "crop_cutout_flip_scale_rotate"

#: Histo-DD variants: overrides of the preset's ``distill:`` section.
VARIANTS: dict[str, dict] = {
    "histodd": {},
    # hypothesis 2: augmentation during matching without colour jitter
    "nocolor": {"augmentation": NO_COLOUR},
    "nocolor_cos": {"augmentation": NO_COLOUR, "distance": "cosine", "lr_img": 0.1},
    "nocolor_cos_lr1": {"augmentation": NO_COLOUR, "distance": "cosine", "lr_img": 1.0},
    "nocolor_l1mean": {"augmentation": NO_COLOUR, "distance": "l1_mean", "lr_img": 1.0},
    "nocolor_l1mean_lr10": {"augmentation": NO_COLOUR, "distance": "l1_mean", "lr_img": 10.0},
    "nocolor_long": {"augmentation": NO_COLOUR, "outer_steps": 40, "inner_steps": 10},
    "nocolor_cos_long": {"augmentation": NO_COLOUR, "distance": "cosine", "lr_img": 0.1,
                         "outer_steps": 40, "inner_steps": 10},
    "nocolor_lr03": {"augmentation": NO_COLOUR, "lr_img": 0.03},
    "nocolor_lr003": {"augmentation": NO_COLOUR, "lr_img": 0.003},
    "nocolor_long_lr003": {"augmentation": NO_COLOUR, "lr_img": 0.003, "outer_steps": 40, "inner_steps": 10},
    "nocolor_pool3": {"augmentation": NO_COLOUR, "pool_size": 3},
    "flip_rotate": {"augmentation": "flip_rotate"},
    # session 2: stain normalisation during matching, Macenko (per-image max rescaling) vs matrix only
    "nocolor_stain": {"augmentation": NO_COLOUR + "_stain"},
    "nocolor_stainmatrix": {"augmentation": NO_COLOUR + "_stainmatrix"},
    "flip_rotate_cos": {"augmentation": "flip_rotate", "distance": "cosine", "lr_img": 0.1},
    "fr_lr03": {"augmentation": "flip_rotate", "lr_img": 0.03},
    "fr_l1mean": {"augmentation": "flip_rotate", "distance": "l1_mean", "lr_img": 10.0},
    "fr_long": {"augmentation": "flip_rotate", "outer_steps": 40, "inner_steps": 10},
    "fr_cos_long": {"augmentation": "flip_rotate", "distance": "cosine", "lr_img": 0.1,
                    "outer_steps": 40, "inner_steps": 10},
    "fr_xlong": {"augmentation": "flip_rotate", "outer_steps": 100, "inner_steps": 10},
    "long": {"outer_steps": 40, "inner_steps": 10},
    # network: ConvNet without instance norm (instance norm removes each image's darkness / contrast)
    "nocolor_nonorm": {"augmentation": NO_COLOUR, "model_kwargs": {"width": 32, "depth": 3, "norm": "none"}},
    "fr_cos_lr03": {"augmentation": "flip_rotate", "distance": "cosine", "lr_img": 0.3},
    "herd_fr": {"augmentation": "flip_rotate"},
    "herd_fr_cos": {"augmentation": "flip_rotate", "distance": "cosine", "lr_img": 0.1},
    # hypothesis 3: herding initialisation (the study method histodd_herding uses the same overrides)
    "herd_nocolor": {"augmentation": NO_COLOUR},
    "herd_nocolor_cos": {"augmentation": NO_COLOUR, "distance": "cosine", "lr_img": 0.1},
    "herd_nocolor_long": {"augmentation": NO_COLOUR, "outer_steps": 40, "inner_steps": 10},
}
HERDING_INIT = {"herd_nocolor", "herd_nocolor_cos", "herd_nocolor_long", "herd_fr", "herd_fr_cos"}


@dataclass
class TuneConfig:
    """One tuning run: data split, sets to build, evaluation recipes."""

    preset: str = "cpu"
    out: str = "results/pcam-tuning"
    train_per_class: int = 500
    val_per_class: int = 500
    split_seed: int = 0
    methods: list[str] = field(default_factory=lambda: ["random", "herding", "histodd", "full"])
    variants: list[str] = field(default_factory=list)
    ipc: int = 10
    set_seeds: list[int] = field(default_factory=lambda: [0])
    eval_augs: list[str] = field(default_factory=lambda: ["color_crop_cutout_flip_scale_rotate"])
    eval_seeds: int = 3
    eval_epochs: int | None = None
    full_epochs: int | None = None
    threads: int = 1
    eval_kwargs: dict = field(default_factory=dict)   #: merged into the preset's eval arch_kwargs


def split_train(cfg: TuneConfig, preset: StudyPreset) -> StudyData:
    """Disjoint seeded tuning-train / tuning-val parts of ``pcam-ai4all/train`` (preprocessed as the preset)."""
    n = cfg.train_per_class + cfg.val_per_class
    both = load_patches(DATA / "train", image_size=preset.image_size, limit=n, seed=1000 + cfg.split_seed,
                        crop_center=preset.crop_center)
    rng = np.random.default_rng(cfg.split_seed)
    tr, va = [], []
    for c in range(both.num_classes):
        idx = rng.permutation(np.flatnonzero(both.labels == c))
        tr.append(idx[:cfg.train_per_class])
        va.append(idx[cfg.train_per_class:n])
    train = both.subset(np.sort(np.concatenate(tr)))
    val = both.subset(np.sort(np.concatenate(va)))
    return StudyData(train=train, test=val, fingerprint=fingerprint(train))


def _preset_for(base: StudyPreset, set_seed: int, variant: dict | None) -> StudyPreset:
    p = StudyPreset.from_dict({k: v for k, v in base.to_dict().items()})
    p.seed = set_seed
    if variant:
        p.distill = {**p.distill, **variant}
    return p


def _done(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    return {r["key"]: r for r in (json.loads(line) for line in path.read_text().splitlines() if line.strip())}


def run(cfg: TuneConfig) -> None:
    import torch

    from histodd_fed.training.evaluation import evaluate_sets

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_preset(cfg.preset)
    base.eval.arch_kwargs = {**base.eval.arch_kwargs, **cfg.eval_kwargs}
    tag = "".join(f"|{k}={v}" for k, v in sorted(cfg.eval_kwargs.items()))
    data = split_train(cfg, base)
    write_run_config(out, " ".join(sys.argv), {"tune": cfg.__dict__, "preset": base.to_dict(),
                                               "variants": {v: VARIANTS[v] for v in cfg.variants},
                                               "train_fingerprint": data.fingerprint},
                     name=f"run_config-{config_hash(cfg.__dict__)[:8]}.json")
    rec_path = out / "records.jsonl"
    done = _done(rec_path)
    jobs: list[tuple[str, str, dict | None, bool]] = [(m, m, None, False) for m in cfg.methods]
    jobs += [("histodd_herding" if v in HERDING_INIT else "histodd", v, VARIANTS[v], v in HERDING_INIT)
             for v in cfg.variants]
    for set_seed in cfg.set_seeds:
        for method, name, variant, _ in jobs:
            preset = _preset_for(base, set_seed, variant)
            t0 = time.perf_counter()
            if method == "full":
                ps, build_s = data.train, 0.0
            else:
                ps = build_set(method, cfg.ipc, data, preset, out, tag=f"{name}-s{set_seed}", progress=False)
                build_s = time.perf_counter() - t0
            for aug in cfg.eval_augs:
                full = method == "full"
                epochs = (cfg.full_epochs or base.eval.full_epochs) if full else (cfg.eval_epochs or base.eval.epochs)
                key = config_hash({"set": name, "set_seed": set_seed if not full else 0, "ipc": cfg.ipc, "aug": aug,
                                   "epochs": epochs, "eval": base.eval.__dict__, "seeds": cfg.eval_seeds,
                                   "variant": variant, "data": data.fingerprint,
                                   "distill": preset.distill if method.startswith("histodd") else None})[:16]
                if key in done:
                    continue
                if full and set_seed != cfg.set_seeds[0]:
                    continue
                t1 = time.perf_counter()
                ev = evaluate_sets({name: ps}, data.test, base.eval.arch, cfg.eval_seeds, epochs, lr=base.eval.lr,
                                   batch_size=base.eval.batch_size, augmentation=aug,
                                   arch_kwargs=base.eval.arch_kwargs, device="cpu", progress=False)[name]
                s = ev.summary()
                probs_tumour = [np.asarray(r.confusion)[:, 1].sum() / np.asarray(r.confusion).sum() for r in ev.runs]
                rec = {"key": key, "set": name, "method": method, "set_seed": set_seed, "ipc": cfg.ipc,
                       "eval_aug": aug + tag, "eval_arch_kwargs": base.eval.arch_kwargs, "epochs": epochs, "n_train": len(ps),
                       "accuracy": s["accuracy_per_seed"], "auc": s["auc_per_seed"],
                       "pred_tumour_frac": [float(p) for p in probs_tumour],
                       "build_s": round(build_s, 1), "eval_s": round(time.perf_counter() - t1, 1),
                       "distill": preset.distill if method.startswith("histodd") else None}
                with rec_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                done[key] = rec
                print(f"{name:22s} s{set_seed} {aug + tag:40s} acc {100*np.mean(rec['accuracy']):5.1f} ± "
                      f"{100*np.std(rec['accuracy']):4.1f}  auc {100*np.mean(rec['auc']):5.1f} ± "
                      f"{100*np.std(rec['auc']):4.1f}  tumour-pred {np.mean(rec['pred_tumour_frac']):.2f}  "
                      f"build {build_s:.0f}s eval {rec['eval_s']:.0f}s", flush=True)


def table(out: Path) -> str:
    """Markdown table: rows = sets, columns = evaluation augmentations; acc / AUC mean ± std over all
    (set seed x eval seed) runs, with the number of set seeds."""
    latest = {(r["set"], r["set_seed"], r["eval_aug"]): r for r in _done(out / "records.jsonl").values()}
    recs = list(latest.values())  # a re-evaluation of the same set and recipe counts once (the latest)
    augs = list(dict.fromkeys(r["eval_aug"] for r in recs))
    sets = list(dict.fromkeys(r["set"] for r in recs))
    lines = ["| set | " + " | ".join(f"{a}: acc / AUC (%)" for a in augs) + " |",
             "|---|" + "---|" * len(augs)]
    for s in sets:
        cells = []
        for a in augs:
            rs = [r for r in recs if r["set"] == s and r["eval_aug"] == a]
            if not rs:
                cells.append("")
                continue
            acc = np.concatenate([r["accuracy"] for r in rs]) * 100
            auc = np.concatenate([r["auc"] for r in rs]) * 100
            cells.append(f"{acc.mean():.1f} ± {acc.std():.1f} / {auc.mean():.1f} ± {auc.std():.1f} "
                         f"(n={len(acc)}, {len(rs)} set{'s' if len(rs) > 1 else ''})")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_by_seed(out: Path, aug: str) -> str:
    """Markdown table for one evaluation recipe: accuracy / AUC (mean over eval seeds) per set seed."""
    latest = {(r["set"], r["set_seed"], r["eval_aug"]): r for r in _done(out / "records.jsonl").values()}
    recs = [r for r in latest.values() if r["eval_aug"] == aug]
    seeds = sorted({r["set_seed"] for r in recs if r["method"] != "full"})
    lines = [f"| set ({aug}) | " + " | ".join(f"set seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for name in dict.fromkeys(r["set"] for r in recs):
        by = {r["set_seed"]: r for r in recs if r["set"] == name}
        lines.append(f"| {name} | " + " | ".join(
            f"{100 * np.mean(by[s]['accuracy']):.1f} / {100 * np.mean(by[s]['auc']):.1f}" if s in by else ""
            for s in seeds) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/pcam-tuning")
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--methods", default="random,herding,histodd,full")
    ap.add_argument("--variants", default="")
    ap.add_argument("--set-seeds", default="0")
    ap.add_argument("--eval-augs", default="color_crop_cutout_flip_scale_rotate")
    ap.add_argument("--eval-seeds", type=int, default=3)
    ap.add_argument("--eval-epochs", type=int, default=None)
    ap.add_argument("--full-epochs", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-kwargs", default="{}", help='JSON merged into the eval arch_kwargs, e.g. {"norm": "none"}')
    ap.add_argument("--table", action="store_true", help="print the table of records so far and exit")
    ap.add_argument("--by-seed", default=None, metavar="AUG", help="print per-set-seed results for one eval recipe")
    a = ap.parse_args()
    if a.table or a.by_seed:
        print(table_by_seed(Path(a.out), a.by_seed) if a.by_seed else table(Path(a.out)))
        return
    logging.basicConfig(level=logging.WARNING)
    if not (DATA / "train").is_dir():
        raise SystemExit(f"{DATA / 'train'}: PCam data not found")
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    unknown = [v for v in split(a.variants) if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; known: {sorted(VARIANTS)}")
    run(TuneConfig(preset=a.preset, out=a.out, methods=split(a.methods), variants=split(a.variants),
                   set_seeds=[int(s) for s in split(a.set_seeds)], eval_augs=split(a.eval_augs),
                   eval_seeds=a.eval_seeds, eval_epochs=a.eval_epochs, full_epochs=a.full_epochs,
                   threads=a.threads, eval_kwargs=json.loads(a.eval_kwargs)))


if __name__ == "__main__":
    main()
