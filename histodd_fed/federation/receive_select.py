"""A target's rows beyond one source's set under a fixed protocol (issue 23; patch level).

- **Pooled rows**: several sources into one target (``StudyConfig.sources``). The coordinator lists
  every source's set of one kind (``ipc10``, ``full``) under ONE row; the target opens each bundle
  (verified, ledger-checked), prepares each set as it would alone (resize, stain handling), pools
  them and fine-tunes once. The row's labels (sources, mode, ipc) come from the opened manifests: a
  row whose bundles were sealed as different rows, or with a source twice, is refused.
- **Slide level**: a row's ``slides`` bundles (per-slide synthetic sets; a Full's real pseudo-slides) are
  pooled the same way (slide tables merged) and fine-tune the target's MIL head on its own slide data
  (:meth:`Prepared.slide_sets`), scored on its test slides; the head's epochs are the request's, not chosen.
- **Protocol chosen on the target's own validation split** (preset ``select_grid``): each candidate
  (epochs, received share, lr scale) of the union protocol is fine-tuned on the target's own train patches
  minus a stratified validation split and scored there (balanced accuracy, then AUC); the best is
  fine-tuned on ALL own train patches and scored on the test split - which no choice ever reads.
  "No transfer" chooses its epochs the same way.

Both are cached under the centre's work directory like :mod:`fine_tuning`'s rows (a bundle opens only
once; a cached row re-verifies its senders against the current trust store).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from histodd_fed.atomic import atomic_write_json
from histodd_fed.errors import HistoddError, InputError
from histodd_fed.federation.centre_bundles import open_received_bundle, provenance, recheck_senders
from histodd_fed.federation.centre_config import CentreConfig
from histodd_fed.federation.centre_data import Prepared, one_thread
from histodd_fed.federation.envelope import Envelope, ProtocolError, bundle_rows
from histodd_fed.federation.presets import CentrePreset
from histodd_fed.patchset import PatchSet
from histodd_fed.runconfig import config_hash

PATCH_PARTS = ("patch", "both")


def row_bytes(request: Envelope, items: list[dict[str, Any]]) -> dict[str, int]:
    """A row's bytes received: ``bytes`` (every bundle of the row) and ``patch_bytes`` (its patch-level part; the
    rest is its per-slide part), so a row's size can be set against Full's with or without the slide sets."""
    size = {str(i["name"]): len(request.blobs[str(i["name"])]) for i in items}
    return {"bytes": sum(size.values()),
            "patch_bytes": sum(size[str(i["name"])] for i in items if str(i.get("part") or "both") in PATCH_PARTS)}


class NoPatchSetError(InputError):
    """A row the target cannot fine-tune: it has no patch-level set (its source's patch set was blocked by the
    export gate, over its release budget or not sent) - only a per-slide set. Its fixed reply message says so
    (reply_errors.FIXED_MESSAGES), not "could not read its data"."""

    def __init__(self, msg: str = "row has no patch-level set (pooled / selected rows need one)") -> None:
        super().__init__(msg)


def applies(preset: CentrePreset, request: Envelope) -> bool:
    """True when this module answers the train request: the preset chooses its protocol on a validation
    split, or a row carries patch sets of several sources (pooled)."""
    if preset.select_grid:
        return True
    per_row: dict[str, int] = {}
    for item in request.body.get("bundles", []) or []:
        if isinstance(item, dict) and str(item.get("part") or "both") in PATCH_PARTS:
            key = str(item.get("row") or item.get("name"))
            per_row[key] = per_row.get(key, 0) + 1
    return any(n > 1 for n in per_row.values())


def train_rows(cfg: CentreConfig, preset: CentrePreset, prepared: Prepared, request: Envelope,
               epochs: int) -> list[dict[str, Any]]:
    """The train action's rows (``CentreNode.train`` hands the request here when :func:`applies`)."""
    from histodd_fed.federation import fine_tuning
    from histodd_fed.federation.reply_errors import error_fields

    rows: list[dict[str, Any]] = []
    if request.body.get("baseline", True):
        if preset.select_grid:
            rows.append(baseline_row(cfg, preset, prepared, epochs=epochs))
        else:
            rows.extend(fine_tuning.evaluate_baseline(cfg, preset.for_protocol(p), prepared, epochs=epochs)
                        for p in preset.protocols())
    jobs: dict[str, tuple] = {}
    heads: dict[str, dict[str, Any]] = {}
    for row_name, items in bundle_rows(request).items():
        heads[row_name] = {"name": row_name, **row_bytes(request, items), "bundles": [str(i["name"]) for i in items]}
        if not any(str(i.get("part") or "both") in PATCH_PARTS for i in items):
            exc = NoPatchSetError()
            heads[row_name].update(ok=False, **error_fields(exc, cfg.centre_id, f"train row {row_name}"))
            continue
        jobs[row_name] = (cfg, preset, [request.blobs[str(i["name"])] for i in items], epochs, row_name)
    done: dict[str, tuple[dict[str, Any] | None, dict[str, Any] | None]] = {}
    if rows_in_parallel(cfg, len(jobs)):  # one spawned process per row at a time, one torch thread each
        from histodd_fed.worker_pool import run_in_processes

        run_in_processes(row_job, jobs, workers=cfg.workers, on_result=done.__setitem__,
                         name=lambda k: f"train row {k}")
    else:
        done = {k: row_job(*args, prepared=prepared) for k, args in jobs.items()}
    for row_name, row in heads.items():
        if row_name in done:
            res, err = done[row_name]
            row.update({**res, "ok": True} if err is None else dict(ok=False, **err))
        rows.append(row)
    return rows


