"""Pseudo-slides: bags of real PCam patches of ONE split of ONE hospital, for slide-level (MIL) columns.

PCam has no slides, and it is class-balanced, so its normal patches limit how many realistic slides a
split can hold (a 64-patch tumour slide at ~5% tumour needs ~61 normal patches; a hospital's test split
has ~250). A disjoint partition would give a handful of slides per split - no AUC. Pseudo-slides are
therefore **resampled within one split**: each slide is a draw of ``bag`` distinct patches of that split
(no repeat inside a slide; a patch may appear in several slides of the SAME split, never in a slide of
another split or another hospital). A **normal** slide holds normal patches only; a **tumour** slide holds
``k`` tumour patches, ``k`` drawn uniformly among the counts whose share ``k / bag`` lies in
``tumour_share`` (default 2-10%: a realistic minority), the rest normal.

The slides are stored as separate patch sets beside the patch splits (``slides-train``, ``slides-test``:
one slide per row, :class:`~histodd_fed.patchset.PatchSet`'s slide table), so the patch-level sets and
their metrics stay exactly as they are. Bags take at most half of a split's normal patches (so two normal
slides of one split differ): a split with few normals gets smaller bags (a hospital's target train split, 50 normal
patches: 25-patch bags). A split whose cap falls below 16 patches, or whose bag size admits no tumour count
in the share range, gets no slides (the reason is returned and recorded in the manifest).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from histodd_fed.errors import ConfigError
from histodd_fed.patchset import PatchSet

NORMAL, TUMOUR = "normal", "tumour"


@dataclass(frozen=True)
class SlideSpec:
    """How pseudo-slides are drawn (``make-pcam-centres --slide-patches/--tumour-share/--slides-*``)."""

    patches: tuple[int, int] = (64, 64)           # bag size range (inclusive), drawn per slide
    tumour_share: tuple[float, float] = (0.02, 0.10)  # share of tumour patches in a tumour slide
    source_train: int = 20                        # slides per class in a hospital's source train split
    target_train: int = 10                        # slides per class in its target train split
    test: int = 20                                # slides per class in its target test split

    def __post_init__(self) -> None:
        lo, hi = (int(x) for x in self.patches)
        object.__setattr__(self, "patches", (lo, hi))
        if lo < 2 or hi < lo:
            raise ConfigError(f"--slide-patches: need 2 <= low <= high, got {lo}-{hi}")
        s_lo, s_hi = (float(x) for x in self.tumour_share)
        object.__setattr__(self, "tumour_share", (s_lo, s_hi))
        if not 0.0 < s_lo <= s_hi < 1.0:
            raise ConfigError(f"--tumour-share: need 0 < low <= high < 1, got {s_lo}-{s_hi}")
        for name in ("source_train", "target_train", "test"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--slides-{name.replace('_', '-')}: need at least one slide per class")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def parse_range(text: str, *, what: str, as_int: bool) -> tuple:
    """``"64"`` -> (64, 64); ``"64-128"`` -> (64, 128); ``"0.02-0.1"`` -> (0.02, 0.1). One-line ConfigError."""
    parts = [p.strip() for p in str(text).split("-")]
    try:
        vals = [int(p) if as_int else float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"{what}: expected N or LOW-HIGH, got {text!r}") from None
    if len(vals) not in (1, 2):
        raise ConfigError(f"{what}: expected N or LOW-HIGH, got {text!r}")
    return (vals[0], vals[-1])


def tumour_counts(bag: int, share: tuple[float, float]) -> range:
    """Tumour patch counts ``k`` with ``k / bag`` in ``share`` (and at least one)."""
    return range(max(1, math.ceil(share[0] * bag - 1e-9)), math.floor(share[1] * bag + 1e-9) + 1)


#: the smallest bag a split's cap may shrink a requested bag to (a smaller request is kept as asked)
MIN_BAG = 16


def bag_range(spec: SlideSpec, n_normal: int) -> tuple[int, int] | str:
    """The bag sizes a split with ``n_normal`` normal patches draws from, or why it holds no slides.

    Bags take at most half of the split's normal patches (so two normal slides of one split differ);
    a split whose cap is below ``min(MIN_BAG, requested low)`` holds no slides."""
    cap = n_normal // 2
    lo, hi = min(spec.patches[0], cap), min(spec.patches[1], cap)
    if lo < min(MIN_BAG, spec.patches[0]):
        return (f"{n_normal} normal patches: bags take at most half of them ({cap}), below "
                f"{min(MIN_BAG, spec.patches[0])}")
    if not tumour_counts(lo, spec.tumour_share):
        return f"a {lo}-patch bag holds no tumour count in {spec.tumour_share[0]:.0%}-{spec.tumour_share[1]:.0%}"
    return (lo, hi)


def draw_slides(labels: np.ndarray, class_names: list[str], per_class: int, spec: SlideSpec,
                seed: int) -> list[tuple[int, np.ndarray]] | str:
    """``per_class`` normal and ``per_class`` tumour slides of one split: ``[(slide label, patch indices)]``
    (indices into ``labels``, distinct within a slide, sorted), or the reason the split holds none."""
    if NORMAL not in class_names or TUMOUR not in class_names:
        raise ConfigError(f"pseudo-slides need classes {NORMAL!r} and {TUMOUR!r}, got {class_names}")
    c_norm, c_tum = class_names.index(NORMAL), class_names.index(TUMOUR)
    normals, tumours = np.flatnonzero(labels == c_norm), np.flatnonzero(labels == c_tum)
    bags = bag_range(spec, len(normals))
    if isinstance(bags, str):
        return bags
    rng = np.random.default_rng([int(seed), 17])
    out: list[tuple[int, np.ndarray]] = []
    for label in (c_norm, c_tum):
        for _ in range(per_class):
            bag = int(rng.integers(bags[0], bags[1] + 1))
            k = int(rng.choice(list(tumour_counts(bag, spec.tumour_share)))) if label == c_tum else 0
            if k > len(tumours):
                return f"{len(tumours)} tumour patches: a tumour slide needs {k}"
            idx = np.concatenate([rng.choice(normals, bag - k, replace=False),
                                  rng.choice(tumours, k, replace=False)]).astype(np.int64)
            out.append((label, np.sort(idx)))
    return out


def slide_set(split: PatchSet, files: list[str], per_class: int, spec: SlideSpec, *, seed: int,
              prefix: str) -> tuple[PatchSet | None, dict[str, Any]]:
    """The pseudo-slide patch set of ``split`` (None when it holds none) and what the manifest records.

    Slide ids ``<prefix>-n<k>`` / ``<prefix>-t<k>``; ``meta["split_indices"]`` / ``meta["files"]`` name each
    row's patch in ``split`` (so a slide's patches can be traced to the split, and only to it)."""
    slides = draw_slides(split.labels, list(split.class_names), per_class, spec, seed)
    if isinstance(slides, str):
        return None, {"slides": 0, "why_none": slides}
    c_tum = list(split.class_names).index(TUMOUR)
    ids, rows, slide_index = [], [], []
    counts = {0: 0, 1: 0}
    for j, (label, idx) in enumerate(slides):
        is_t = int(label == c_tum)
        ids.append(f"{prefix}-{'t' if is_t else 'n'}{counts[is_t]:02d}")
        counts[is_t] += 1
        rows.append(idx)
        slide_index.append(np.full(len(idx), j, dtype=np.int32))
    take = np.concatenate(rows)
    shares = [float((split.labels[idx] == c_tum).mean()) for label, idx in slides if label == c_tum]
    info = {"slides": len(slides), "normal_slides": counts[0], "tumour_slides": counts[1],
            "patches": int(len(take)), "distinct_patches": int(len(np.unique(take))),
            "bag_sizes": [int(min(len(i) for _, i in slides)), int(max(len(i) for _, i in slides))],
            "tumour_share": [round(min(shares), 4), round(max(shares), 4)]}
    ps = PatchSet(images=np.ascontiguousarray(split.images[take]), labels=split.labels[take].copy(),
                  class_names=list(split.class_names), slide_index=np.concatenate(slide_index), slide_ids=ids,
                  slide_labels={sid: int(label) for sid, (label, _) in zip(ids, slides)}, kind="real",
                  meta=dict(split.meta, files=[files[i] for i in take], split_indices=take.tolist(),
                            pseudo_slides=dict(spec.to_dict(), seed=int(seed), **info)))
    return ps, info
