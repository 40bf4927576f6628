"""Memorisation: how close is each synthetic patch to the real patches it was made from?

For every synthetic patch we find its nearest real training patch under three metrics

- ``ssim``   structural similarity (gaussian window), higher = closer;
- ``l2``     normalised L2 (RMS pixel difference in [0, 1]), lower = closer;
- ``cosine`` cosine distance in an encoder's feature space, lower = closer;
- ``structure`` Pearson correlation of the low-passed grey images, higher = closer (catches a
  real patch under added noise or a colour shift, which keeps its layout of nuclei);

and put that distance in context: the *real-to-real* nearest-neighbour distribution (each of up
to ``reference_size`` real patches against all the other real patches) says how close two
distinct real patches of this centre normally are. A synthetic patch closer to a real patch than
almost every real patch is to its own nearest neighbour (below the real-real 1st percentile) looks
like a copy. When the synthetic set's meta records which real patch initialised each synthetic
patch (see :func:`init_indices_from_meta`), the distance to that patch is reported too.

SSIM is exact for synthetic-vs-real while ``len(synthetic) * len(real) <= ssim_exact_max_pairs``;
beyond that, and always for the real-real reference, the SSIM nearest neighbour is searched among
the ``ssim_candidates`` nearest patches by L2 (exact whenever the true SSIM neighbour is among them).
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from histodd_fed.logging_setup import progress
from histodd_fed.patchset import PatchSet
from histodd_fed.privacy.classifier import TrainSpec, extract_features, train_model
from histodd_fed.image_similarity import SSIMIndex, cosine_distance_matrix, normalised_l2_matrix
from histodd_fed.structure import structure_vectors

log = logging.getLogger(__name__)

METRICS = ("ssim", "l2", "structure", "cosine")
HIGHER_IS_CLOSER = {"ssim": True, "l2": False, "structure": True, "cosine": False}


@dataclass
class MemorisationConfig:
    """Settings of the nearest-neighbour search."""

    ssim_window: int = 11
    ssim_sigma: float = 1.5
    ssim_candidates: int = 64
    ssim_exact_max_pairs: int = 2_000_000
    reference_size: int = 1000
    uniqueness_rank: int = 8          #: the L2 rule compares the nearest real patch with the k-th nearest distinct one
    structure_metric: bool = True
    structure_pool: int = 2           #: average-pool factor (low pass) before the structure correlation
    feature_metric: bool = True
    encoder: TrainSpec = field(default_factory=lambda: TrainSpec(model="convnet", model_kwargs={"width": 32}, epochs=2,
                                                                 lr=0.01, batch_size=64))


@dataclass
class MetricResult:
    """Nearest-neighbour results under one metric."""

    name: str
    higher_is_closer: bool
    synthetic_nn: np.ndarray          # (S,) value to the nearest real patch
    synthetic_nn_index: np.ndarray    # (S,) index of that real patch
    reference_nn: np.ndarray          # (Q,) real-real nearest-neighbour values
    percentile: np.ndarray            # (S,) % of real-real NN values at least as close (midrank)
    init_value: np.ndarray | None = None  # (S,) value to the own initialisation patch
    #: (S,) value to the ``uniqueness_rank``-th nearest DISTINCT real patch (exact duplicates counted once);
    #: a synthetic patch whose nearest real patch is no closer than that does not single one patch out
    synthetic_kth: np.ndarray | None = None
    kth_rank: int = 0

    def closeness(self, v: np.ndarray) -> np.ndarray:
        """Values turned into distances (lower = closer) for any metric."""
        return -np.asarray(v, dtype=np.float64) if self.higher_is_closer else np.asarray(v, dtype=np.float64)

    def reference_threshold(self, pct: float) -> float:
        """The value at the real-real ``pct``-th percentile of closeness (in the metric's units)."""
        d = np.percentile(self.closeness(self.reference_nn), pct)
        return float(-d if self.higher_is_closer else d)

    def fraction_closer_than(self, pct: float) -> float:
        """Fraction of synthetic patches strictly closer than the real-real ``pct``-th percentile."""
        thr = np.percentile(self.closeness(self.reference_nn), pct)
        return float(np.mean(self.closeness(self.synthetic_nn) < thr)) if len(self.synthetic_nn) else 0.0

    def closest(self) -> int:
        """Index of the synthetic patch closest to any real patch."""
        return int(np.argmin(self.closeness(self.synthetic_nn)))

    def summary(self) -> dict[str, Any]:
        i = self.closest()
        out = {
            "closest_synthetic": i,
            "closest_real": int(self.synthetic_nn_index[i]),
            "closest_value": float(self.synthetic_nn[i]),
            "closest_percentile": float(self.percentile[i]),
            "median_value": float(np.median(self.synthetic_nn)),
            "reference_p1": self.reference_threshold(1.0),
            "reference_p5": self.reference_threshold(5.0),
            "reference_median": self.reference_threshold(50.0),
            "fraction_below_p1": self.fraction_closer_than(1.0),
            "fraction_below_p5": self.fraction_closer_than(5.0),
        }
        if self.init_value is not None:
            out["median_to_init"] = float(np.median(self.init_value))
        return out

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for s in range(len(self.synthetic_nn)):
            r = {"nn_index": int(self.synthetic_nn_index[s]), "nn_value": float(self.synthetic_nn[s]),
                 "percentile": float(self.percentile[s])}
            if self.init_value is not None:
                r["init_value"] = float(self.init_value[s])
            if self.synthetic_kth is not None:
                r["kth_value"] = float(self.synthetic_kth[s])
            rows.append(r)
        return rows


@dataclass
class MemorisationResult:
    """All metrics' nearest-neighbour results for one synthetic set against one real set."""

    metrics: dict[str, MetricResult]
    n_synthetic: int
    n_real: int
    reference_indices: np.ndarray
    init_indices: np.ndarray | None
    encoder: str

    def summary(self) -> dict[str, Any]:
        return {"n_synthetic": self.n_synthetic, "n_real": self.n_real, "n_reference": int(len(self.reference_indices)),
                "encoder": self.encoder, "init_indices_known": self.init_indices is not None,
                **{m: r.summary() for m, r in self.metrics.items()}}

    def per_synthetic(self) -> list[dict[str, Any]]:
        """One row per synthetic patch: each metric's NN index, value and percentile."""
        out = []
        for s in range(self.n_synthetic):
            row: dict[str, Any] = {"synthetic": s}
            if self.init_indices is not None:
                row["init_index"] = int(self.init_indices[s])
            for m, r in self.metrics.items():
                for k, v in r.rows()[s].items():
                    row[f"{m}_{k}"] = v
            out.append(row)
        return out


def percentile_in(reference: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Midrank percentile (0-100) of each value among ``reference`` (both as distances)."""
    ref = np.sort(np.asarray(reference, dtype=np.float64))
    v = np.asarray(values, dtype=np.float64)
    lo = np.searchsorted(ref, v, side="left")
    hi = np.searchsorted(ref, v, side="right")
    return 100.0 * (lo + 0.5 * (hi - lo)) / max(1, len(ref))


INIT_INDEX_KEYS = ("init_indices", "init_real_indices", "init_source_indices", "source_indices")


def _data_sha256(real: PatchSet) -> str:
    """The distiller's fingerprint of a real set (images, labels, slide indices)."""
    try:
        from histodd_fed.content_hash import data_hash
    except ImportError:  # pragma: no cover - distillation not installed
        return ""
    return data_hash(real)


def init_indices_from_meta(synthetic: PatchSet, real: PatchSet) -> np.ndarray | None:
    """Per-synthetic indices of the real patch each synthetic patch started from, when known.

    Read from the set's meta: the distiller's ``init_source_indices`` (only when its config says
    ``init: real``; with ``init: noise`` the recorded indices are not starting points), a coreset's
    ``source_indices`` (a coreset patch *is* its source patch), or ``init_indices``. Used only when
    they refer to this ``real`` set: one index per synthetic patch, in range, and matching the
    recorded source size / data hash when those are recorded. Otherwise the column is skipped.
    """
    meta = synthetic.meta or {}
    key = next((k for k in INIT_INDEX_KEYS if meta.get(k) is not None), None)
    if key is None:
        return None
    if key == "init_source_indices" and str((meta.get("config") or {}).get("init", "real")) != "real":
        log.info("synthetic set was initialised from %s; no init column", (meta.get("config") or {}).get("init"))
        return None
    try:
        idx = np.asarray(meta[key], dtype=np.int64).ravel()
    except (TypeError, ValueError):
        log.warning("synthetic meta %s is not a list of ints; skipping the init column", key)
        return None
    size = meta.get("source_num_images", meta.get("source_size"))
    if idx.shape != (len(synthetic),) or (idx >= len(real)).any() or (idx < 0).all() or \
            (size is not None and int(size) != len(real)):
        log.warning("synthetic meta %s does not refer to this real set (%d synthetic, %d real, recorded source size %s); "
                    "skipping the init column", key, len(synthetic), len(real), size)
        return None
    recorded = meta.get("source_data_sha256")
    if recorded and _data_sha256(real) not in ("", recorded):
        log.warning("real set differs from the one the synthetic set was distilled from (data hash); skipping the init column")
        return None
    return idx


def _ssim_nn(index: SSIMIndex, queries: torch.Tensor, candidates: torch.Tensor | None,
             desc: str) -> tuple[np.ndarray, np.ndarray]:
    """Max SSIM (and its reference index) of each query over its candidate rows (all when None)."""
    best = np.zeros(len(queries))
    arg = np.zeros(len(queries), dtype=np.int64)
    for q in progress(range(len(queries)), desc=desc, leave=False):
        rows = None if candidates is None else candidates[q]
        s = index.against(queries[q], rows)
        j = int(torch.argmax(s))
        best[q] = float(s[j])
        arg[q] = int(j if rows is None else rows[j])
    return best, arg


def kth_distinct(d: torch.Tensor, k: int) -> np.ndarray:
    """Per row of a distance matrix, the ``k``-th smallest DISTINCT value (1 = the minimum).

    Byte-identical real patches (PCam's train folder repeats 199 groups) lie at exactly the same
    distance from any query, so counting equal values once counts each distinct image once. Rows with
    fewer distinct values give their largest.
    """
    if k < 1:
        raise ValueError(f"uniqueness rank must be >= 1, got {k}")
    m = min(d.shape[1], k + 64)
    vals = torch.topk(d, m, dim=1, largest=False).values.numpy().astype(np.float64)
    out = np.empty(len(vals))
    for i, row in enumerate(vals):
        u = np.unique(row)
        out[i] = u[min(k, len(u)) - 1]
    return out


def _metric(name: str, syn_val: np.ndarray, syn_idx: np.ndarray, ref_val: np.ndarray,
            init_val: np.ndarray | None) -> MetricResult:
    hic = HIGHER_IS_CLOSER[name]
    sign = -1.0 if hic else 1.0
    pct = percentile_in(sign * ref_val, sign * syn_val)
    return MetricResult(name, hic, syn_val, syn_idx, ref_val, pct, init_val)


def _matrix_metric(name: str, m_sr: torch.Tensor, m_qr: torch.Tensor, ref_t: torch.Tensor,
                   init_idx: np.ndarray | None, exclude: torch.Tensor | None = None) -> MetricResult:
    """Nearest-neighbour result from all-pairs matrices: synthetic x real and reference x real.

    ``m_qr`` row ``q`` is reference patch ``ref_t[q]`` against every real patch; its own column is
    excluded (a real patch is not its own neighbour), and so are the ``exclude`` pairs (its exact copies).
    """
    hic = HIGHER_IS_CLOSER[name]
    m_qr = m_qr.clone()
    m_qr[torch.arange(len(ref_t)), ref_t] = -float("inf") if hic else float("inf")
    if exclude is not None:
        m_qr[exclude] = -float("inf") if hic else float("inf")
    val, idx = m_sr.max(1) if hic else m_sr.min(1)
    ref = m_qr.max(1).values if hic else m_qr.min(1).values
    init = None
    if init_idx is not None:
        init = np.array([float(m_sr[s, i]) if i >= 0 else np.nan for s, i in enumerate(init_idx)])
    return _metric(name, val.numpy().astype(np.float64), idx.numpy(), ref.numpy().astype(np.float64), init)


def real_real_l2(xr: torch.Tensor, reference_size: int, seed: int) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """The real-real reference: ``reference_size`` real patches drawn with ``seed`` (sorted indices), their
    normalised L2 to every real patch with self and exact copies set to inf, and the exact-copy mask."""
    nq = min(reference_size, len(xr))
    ref_idx = np.sort(np.random.default_rng(seed).choice(len(xr), nq, replace=False))
    ref_t = torch.from_numpy(ref_idx)
    d_qr = normalised_l2_matrix(xr[ref_t], xr)
    d_qr[torch.arange(nq), ref_t] = float("inf")  # a real patch is not its own neighbour
    # Nor are its exact copies: data sets repeat patches (PCam's train folder holds 199 groups of
    # byte-identical patches, 4% of it); left in, the real-real p1 L2 is 0 and the structure p99 is 1,
    # and the L2 and structure rules could never fire.
    dup = d_qr == 0
    d_qr[dup] = float("inf")
    return ref_idx, d_qr, dup


@dataclass
class _RealSide:
    """What the memorisation audit computes from the real patches alone - the same for every synthetic set audited
    against them (a distillation's candidate checks, then its export gate, in one process)."""

    xr: torch.Tensor
    ref_idx: np.ndarray
    d_qr: torch.Tensor
    dup: torch.Tensor
    index: SSIMIndex
    ssim_ref: np.ndarray
    vr: torch.Tensor | None = None
    structure_qr: torch.Tensor | None = None
    encoder: nn.Module | None = None
    fr: torch.Tensor | None = None
    cosine_qr: torch.Tensor | None = None

    def trained_encoder(self, real: PatchSet, cfg: MemorisationConfig, seed: int) -> tuple[nn.Module, torch.Tensor,
                                                                                            torch.Tensor]:
        """The audit's own encoder trained on ``real`` (seeded; once), its real features and reference distances."""
        if self.encoder is None:
            log.info("training a %s encoder on %d real patches (%d epochs)", cfg.encoder.model, len(real),
                     cfg.encoder.epochs)
            self.encoder = train_model(cfg.encoder, real, seed=seed, desc="encoder")
            self.fr = extract_features(self.encoder, self.xr)
            self.cosine_qr = cosine_distance_matrix(self.fr[torch.from_numpy(self.ref_idx)], self.fr)
        return self.encoder, self.fr, self.cosine_qr


#: the real sides of the last few references audited against in this process, by content (a pure memo: the same
#: patches, settings and seed give the same side; at most REAL_SIDES_KEPT are held, ~100 MB each for 2,000 patches)
_REAL_SIDES: "OrderedDict[tuple, _RealSide]" = OrderedDict()
REAL_SIDES_KEPT = 4


def _real_side(real: PatchSet, cfg: MemorisationConfig, seed: int) -> _RealSide:
    h = hashlib.sha256(repr((real.images.shape, real.images.dtype.str)).encode())
    h.update(np.ascontiguousarray(real.images).tobytes())
    h.update(np.ascontiguousarray(real.labels, dtype=np.int64).tobytes())
    key = (h.hexdigest(), repr(cfg), int(seed))
    if key in _REAL_SIDES:
        _REAL_SIDES.move_to_end(key)
        return _REAL_SIDES[key]
    xr, _ = real.to_tensors()
    ref_idx, d_qr, dup = real_real_l2(xr, cfg.reference_size, seed)
    ref_t = torch.from_numpy(ref_idx)
    index = SSIMIndex(xr, cfg.ssim_window, cfg.ssim_sigma)
    k = min(cfg.ssim_candidates, len(real) - 1)
    ssim_ref, _ = _ssim_nn(index, xr[ref_t], torch.topk(d_qr, k, largest=False).indices, "ssim real-real")
    side = _RealSide(xr, ref_idx, d_qr, dup, index, ssim_ref)
    if cfg.structure_metric:
        side.vr = structure_vectors(xr, cfg.structure_pool)
        side.structure_qr = (side.vr[ref_t] @ side.vr.T).float()
    _REAL_SIDES[key] = side
    while len(_REAL_SIDES) > REAL_SIDES_KEPT:
        _REAL_SIDES.popitem(last=False)
    return side


def analyse_memorisation(synthetic: PatchSet, real: PatchSet, config: MemorisationConfig | None = None, *,
                         encoder: nn.Module | None = None, seed: int = 0) -> MemorisationResult:
    """Nearest real patch of every synthetic patch, in context of the real-real NN distribution.

    The real-real side (reference draw, SSIM index, real-real nearest neighbours, the audit's encoder) depends on
    ``real``, the settings and ``seed`` only, and is reused from the last few calls of this process."""
    cfg = config or MemorisationConfig()
    if len(real) < 2:
        raise ValueError("memorisation audit needs at least 2 real patches")
    xs, _ = synthetic.to_tensors()
    side = _real_side(real, cfg, seed)
    xr, ref_idx, d_qr, dup = side.xr, side.ref_idx, side.d_qr, side.dup
    ref_t = torch.from_numpy(ref_idx)
    init_idx = init_indices_from_meta(synthetic, real)

    # ---- normalised L2: exact everywhere
    d_sr = normalised_l2_matrix(xs, xr)
    l2_val, l2_idx = d_sr.min(1)
    l2_ref = d_qr.min(1).values
    init_l2 = None
    if init_idx is not None:
        init_l2 = np.array([float(d_sr[s, i]) if i >= 0 else np.nan for s, i in enumerate(init_idx)])
    metrics = {"l2": _metric("l2", l2_val.numpy().astype(np.float64), l2_idx.numpy(), l2_ref.numpy().astype(np.float64),
                             init_l2)}
    metrics["l2"].synthetic_kth, metrics["l2"].kth_rank = kth_distinct(d_sr, cfg.uniqueness_rank), cfg.uniqueness_rank

    # ---- SSIM: exact for synthetic-vs-real when affordable, L2 candidates otherwise
    index = side.index
    k = min(cfg.ssim_candidates, len(real) - 1)
    cand_s = None if len(xs) * len(xr) <= cfg.ssim_exact_max_pairs else torch.topk(d_sr, k, largest=False).indices
    ssim_val, ssim_idx = _ssim_nn(index, xs, cand_s, "ssim synthetic")
    init_ssim = None
    if init_idx is not None:
        init_ssim = np.array([float(index.against(xs[s], torch.tensor([i]))[0]) if i >= 0 else np.nan
                              for s, i in enumerate(init_idx)])
    metrics["ssim"] = _metric("ssim", ssim_val, ssim_idx, side.ssim_ref, init_ssim)

    # ---- structure: correlation of low-passed grey images, exact everywhere
    if cfg.structure_metric:
        vs = structure_vectors(xs, cfg.structure_pool)
        metrics["structure"] = _matrix_metric("structure", (vs @ side.vr.T).float(), side.structure_qr,
                                              ref_t, init_idx, dup)

    # ---- feature cosine distance
    enc_name = "none"
    if cfg.feature_metric:
        if encoder is None:
            encoder, fr, cosine_qr = side.trained_encoder(real, cfg, seed)
            enc_name = f"{cfg.encoder.model} trained {cfg.encoder.epochs} epochs on the real patches"
        else:
            enc_name = f"given {type(encoder).__name__}"
            fr = extract_features(encoder, xr)
            cosine_qr = cosine_distance_matrix(fr[ref_t], fr)
        fs = extract_features(encoder, xs)
        metrics["cosine"] = _matrix_metric("cosine", cosine_distance_matrix(fs, fr), cosine_qr, ref_t, init_idx, dup)

    return MemorisationResult(metrics=metrics, n_synthetic=len(synthetic), n_real=len(real),
                              reference_indices=ref_idx, init_indices=init_idx, encoder=enc_name)