def rows_in_parallel(cfg: CentreConfig, n_rows: int) -> bool:
    """Fine-tune rows in ``cfg.workers`` processes: when there are several rows and workers, and the keys' passphrase
    is not read from an inherited file descriptor (a spawned process has none)."""
    return cfg.workers > 1 and n_rows > 1 and not str(cfg.key_passphrase).startswith("fd:")


def row_job(cfg: CentreConfig, preset: CentrePreset, blobs: list[bytes], epochs: int, row_name: str, *,
            prepared: Prepared | None = None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """One row's fine-tune (:func:`fine_tune_row`) and its labels (:func:`pooled_labels`), here or in a worker
    process (which prepares the centre's data from its cache): ``(result, None)``, or ``(None, error fields)`` for
    a refused row (the others go on). One torch thread either way: a row's numbers do not depend on ``workers``."""
    from histodd_fed.federation import centre_data
    from histodd_fed.federation.reply_errors import error_fields

    try:
        if prepared is None:
            prepared = centre_data.prepare(cfg, preset)
        res = fine_tune_row(cfg, preset, prepared, blobs, epochs=epochs)
        return {**res, **pooled_labels(res.get("received_from") or [])}, None
    except HistoddError as exc:
        return None, error_fields(exc, cfg.centre_id, f"train row {row_name}")


def pooled_labels(received: list[dict[str, Any]]) -> dict[str, Any]:
    """Row labels from the opened manifests of one row's bundles (one or several sources)."""
    if not received:
        raise ProtocolError("row has no opened bundle to take its labels from")
    sealed = {str(r.get("row") or r.get("transfer")) for r in received}
    if len(sealed) != 1:
        raise ProtocolError(f"one row mixes bundles sealed as rows {sorted(sealed)}")
    sources = [str(r.get("source")) for r in received]
    if len(set(sources)) != len(sources):
        raise ProtocolError(f"one row holds two bundles of {sorted(s for s in sources if sources.count(s) > 1)[0]}")
    for r in received:
        if r.get("part") is not None and r["part"] not in PATCH_PARTS:
            raise ProtocolError(f"coordinator relayed {r.get('source')}'s {r['part']!r} bundle as a patch set")
    kinds = {r.get("kind") for r in received}
    modes = {"full" if k == "real" else "coreset" if k == "coreset" else "synthetic" for k in kinds}
    if len(modes) != 1:
        raise ProtocolError(f"one row mixes kinds {sorted(map(str, kinds))}")
    mode = modes.pop()
    src = "+".join(sorted(sources))
    out: dict[str, Any] = {"source": src, "sources": sorted(sources), "mode": mode, "name": f"{src}-{sealed.pop()}",
                           "ipc": None if mode == "full" else received[0].get("ipc"),
                           "sign_key_ids": sorted({str(r.get("sign_key_id")) for r in received}),
                           "bundle_ids": [r.get("bundle_id") for r in received]}
    totals = [r.get("train_total") for r in received]
    if all(t is not None for t in totals):
        out["train_total"] = int(sum(int(t) for t in totals))
    return out


# ---------------------------------------------------------------------------- the validation split
def val_split(train: PatchSet, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, val) indices of the target's own train patches: ``fraction`` of every class (at least one)
    held out, seeded; InputError when a class has fewer than two patches."""
    rng = np.random.default_rng([int(seed), 23])
    val = []
    for c in np.unique(train.labels):
        idx = np.flatnonzero(train.labels == c)
        if len(idx) < 2:
            raise InputError(f"select_grid: class {train.class_names[c]!r} has {len(idx)} own train patch(es); "
                             "a validation split needs at least 2 per class")
        k = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        val.append(rng.choice(idx, k, replace=False))
    is_val = np.zeros(len(train), dtype=bool)
    is_val[np.concatenate(val)] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def fit_classifier(prepared: Prepared, preset: CentrePreset, fit: np.ndarray, seed: int) -> Path:
    """The target's classifier pre-trained as prepare does, on the ``fit`` patches only (cached in the
    prepared folder). Candidates start from it: the centre's own classifier has seen the validation
    patches, which favours the candidates that move it least (few epochs, low lr, little received data)."""
    from histodd_fed.federation.centre_data import pretrain_classifier, save_pretrained

    key = config_hash({"fit": [int(i) for i in fit], "seed": int(seed), "prepared": prepared.config_hash})[:16]
    out = prepared.root / "select-classifiers" / key
    if not (out / "model.json").exists():
        train = prepared.train.subset(fit)
        save_pretrained(pretrain_classifier(train, preset, seed), out, preset, train)
    return out


def _union(preset: CentrePreset, share: float, lr_scale: float | None = None) -> CentrePreset:
    return replace(preset, fine_tune_protocol="union", also_protocols=(), received_share=float(share), select_grid=(),
                   fine_tune_lr_scale=preset.fine_tune_lr_scale if lr_scale is None else float(lr_scale))


def choose(prepared: Prepared, preset: CentrePreset, received: PatchSet | None, *, seed: int) -> dict[str, Any]:
    """The candidate of ``preset.select_grid`` scoring best on the validation split of the own train data.

    Each candidate is (epochs, received share, lr scale: the fine-tuning lr is ``fine_tune_lr`` x it).
    Without received data only the epochs and the lr scale matter (the share has nothing to draw). Returns
    ``{"epochs", "received_share", "lr_scale", "candidates": [{epochs, received_share, lr_scale, val_bal_acc,
    val_auc}], "val_patches", "fit_patches", "seconds"}``.
    """
    from histodd_fed.federation.fine_tuning import fine_tune_and_score

    t0 = time.perf_counter()
    if len(preset.select_grid) == 1:  # a fixed protocol: nothing to choose, no validation split spent
        e, share, lr = preset.fixed_protocol(0)
        return {"epochs": int(e), "received_share": float(share), "lr_scale": float(lr), "fixed": True,
                "candidates": [{"epochs": int(e), "received_share": float(share), "lr_scale": float(lr)}],
                "val_patches": 0, "fit_patches": int(len(prepared.train)), "seconds": 0.0}
    fit, val = val_split(prepared.train, preset.select_val_fraction, seed)
    view = replace(prepared, train=prepared.train.subset(fit), test=prepared.train.subset(val),
                   classifier_dir=fit_classifier(prepared, preset, fit, seed))
    grid = list(preset.select_grid)
    if received is None:
        grid = [(e, preset.received_share, lr) for e, lr in dict.fromkeys((e, lr) for e, _, lr in grid)]
    cands = []
    for e, share, lr in grid:
        m, _ = fine_tune_and_score(view, _union(preset, share, lr), received, epochs=e, seed=seed)
        cands.append({"epochs": int(e), "received_share": float(share), "lr_scale": float(lr),
                      "val_bal_acc": round(float(m["patch_balanced_accuracy"]), 4),
                      "val_auc": round(float(m["patch_auc"]), 4)})
    best = max(range(len(cands)), key=lambda i: (cands[i]["val_bal_acc"], cands[i]["val_auc"], -i))
    return {"epochs": cands[best]["epochs"], "received_share": cands[best]["received_share"],
            "lr_scale": cands[best]["lr_scale"], "candidates": cands,
            "val_patches": int(len(val)), "fit_patches": int(len(fit)),
            "seconds": round(time.perf_counter() - t0, 2)}


def _final(prepared: Prepared, preset: CentrePreset, received: PatchSet | None, *, epochs: int,
           seed: int, slides: PatchSet | None = None, slide_epochs: int | None = None) -> dict[str, Any]:
    """Choose (when the preset says so), then fine-tune on all own train patches and score on the test split.

    Slide level (the centre has slide data, :attr:`Prepared.has_mil`): the MIL head fine-tuned on the
    received slide set ``slides`` (None: own slides only, the "no transfer" row) with the request's
    ``slide_epochs`` and the preset's received share - nothing of it is chosen on the validation split -
    and scored on the centre's test slides (:func:`fine_tuning.slide_fine_tune`). A transfer row (``received``
    given) without a slide set has no slide columns (an own-slides-only number there would pass for the row's)."""
    from histodd_fed.federation.fine_tuning import fine_tune_scored_model, slide_fine_tune

    out: dict[str, Any] = {}
    use = preset.for_protocol(preset.fine_tune_protocol)
    if preset.select_grid:
        sel = choose(prepared, preset, received, seed=seed)
        epochs, use = sel["epochs"], _union(preset, sel["received_share"], sel["lr_scale"])
        out.update(selection=sel, select_seconds=sel["seconds"],
                   protocol_chosen_on="fixed by the preset" if sel.get("fixed") else
                   f"validation split of own train ({sel['val_patches']} patches)")
    t0 = time.perf_counter()
    metrics, info, model = fine_tune_scored_model(prepared, use, received, epochs=epochs, seed=seed)
    out.update(info)
    out.update(metrics)
    out.update(epochs=int(epochs), fine_tune_protocol=use.fine_tune_protocol,
               fine_tune_seconds=round(time.perf_counter() - t0, 2))
    if prepared.has_mil and (slides is not None or received is None):  # a transfer row needs a slide set
        ts = time.perf_counter()
        slide_epochs = int(epochs if slide_epochs is None else slide_epochs)
        slide_preset = _union(preset, preset.received_share)
        out.update(slide_fine_tune(prepared, slide_preset, slides, row_model=model, epochs=slide_epochs, seed=seed))
        out.update(slide_epochs=slide_epochs, slide_fine_tune_seconds=round(time.perf_counter() - ts, 2))
    return out


def _key(preset: CentrePreset) -> str:
    return config_hash({"protocol": preset.receive_protocol(), "version": "select-2"})[:8]


def baseline_row(cfg: CentreConfig, preset: CentrePreset, prepared: Prepared, *, epochs: int) -> dict[str, Any]:
    """"No transfer" with the epochs chosen on the validation split (own data only, the union protocol)."""
    b = dict(prepared.info.get("baseline", {}))
    cache = cfg.work_dir / "received" / f"own-select-{prepared.config_hash[:8]}-{_key(preset)}-s{cfg.seed}.json"
    if cache.exists():
        return {**json.loads(cache.read_text()), "cached": True}
    one_thread()
    row: dict[str, Any] = {"name": "none", "mode": "none", "ipc": None, "source": None, "ok": True,
                           "images": 0, "bytes": 0, "own_data_only": True}
    row.update({f"pretrained_{k}": v for k, v in b.items()})
    row.update(_final(prepared, preset, None, epochs=epochs, seed=cfg.seed, slide_epochs=epochs))
    atomic_write_json(cache, row)
    return {**row, "cached": False}


def fine_tune_row(cfg: CentreConfig, preset: CentrePreset, prepared: Prepared, blobs: list[bytes], *,
                  epochs: int) -> dict[str, Any]:
    """Open every bundle of the row, pool the patch sets (and the slide sets), fine-tune (choosing the
    protocol first when the preset says so), score on the test split. ``received_from``: each patch
    bundle's provenance; ``slides_received_from``: each slide bundle's.

    A bundle's part is read from its sealed manifest: ``patch`` / ``both`` sets fine-tune the classifier,
    ``slides`` sets (and ``both`` sets carrying a slide table) the MIL head. A row with slide sets but a
    target without slide data, or a target with slide data but no slide set in the row, keeps its patch
    columns and says why in ``slide_note``."""
    from histodd_fed.federation import slide_level
    from histodd_fed.federation.fine_tuning import prepare_received

    digests = sorted(hashlib.sha256(b).digest() for b in blobs)
    sha = hashlib.sha256(b"".join(digests)).hexdigest()
    cache = cfg.work_dir / "received" / f"pool-{sha[:32]}-{prepared.config_hash[:8]}-{_key(preset)}-e{epochs}.json"
    if cache.exists():
        recheck_senders(cfg, blobs)  # a sender revoked since: its cached metrics are not served
        return {**json.loads(cache.read_text()), "cached": True}
    one_thread()
    sets, slide_sets, received_from, slides_from, stains = [], [], [], [], []
    for b in blobs:
        ob = open_received_bundle(cfg, b)
        ps, prov = ob.patchset, provenance(ob)
        if list(ps.class_names) != list(prepared.train.class_names):
            raise InputError(f"received classes {ps.class_names} differ from ours {prepared.train.class_names}")
        ready, stain = prepare_received(ps, prepared, preset)
        part = str(prov.get("part") or "both")
        if part in PATCH_PARTS:
            sets.append(ready)
            stains.append(stain.get("received_stain") or stain.get("input_stain"))
            received_from.append(prov)
        if part == "slides" or (part == "both" and slide_level.has_slides(ready)):
            if part == "slides" and not slide_level.has_slides(ready):
                raise InputError(f"{prov.get('source')}'s slide set has no slide table")
            slide_sets.append(ready)
            if part == "slides":
                slides_from.append(prov)
    if not sets:
        raise NoPatchSetError()
    _check_slide_labels(received_from, slides_from)
    received = pool_sets(sets, list(prepared.train.class_names), [r.get("source") for r in received_from])
    slides = None
    note = None
    if slide_sets and prepared.has_mil:
        slides = pool_sets(slide_sets, list(prepared.train.class_names), [r.get("source") for r in received_from])
    elif slide_sets:
        note = "the target has no slide data: received slide sets not used"
    elif prepared.has_mil:
        note = ("no slide set received in this row (blocked by its source's export gate, over its release budget, "
                "or its source has no slide data: see the faults)")
    out = _final(prepared, preset, received, epochs=epochs, seed=cfg.seed, slides=slides, slide_epochs=epochs)
    out.update(images=len(received), kind=received.kind, received_from=received_from,
               received_stain=", ".join(sorted({str(s) for s in stains})),
               pooled_sources=len(received_from))
    if slides_from:
        out["slides_received_from"] = slides_from
    if note:
        out["slide_note"] = note
    atomic_write_json(cache, out)
    return {**out, "cached": False}


def _check_slide_labels(patch: list[dict[str, Any]], slides: list[dict[str, Any]]) -> None:
    """A row's slide bundles belong to it: the same sealed row, each from one of its patch bundles' sources,
    no source twice (ProtocolError otherwise)."""
    rows = {str(r.get("row") or r.get("transfer")) for r in patch}
    sources = {str(r.get("source")) for r in patch}
    seen: set[str] = set()
    for r in slides:
        src = str(r.get("source"))
        if str(r.get("row") or r.get("transfer")) not in rows:
            raise ProtocolError(f"{src}'s slide bundle was sealed as row {r.get('row')!r}, not {sorted(rows)}")
        if src not in sources or src in seen:
            raise ProtocolError(f"slide bundle of {src}: not one per source of this row's patch sets")
        seen.add(src)


def pool_sets(sets: list[PatchSet], class_names: list[str], sources: list[Any]) -> PatchSet:
    """One set of several received sets (one: as is). Slide tables are merged (slide ids kept, a repeated id
    prefixed by its position) so every slide stays its own bag."""
    if len(sets) == 1:
        return sets[0]
    kinds = {s.kind for s in sets}
    ids: list[str] = []
    labels: dict[str, int] = {}
    index = []
    for k, s in enumerate(sets):
        names = [sid if sid not in labels and sid not in ids else f"{k}:{sid}" for sid in s.slide_ids]
        offset = len(ids)
        index.append(np.where(s.slide_index >= 0, s.slide_index + offset, -1).astype(np.int32))
        ids.extend(names)
        labels.update({n: int(s.slide_labels[sid]) for n, sid in zip(names, s.slide_ids) if sid in s.slide_labels})
    return PatchSet(images=np.concatenate([s.images for s in sets]),
                    labels=np.concatenate([s.labels for s in sets]).astype(np.int64), class_names=list(class_names),
                    slide_index=np.concatenate(index), slide_ids=ids, slide_labels=labels,
                    kind=sets[0].kind if len(kinds) == 1 else "mixed", meta={"pooled_from": list(sources)})
