"""Disguised copies of real patches: the attacks the copy detector (:mod:`histodd_fed.privacy.copies`) must catch.

Each attack takes raw real patches (uint8 N x S x S x 3, as they sit on disk) and the view a synthetic
set is made in, and returns images in that view that are copies of them up to one transform (or pixel
mixtures of 2-4 of them). Used by the attack tests (``tests/test_privacy_copies.py``) and the benchmark
(``benchmarks/bench_copy_detector.py``); they write what an attacker - or an optimiser that never moved
far from its starting patches - could hand to ``centre-node export``.

:data:`ATTACKS` maps a name to ``fn(raw, view, rng) -> (images, sources)`` where ``sources[i]`` lists
the indices of ``raw`` that image ``i`` copies.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np

from histodd_fed.preprocess import ViewSpec, apply_view_images, resize_images

Attack = Callable[[np.ndarray, ViewSpec, np.random.Generator], tuple[np.ndarray, list[list[int]]]]


def _view(raw: np.ndarray, view: ViewSpec) -> np.ndarray:
    return apply_view_images(raw, view)


def _one(fn: Callable[[np.ndarray, np.random.Generator], np.ndarray]) -> Attack:
    """An attack applying ``fn`` to the view of each raw patch."""
    def attack(raw, view, rng):
        return fn(_view(raw, view), rng), [[i] for i in range(len(raw))]
    return attack


def _dihedral(k: int, mirror: bool) -> Attack:
    def fn(x, rng):
        y = np.rot90(x, k, axes=(1, 2))
        return np.ascontiguousarray(y[:, :, ::-1] if mirror else y)
    return _one(fn)


def _shift(lo: int, hi: int) -> Attack:
    """The view's window moved by lo..hi px (random direction) inside the raw patch (crop views)."""
    def attack(raw, view, rng):
        crop = view.crop or view.source_size
        room = (view.source_size - crop) // 2
        out = []
        for x in raw:
            dy, dx = rng.integers(lo, hi + 1, size=2) * rng.choice([-1, 1], size=2)
            dy, dx = int(np.clip(dy, -room, room)), int(np.clip(dx, -room, room))
            top, left = room + dy, room + dx
            w = x[top:top + crop, left:left + crop]
            out.append(resize_images(w[None], view.out_size)[0])
        return np.stack(out), [[i] for i in range(len(raw))]
    return attack


def _roll(px: int) -> Attack:
    def fn(x, rng):
        return np.roll(x, (px, -px), axis=(1, 2))
    return _one(fn)


def _float(fn: Callable[[np.ndarray], np.ndarray]) -> Attack:
    return _one(lambda x, rng: np.clip(np.round(fn(x.astype(np.float64) / 255.0) * 255.0), 0, 255).astype(np.uint8))


def _grey(x: np.ndarray) -> np.ndarray:
    g = (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]
    return np.repeat(g, 3, axis=-1)


def _blur(x: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    r = int(np.ceil(2.5 * sigma))
    t = np.arange(-r, r + 1)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k /= k.sum()
    p = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
    y = sum(k[i] * p[:, i:i + x.shape[1], :, :] for i in range(len(k)))
    return sum(k[i] * y[:, :, i:i + x.shape[2], :] for i in range(len(k)))


def jpeg_images(x: np.ndarray, quality: int) -> np.ndarray:
    """uint8 NHWC images after a JPEG round trip at ``quality``."""
    from PIL import Image

    out = []
    for im in x:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality)
        out.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
    return np.stack(out)


def _jpeg(quality: int) -> Attack:
    return _one(lambda x, rng: jpeg_images(x, quality))


def _restain(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image separated into H and E (Macenko) and recombined with another H&E stain matrix."""
    from histodd_fed.stain import macenko

    target = np.array([[0.80, 0.20], [0.55, 0.90], [0.25, 0.38]])   # a purple haematoxylin, pink eosin
    target /= np.linalg.norm(target, axis=0, keepdims=True)
    out = np.empty_like(x)
    for i, im in enumerate(x):
        m, _ = macenko.stain_matrix(im)
        conc = macenko.concentrations(im, m)
        out[i] = np.round(macenko.od_to_rgb((conc * 1.3) @ target.T)).reshape(im.shape).astype(np.uint8)
    return out


def _mixture(k: int) -> Attack:
    """Pixel mixtures: image i is a random convex combination of raw patches i*k .. i*k+k-1 (in the view)."""
    def attack(raw, view, rng):
        v = _view(raw, view).astype(np.float64)
        n = len(raw) // k
        out, src = [], []
        for i in range(n):
            w = rng.dirichlet(np.full(k, 4.0))
            out.append(np.tensordot(w, v[i * k:(i + 1) * k], axes=1))
            src.append(list(range(i * k, (i + 1) * k)))
        return np.clip(np.round(np.stack(out)), 0, 255).astype(np.uint8), src
    return attack


ATTACKS: dict[str, Attack] = {
    "rot90": _dihedral(1, False), "rot180": _dihedral(2, False), "rot270": _dihedral(3, False),
    "mirror": _dihedral(0, True), "rot90+mirror": _dihedral(1, True), "rot180+mirror": _dihedral(2, True),
    "transpose": _dihedral(3, True),
    "shift 4-8 px in the raw patch": _shift(4, 8),
    "roll 3 px": _roll(3),
    "inverted": _float(lambda x: 1.0 - x),
    "brightness/contrast": _float(lambda x: (x - 0.5) * 1.4 + 0.55),
    "gamma 0.6": _float(lambda x: x ** 0.6),
    "gamma 1.8": _float(lambda x: x ** 1.8),
    "grey": _float(_grey),
    "channel order BGR": _one(lambda x, rng: np.ascontiguousarray(x[..., ::-1])),
    "re-stained": _one(_restain),
    "blur sigma 1": _float(_blur),
    "noise sigma 0.05": _one(lambda x, rng: np.clip(np.round(x + rng.normal(0, 12.75, x.shape)), 0, 255).astype(np.uint8)),
    "JPEG q50": _jpeg(50),
    "mixture of 2": _mixture(2),
    "mixture of 3": _mixture(3),
    "mixture of 4": _mixture(4),
}


def make_attack(name: str, raw: np.ndarray, view: ViewSpec, seed: int = 0) -> tuple[np.ndarray, list[list[int]]]:
    """Disguised copies of ``raw`` by attack ``name`` (see :data:`ATTACKS`)."""
    if name not in ATTACKS:
        raise KeyError(f"unknown attack {name!r}; known: {sorted(ATTACKS)}")
    return ATTACKS[name](raw, view, np.random.default_rng(seed))


__all__ = ["ATTACKS", "jpeg_images", "make_attack"]
