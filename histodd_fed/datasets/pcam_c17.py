"""PCam x Camelyon17: centres of real tissue with a real inter-hospital stain shift.

Two layouts. **Hospitals** (:func:`make_hospital_centres`, ``make-pcam-centres --hospitals 0,1,2,3,4``):
one centre ``H<d>`` per Camelyon17 hospital with disjoint PCam patches, each a source part (its share of
PCam ``train``) and a target part (its share of PCam ``valid``: small labelled train set, large test
set), both re-stained to that hospital. **Two centres** (:func:`make_pcam_centres`, ``--target-domain``),
the first benchmark:

- **C1** (source, data-rich): PCam ``train`` as it is (one PatchSet, ``DIR/C1``).
- **C2** (target, data-poor): PCam ``valid`` re-stained into one Camelyon17 centre's stains
  (:mod:`histodd_fed.stain.restain`: per-image Macenko separation, the target centre's stain matrix
  and concentration level from its five tiles, per-patch jitter drawn from the spread across those
  tiles); ``target_train_per_class`` labelled patches per class in ``DIR/C2/train``, the rest in
  ``DIR/C2/test``. A centre folder with ``train/`` and ``test/`` patch sets is read as that split by
  the federation (:func:`histodd_fed.federation.centre_data.load_real_splits`).

C1 and C2 are patch-disjoint by construction (PCam ``train`` vs ``valid``); every patch keeps its
PCam file name in ``meta["files"]``. ``DIR/manifest.json`` records counts, both stain profiles and
the settings; ``DIR/centres.png`` shows the target centre's real tiles beside re-stained C2 patches,
the same patches before re-staining, and C1 patches.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from histodd_fed.atomic import atomic_write_json
from histodd_fed.datasets.pseudo_slides import SlideSpec, slide_set
from histodd_fed.errors import ConfigError, InputError
from histodd_fed.patchset import IMAGE_SUFFIXES, PatchSet
from histodd_fed.runconfig import write_run_config
from histodd_fed.stain.restain import StainProfile, load_rgb, restain, set_profile, stain_distance

log = logging.getLogger(__name__)
TILE_RE = re.compile(r"^domain_(\d+)_(\d+)\.png$")
BENCHMARK = "pcam-c17"


def domain_tiles(stains: Path) -> dict[int, list[Path]]:
    """Camelyon17 stain tiles by domain (``domain_<d>_<id>.png``)."""
    stains = Path(stains)
    if not stains.is_dir():
        raise InputError(f"{stains}: stain tile folder not found")
    out: dict[int, list[Path]] = {}
    for p in sorted(stains.iterdir()):
        m = TILE_RE.match(p.name)
        if m:
            out.setdefault(int(m.group(1)), []).append(p)
    if not out:
        raise InputError(f"{stains}: no domain_<centre>_<id>.png tiles")
    return out


def domain_profile(stains: Path, domain: int) -> tuple[StainProfile, list[np.ndarray]]:
    """The stain profile of Camelyon17 domain ``domain`` and its tiles."""
    tiles = domain_tiles(stains)
    if domain not in tiles:
        raise ConfigError(f"{stains}: unknown domain {domain} (have {', '.join(str(d) for d in sorted(tiles))})")
    images = [load_rgb(p) for p in tiles[domain]]
    return StainProfile.from_images(images, name=f"camelyon17-domain-{domain}"), images


def load_folder(root: Path, limit_per_class: int | None, seed: int) -> tuple[PatchSet, list[str]]:
    """``root/CLASS/*.jpg`` as a real PatchSet and its file names (``CLASS/name``), seeded subset per class."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: PCam split folder not found")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise InputError(f"{root}: no class sub-folders (expected {root}/CLASS/*.jpg)")
    rng = np.random.default_rng(seed)
    images, labels, names = [], [], []
    for ci, c in enumerate(classes):
        files = sorted(p for p in (root / c).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if limit_per_class is not None and len(files) > limit_per_class:
            files = [files[i] for i in sorted(rng.choice(len(files), limit_per_class, replace=False))]
        for f in files:
            a = load_rgb(f)
            if images and a.shape != images[0].shape:
                raise InputError(f"{f}: size {a.shape[:2]} differs from {images[0].shape[:2]}")
            images.append(a)
            labels.append(ci)
            names.append(f"{c}/{f.name}")
    if not images:
        raise InputError(f"{root}: no images under {classes}")
    return PatchSet(np.stack(images), np.asarray(labels), classes, kind="real"), names


def split_per_class(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Boolean train mask: ``per_class`` seeded random patches of every class."""
    rng = np.random.default_rng(seed)
    train = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if per_class >= len(idx):
            raise ConfigError(f"--target-train-per-class {per_class}: class {c} has only {len(idx)} patches "
                              "(some must remain for the test set)")
        train[rng.choice(idx, per_class, replace=False)] = True
    return train


def _checked_paths(pcam: Path, stains: Path, out: Path, target_train_per_class: int) -> tuple[Path, Path, Path]:
    """The three folders as paths, after the checks both builders share (PCam present, a labelled target)."""
    pcam, stains, out = Path(pcam), Path(stains), Path(out)
    if not pcam.is_dir():
        raise InputError(f"{pcam}: PCam folder not found")
    if target_train_per_class < 1:
        raise ConfigError(f"--target-train-per-class must be >= 1, got {target_train_per_class}")
    return pcam, stains, out


def make_pcam_centres(pcam: Path, stains: Path, out: Path, *, target_domain: int = 2,
                      target_train_per_class: int = 50, seed: int = 0, limit_per_class: int | None = None,
                      jitter: bool = True, figure: bool = True) -> dict[str, Any]:
    """Write ``out/C1``, ``out/C2/{train,test}``, ``manifest.json``, ``run_config.json``, ``centres.png``."""
    pcam, stains, out = _checked_paths(pcam, stains, out, target_train_per_class)
    t0 = time.perf_counter()
    target, tiles = domain_profile(stains, target_domain)
    c1, c1_files = load_folder(pcam / "train", limit_per_class, seed)
    valid, valid_files = load_folder(pcam / "valid", limit_per_class, seed)
    if list(valid.class_names) != list(c1.class_names):
        raise InputError(f"{pcam}: train classes {c1.class_names} differ from valid classes {valid.class_names}")
    source = set_profile(valid.images, name="pcam-valid", seed=seed)
    c1_profile = set_profile(c1.images, name="pcam-train (C1)", seed=seed)
    restained, info = restain(valid.images, source, target, seed=seed, jitter=jitter)
    is_train = split_per_class(valid.labels, target_train_per_class, seed)
    common = {"benchmark": BENCHMARK, "target_domain": int(target_domain), "seed": int(seed)}
    c1.meta = dict(common, centre="C1", source=str(pcam / "train"), files=c1_files, stain="PCam as is")
    c2 = PatchSet(restained, valid.labels, list(valid.class_names), kind="real",
                  meta=dict(common, centre="C2", source=str(pcam / "valid"),
                            stain=f"re-stained to Camelyon17 domain {target_domain}"))
    out.mkdir(parents=True, exist_ok=True)
    c1.save(out / "C1")
    for name, mask in (("train", is_train), ("test", ~is_train)):
        idx = np.flatnonzero(mask)
        part = c2.subset(idx)
        part.meta = dict(c2.meta, split=name, files=[valid_files[i] for i in idx])
        part.save(out / "C2" / name)
    c2_profile = set_profile(restained, name="C2 re-stained", seed=seed)
    manifest = {
        "benchmark": BENCHMARK, "pcam": str(pcam), "stains": str(stains), "target_domain": int(target_domain),
        "target_train_per_class": int(target_train_per_class), "seed": int(seed),
        "limit_per_class": limit_per_class, "jitter": bool(jitter),
        "centres": {
            "C1": {"path": "C1", "role": "source", "patches": len(c1), "class_counts": c1.class_counts(),
                   "from": "PCam train, as is"},
            "C2": {"path": "C2", "role": "target", "train": "C2/train", "test": "C2/test",
                   "train_class_counts": c2.subset(np.flatnonzero(is_train)).class_counts(),
                   "test_class_counts": c2.subset(np.flatnonzero(~is_train)).class_counts(),
                   "from": f"PCam valid, re-stained to Camelyon17 domain {target_domain}"},
        },
        "restain": info,
        "profiles": {"target": target.to_dict(), "pcam_valid": source.to_dict(), "C1": c1_profile.to_dict(),
                     "C2": c2_profile.to_dict()},
        "stain_angle_deg": {"C2_to_target": round(stain_distance(c2_profile.matrix, target.matrix), 3),
                            "C2_to_C1": round(stain_distance(c2_profile.matrix, c1_profile.matrix), 3),
                            "C1_to_target": round(stain_distance(c1_profile.matrix, target.matrix), 3)},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(out / "manifest.json", manifest)
    write_run_config(out, "centre-node make-pcam-centres", {k: v for k, v in manifest.items()
                                                              if k not in ("profiles", "centres")})
    if figure:
        centres_figure(out / "centres.png", tiles, restained, valid.images, c1.images, valid.labels, c1.labels,
                       target_domain, seed)
    log.info("pcam-c17: C1 %d, C2 %d train / %d test patches in %.1fs", len(c1), int(is_train.sum()),
             int((~is_train).sum()), manifest["seconds"])
    return manifest


def centres_figure(path: Path, tiles: list[np.ndarray], c2: np.ndarray, c2_before: np.ndarray, c1: np.ndarray,
                   c2_labels: np.ndarray, c1_labels: np.ndarray, domain: int, seed: int, n: int = 8) -> Path:
    """Rows: the domain's real tiles; C2 re-stained patches; the same patches before; C1 patches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)

    def pick(labels: np.ndarray) -> np.ndarray:
        per = [rng.choice(np.flatnonzero(labels == c), min(n // 2, int((labels == c).sum())), replace=False)
               for c in np.unique(labels)]
        return np.concatenate(per)[:n]

    i2, i1 = pick(c2_labels), pick(c1_labels)
    rows = [("Camelyon17 domain %d\n(real tiles)" % domain, list(tiles)),
            ("C2: PCam valid\nre-stained", [c2[i] for i in i2]),
            ("same patches\nbefore re-staining", [c2_before[i] for i in i2]),
            ("C1: PCam train\n(as is)", [c1[i] for i in i1])]
    cols = max(len(r[1]) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols + 1.2, 1.7 * len(rows)))
    for r, (title, ims) in enumerate(rows):
        for c in range(cols):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(ims):
                ax.imshow(ims[c])
        axes[r, 0].set_title(title, fontsize=8, loc="left")
    fig.suptitle(f"pcam-c17: target stain = Camelyon17 domain {domain}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- five hospitals
#: centre id of Camelyon17 hospital (domain) ``d`` in the hospitals layout
def hospital_id(domain: int) -> str:
    return f"H{int(domain)}"


def parse_hospitals(text: str | None) -> list[int]:
    """``"0,1,2,3,4"`` -> ``[0, 1, 2, 3, 4]`` (one-line ConfigError for anything else)."""
    try:
        out = [int(x) for x in str(text or "").split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--hospitals: expected comma-separated Camelyon17 domains, got {text!r}") from None
    if len(out) < 2 or len(set(out)) != len(out) or min(out) < 0:
        raise ConfigError(f"--hospitals: need at least two different domains >= 0, got {text!r}")
    return out


def _deal(labels: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """Indices dealt into ``n`` disjoint, class-balanced shares (seeded)."""
    rng = np.random.default_rng(seed)
    shares: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c in np.unique(labels):
        for k, part in enumerate(np.array_split(rng.permutation(np.flatnonzero(labels == c)), n)):
            shares[k].append(part)
    return [np.sort(np.concatenate(s)) for s in shares]


def make_hospital_centres(pcam: Path, stains: Path, out: Path, *, hospitals: list[int],
                          target_train_per_class: int = 50, seed: int = 0, limit_per_class: int | None = None,
                          jitter: bool = True, figure: bool = True,
                          slides: SlideSpec | None = SlideSpec()) -> dict[str, Any]:
    """One centre per Camelyon17 hospital, patch-disjoint, each re-stained to its hospital.

    PCam ``train`` is dealt into ``len(hospitals)`` disjoint class-balanced shares (the hospitals'
    **source** parts, every patch of the share: nothing capped) and PCam ``valid`` likewise (their
    **target** parts: ``target_train_per_class`` labelled train patches per class, the rest the
    test set). Both parts of hospital ``d`` are re-stained to domain ``d``'s stains. Layout::

        out/H<d>/source/train   the share of PCam train (what H<d> sends as a source; "Full")
        out/H<d>/source/test    -> ../target/test (the hospital's own test patches, for its own baseline)
        out/H<d>/target/train   labelled train patches of H<d> as a target
        out/H<d>/target/test    its test set
        out/H<d>/source/slides-train   pseudo-slides of source/train (:mod:`pseudo_slides`; ``slides=None``: none)
        out/H<d>/source/slides-test    -> ../target/slides-test
        out/H<d>/target/slides-train   pseudo-slides of target/train
        out/H<d>/target/slides-test    pseudo-slides of target/test

    A split too small for pseudo-slides gets none (the manifest says why); the centre then has no slide
    columns.
    """
    pcam, stains, out = _checked_paths(pcam, stains, out, target_train_per_class)
    t0 = time.perf_counter()
    tiles_by = domain_tiles(stains)
    missing = [d for d in hospitals if d not in tiles_by]
    if missing:
        raise ConfigError(f"--hospitals: unknown domain(s) {missing} in {stains} "
                          f"(have {', '.join(str(d) for d in sorted(tiles_by))})")
    train, train_files = load_folder(pcam / "train", limit_per_class, seed)
    valid, valid_files = load_folder(pcam / "valid", limit_per_class, seed)
    if list(valid.class_names) != list(train.class_names):
        raise InputError(f"{pcam}: train classes {train.class_names} differ from valid classes {valid.class_names}")
    n = len(hospitals)
    src_shares, tgt_shares = _deal(train.labels, n, seed), _deal(valid.labels, n, seed + 1)
    smallest = min(int(np.bincount(valid.labels[s]).min()) for s in tgt_shares)
    if target_train_per_class >= smallest:
        raise ConfigError(f"--target-train-per-class {target_train_per_class}: a hospital's share of PCam valid has "
                          f"only {smallest} patches of a class (some must remain for its test set; lower it or "
                          "raise --limit)")
    train_profile = set_profile(train.images, name="pcam-train", seed=seed)
    valid_profile = set_profile(valid.images, name="pcam-valid", seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    centres: dict[str, Any] = {}
    profiles: dict[str, Any] = {}
    shown: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]] = {}
    for k, d in enumerate(hospitals):
        cid = hospital_id(d)
        target, tiles = domain_profile(stains, d)
        common = {"benchmark": BENCHMARK, "layout": "hospitals", "domain": int(d), "seed": int(seed), "centre": cid,
                  "stain": f"re-stained to Camelyon17 domain {d}"}
        si, ti = src_shares[k], tgt_shares[k]
        src_img, src_info = restain(train.images[si], train_profile, target, seed=seed * 1000 + 2 * d, jitter=jitter)
        tgt_img, tgt_info = restain(valid.images[ti], valid_profile, target, seed=seed * 1000 + 2 * d + 1,
                                    jitter=jitter)
        src = PatchSet(src_img, train.labels[si], list(train.class_names), kind="real",
                       meta=dict(common, role="source", split="train", source=str(pcam / "train"),
                                 files=[train_files[i] for i in si]))
        src.save(out / cid / "source" / "train")
        tgt = PatchSet(tgt_img, valid.labels[ti], list(valid.class_names), kind="real")
        is_train = split_per_class(tgt.labels, target_train_per_class, seed + d)
        parts, split_sets = {}, {"source/train": src}
        for name, mask in (("train", is_train), ("test", ~is_train)):
            idx = np.flatnonzero(mask)
            part = tgt.subset(idx, meta=dict(common, role="target", split=name, source=str(pcam / "valid"),
                                             files=[valid_files[ti[i]] for i in idx]))
            part.save(out / cid / "target" / name)
            parts[name] = part.class_counts()
            split_sets[f"target/{name}"] = part
        _link(out / cid / "source" / "test", Path("..") / "target" / "test")
        slide_info = _pseudo_slides(out / cid, cid, split_sets, slides, seed * 1000 + 2 * d) if slides else None
        prof = set_profile(np.concatenate([src_img, tgt_img]), name=f"{cid} re-stained", seed=seed)
        profiles[cid] = {"target": target.to_dict(), "restained": prof.to_dict()}
        centres[cid] = {"domain": int(d), "source": f"{cid}/source", "target": f"{cid}/target",
                        "source_class_counts": src.class_counts(), "target_train_class_counts": parts["train"],
                        "target_test_class_counts": parts["test"],
                        "restain": {"source": src_info, "target": tgt_info},
                        "stain_angle_deg_to_tiles": round(stain_distance(prof.matrix, target.matrix), 3)}
        if slide_info is not None:
            centres[cid]["pseudo_slides"] = slide_info
        shown[d] = (src_img, tgt_img, valid.images[ti], tiles)
        log.info("pcam-c17: %s (domain %d): source %d, target %d train / %d test patches", cid, d, len(src),
                 int(is_train.sum()), int((~is_train).sum()))
    angles = {f"{a}-{b}": round(stain_distance(np.asarray(profiles[a]["restained"]["matrix"]),
                                               np.asarray(profiles[b]["restained"]["matrix"])), 3)
              for i, a in enumerate(centres) for b in list(centres)[i + 1:]}
    manifest = {
        "benchmark": BENCHMARK, "layout": "hospitals", "pcam": str(pcam), "stains": str(stains),
        "hospitals": [int(d) for d in hospitals], "target_train_per_class": int(target_train_per_class),
        "seed": int(seed), "limit_per_class": limit_per_class, "jitter": bool(jitter),
        "pseudo_slides": slides.to_dict() if slides else None, "centres": centres,
        "profiles": dict(profiles, pcam_train=train_profile.to_dict(), pcam_valid=valid_profile.to_dict()),
        "stain_angle_deg_between": angles, "seconds": round(time.perf_counter() - t0, 2),
    }
    atomic_write_json(out / "manifest.json", manifest)
    write_run_config(out, "centre-node make-pcam-centres --hospitals",
                     {k: v for k, v in manifest.items() if k not in ("profiles", "centres")})
    if figure:
        hospitals_figure(out / "centres.png", shown, seed)
    return manifest


def _link(link: Path, to: Path) -> None:
    """``link`` -> ``to`` (a relative directory link), replacing an older link or file."""
    if link.is_symlink() or link.is_file():
        link.unlink()
    if not link.exists():
        link.symlink_to(to, target_is_directory=True)


#: pseudo-slide sets of a hospital: (folder under H<d>, the split it is drawn from, SlideSpec field)
SLIDE_SETS = (("source/slides-train", "source/train", "source_train"),
              ("target/slides-train", "target/train", "target_train"),
              ("target/slides-test", "target/test", "test"))


def _pseudo_slides(root: Path, cid: str, splits: dict[str, PatchSet], spec: SlideSpec, seed: int) -> dict[str, Any]:
    """Write the hospital's pseudo-slide sets (each from ONE split, :func:`pseudo_slides.slide_set`); the
    manifest's record. When a target split holds none, neither target slide set is written (no half
    slide columns); ``source/slides-test`` links to the target's test slides (the source's own baseline)."""
    made: dict[str, PatchSet | None] = {}
    info: dict[str, Any] = {}
    for k, (folder, split, field) in enumerate(SLIDE_SETS):
        ps, rec = slide_set(splits[split], splits[split].meta["files"], int(getattr(spec, field)), spec,
                            seed=seed * 10 + k, prefix=f"{cid}-{split.replace('/', '-')}")
        made[folder], info[folder] = ps, dict(rec, split=split)
    if made["target/slides-train"] is None or made["target/slides-test"] is None:
        for folder in ("target/slides-train", "target/slides-test"):
            if made[folder] is not None:
                made[folder] = None
                info[folder] = {"slides": 0, "split": info[folder]["split"],
                                "why_none": "the other target split holds no slides"}
    for folder, ps in made.items():
        if ps is None:  # a stale set of an earlier build must not look like this build's
            if (root / folder).is_dir():
                shutil.rmtree(root / folder)
            continue
        if ps is not None:
            ps.meta = dict(ps.meta, split=folder.split("/")[-1], role=folder.split("/")[0])
            ps.save(root / folder)
            info[folder]["bytes"] = sum(f.stat().st_size for f in (root / folder).iterdir())
    link = root / "source" / "slides-test"
    if made["target/slides-test"] is not None:
        _link(link, Path("..") / "target" / "slides-test")
    elif link.is_symlink():
        link.unlink()
    return info


def hospitals_figure(path: Path, shown: dict[int, tuple], seed: int, n: int = 4) -> Path:
    """One row per hospital: its real tiles, re-stained source patches, re-stained target patches."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    cols = 3 * n
    fig, axes = plt.subplots(len(shown), cols, figsize=(1.3 * cols, 1.45 * len(shown)), squeeze=False)
    for r, (d, (src, tgt, _, tiles)) in enumerate(sorted(shown.items())):
        ims = list(tiles[:n]) + [src[i] for i in rng.choice(len(src), min(n, len(src)), replace=False)] + \
            [tgt[i] for i in rng.choice(len(tgt), min(n, len(tgt)), replace=False)]
        for c in range(cols):
            axes[r, c].axis("off")
            if c < len(ims):
                axes[r, c].imshow(ims[c])
        axes[r, 0].set_title(f"H{d}: tiles | source (PCam train) | target (PCam valid)", fontsize=7, loc="left")
    fig.suptitle("pcam-c17: one centre per Camelyon17 hospital, re-stained to its stains", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
