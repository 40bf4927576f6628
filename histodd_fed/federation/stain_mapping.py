"""Set-level Macenko stain mapping of patch sets: a received set into a target centre's colours
(:func:`stain_normalise_to`), or any set to the reference H&E stains (:func:`normalise_to_reference`).
One stain description per set (:func:`set_stains`), so relative darkness between images is kept."""

from __future__ import annotations

from typing import Any

import numpy as np

from histodd_fed.patchset import PatchSet


def set_stains(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """One Macenko stain description of a whole patch set: ``(matrix (3, 2), max_conc (2,), n_est, template)``.

    Per-image estimates (:func:`histodd_fed.stain.macenko.estimate_stains`) of the images with enough
    tissue are pooled by their median (columns renormalised to unit length); ``template`` is
    :func:`~histodd_fed.stain.macenko.choose_template`'s image, whose estimate is used when no image
    has enough tissue (and the reference H&E stains when even that one has none).
    """
    from histodd_fed.stain import macenko

    t = macenko.choose_template(images)
    mats, maxc, ok = macenko.estimate_stains(images)
    if not ok.any():
        return mats[t].astype(np.float64), maxc[t].astype(np.float64), 0, t
    m = np.median(mats[ok].astype(np.float64), axis=0)
    m = m / np.maximum(np.linalg.norm(m, axis=0, keepdims=True), 1e-6)
    return m, np.median(maxc[ok].astype(np.float64), axis=0), int(ok.sum()), t


def stain_normalise_to(received: PatchSet, own: PatchSet) -> tuple[PatchSet, dict[str, Any]]:
    """``received`` Macenko-normalised into the colour space of ``own`` (the target's train patches).

    Set-level mapping: the received set's pooled stain matrix and max concentrations
    (:func:`set_stains`) -> the target's pooled ones. Every received image's concentrations under the
    SOURCE matrix are scaled by ``max_target / max_source`` (one factor per stain for the whole set, so
    relative darkness between images - a tumour cue - is kept, unlike per-image max scaling) and
    recomposed with the TARGET matrix. Images without tissue (background) are left unchanged.
    """
    from histodd_fed.stain import macenko

    tm, tmax, t_n, t_idx = set_stains(own.images)
    sm, smax, s_n, _ = set_stains(received.images)
    _, _, ok = macenko.estimate_stains(received.images)
    out = received.images.copy()
    h, w = received.images.shape[1:3]
    scale = tmax / np.maximum(smax, 1e-3)
    for i in np.flatnonzero(ok):
        conc = macenko.concentrations(received.images[i], sm) * scale
        out[i] = np.round(macenko.od_to_rgb(conc @ tm.T)).reshape(h, w, 3).astype(np.uint8)
    res = received.subset(np.arange(len(received)))
    res.images = out
    res.meta = dict(received.meta, stain_normalised_to="target")
    info = {"received_stain": "macenko->target", "stain_target_images": t_n, "stain_template_index": int(t_idx),
            "stain_normalised_images": int(ok.sum()), "stain_unchanged_images": int((~ok).sum()),
            "stain_scale": [round(float(v), 4) for v in scale]}
    return res, info


def normalise_to_reference(ps: PatchSet, stats_from: PatchSet) -> tuple[PatchSet, dict[str, Any]]:
    """``ps`` mapped to the reference H&E stains, set-level: concentrations under the pooled stain
    matrix of ``stats_from`` (:func:`set_stains`; the centre's own train patches for its own data, the
    received set itself for received data) scaled by one factor per stain (reference / pooled 99th
    percentile) and recomposed with the reference matrix. Background images are left unchanged."""
    from histodd_fed.stain import macenko

    sm, smax, _, _ = set_stains(stats_from.images)
    _, _, ok = macenko.estimate_stains(ps.images)
    scale = macenko.REFERENCE_MAX_CONC / np.maximum(smax, 1e-3)
    out = ps.images.copy()
    h, w = ps.images.shape[1:3]
    for i in np.flatnonzero(ok):
        conc = macenko.concentrations(ps.images[i], sm) * scale
        out[i] = np.round(macenko.od_to_rgb(conc @ macenko.REFERENCE_STAINS.T)).reshape(h, w, 3).astype(np.uint8)
    res = ps.subset(np.arange(len(ps)))
    res.images = out
    res.meta = dict(ps.meta, stain_normalised_to="reference")
    return res, {"input_stain": "macenko->reference", "stain_scale": [round(float(v), 4) for v in scale],
                 "stain_normalised_images": int(ok.sum())}
