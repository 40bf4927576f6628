"""Slides -> one real :class:`~histodd_fed.patchset.PatchSet` ("patch store").

Each slide is tiled and labelled by :func:`~histodd_fed.slides.one_slide.tile_one_slide` (the grid at
the target resolution, the tissue threshold, labels from annotations or the slide label: see
:mod:`.one_slide`). This module runs the batch around it.

A slide that fails (unreadable, corrupt, no MPP) is logged as one line naming the file, listed in
``meta["skipped"]``, and the batch goes on. Each finished slide is kept as a shard in a hidden work
folder next to the store (``.<store>.work``), so an interrupted run resumes where it stopped; the
folder is removed after the store is written (``keep_work=True`` keeps it). The store also holds
``thumbnails/<slide_id>.png`` (tissue outline in blue, kept patches: green normal, red tumour),
``tile_report.json`` and ``run_config.json``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from histodd_fed.atomic import atomic_directory, atomic_write_bytes, atomic_write_json
from histodd_fed.errors import ConfigError, InputError
from histodd_fed.slides.annotations import find_annotation_file
from histodd_fed.slides.manifest import CLASS_NAMES, SlideRecord, read_manifest
from histodd_fed.slides.one_slide import TileConfig, tile_one_slide
from histodd_fed.slides.reader import list_slide_files

log = logging.getLogger(__name__)


@dataclass
class TileReport:
    """What :func:`tile_slides` did."""

    store: Path
    n_patches: int
    class_counts: dict[str, int]
    tiled: list[str]
    reused: list[str]
    skipped: list[dict[str, str]]
    per_slide: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["store"] = str(self.store)
        return d


# --------------------------------------------------------------------------- inputs
def collect_slides(slides: str | Path | Sequence[str | Path | SlideRecord],
                   labels_csv: str | Path | None = None
                   ) -> tuple[list[SlideRecord], Path | None, list[dict[str, str]]]:
    """Slide records from a folder, one file, a ``slides.csv``, or a list; labels from ``labels_csv``.

    Returns the records, the manifest path used (if any), and the problems found before any slide
    is opened (``{"slide_id", "path", "error"}``): manifest rows with an unknown label or split,
    manifest rows whose slide file does not exist. Those slides are left out; the batch goes on.
    """
    manifest = Path(labels_csv) if labels_csv is not None else None
    problems: list[dict[str, str]] = []
    if isinstance(slides, (str, Path)):
        p = Path(slides)
        if not p.exists():
            raise InputError(f"{p}: no such slide file or folder")
        if p.is_file() and p.suffix.lower() == ".csv":
            if manifest is not None and manifest.resolve() != p.resolve():
                raise InputError(f"{p}: give the manifest either as --slides or as --labels, not two")
            records = []
            for r in read_manifest(p, problems):
                if Path(r.path).is_file():
                    records.append(r)
                else:
                    problems.append({"slide_id": r.slide_id, "path": str(r.path),
                                     "error": f"{p}: slide {r.slide_id!r}: file {r.path} does not exist"})
            return records, p, problems
        paths = list_slide_files(p) if p.is_dir() else [p]
        if not paths:
            raise InputError(f"{p}: no slide files found (looked for {', '.join(('.svs', '.tiff', '.ndpi', '.mrxs', '.png', '...'))})")
        items: list[Any] = paths
    else:
        items = list(slides)
    by_id, by_name = {}, {}
    if manifest is not None:
        for r in read_manifest(manifest, problems):
            by_id[r.slide_id] = r
            by_name[Path(r.path).name] = r
    bad_ids = {q["slide_id"] for q in problems}
    records: list[SlideRecord] = []
    matched: set[str] = set()
    for it in items:
        if isinstance(it, SlideRecord):
            records.append(it)
            continue
        path = Path(it)
        sid = path.stem
        if sid in bad_ids:
            continue  # its manifest row is broken: already reported
        ref = by_id.get(sid) or by_name.get(path.name)
        if ref is not None:
            matched.add(ref.slide_id)
            records.append(SlideRecord(ref.slide_id, path, ref.label, ref.centre, ref.split))
        else:
            if manifest is not None:
                log.warning("%s: not in %s; label unknown, split train", path, manifest)
            records.append(SlideRecord(sid, path))
    if manifest is not None and isinstance(slides, (str, Path)) and Path(slides).is_dir():
        for sid, r in by_id.items():
            if sid not in matched:
                problems.append({"slide_id": sid, "path": str(r.path),
                                 "error": f"{manifest}: slide {sid!r} is listed but no file for it is in {slides}"})
    ids = [r.slide_id for r in records]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"duplicate slide ids {dup}: slide file names (stems) must be unique")
    return records, manifest, problems


def annotation_dirs(record: SlideRecord, annotations_dir: Path | None, manifest: Path | None) -> list[Path]:
    """Folders searched for ``<slide_id>.xml|.geojson|.json``, in order."""
    if annotations_dir is not None:
        return [Path(annotations_dir)]
    dirs = [Path(record.path).parent, Path(record.path).parent / "annotations"]
    if manifest is not None:
        dirs.append(manifest.parent / "annotations")
    return dirs


# --------------------------------------------------------------------------- shards
def _fingerprint(record: SlideRecord, cfg: TileConfig, ann_dirs: list[Path]) -> str:
    p = Path(record.path)
    st = p.stat() if p.exists() else None
    ann = find_annotation_file(record.slide_id, ann_dirs)
    ast = ann.stat() if ann else None
    blob = json.dumps({
        "cfg": asdict(cfg), "path": str(p.resolve()), "size": st.st_size if st else None,
        "mtime": st.st_mtime_ns if st else None, "label": record.label,
        "ann": [str(ann), ast.st_size, ast.st_mtime_ns] if ann else None,
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _shard_paths(work: Path, slide_id: str) -> tuple[Path, Path, Path, Path]:
    """(images .npy, labels+coords .npz, thumbnail .png, done-marker .json) of one slide's shard."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in slide_id)
    return work / f"{safe}.images.npy", work / f"{safe}.npz", work / f"{safe}.png", work / f"{safe}.json"


def _tile_to_shard(record: SlideRecord, cfg: TileConfig, ann_dirs: list[Path], work: str, fp: str) -> dict:
    """Worker entry: tile one slide into a shard; return ``{"ok": info}`` or ``{"error": line}``.

    Every shard file is written under a temporary name and renamed; the ``.json`` marker comes
    last, so a killed run leaves either a complete shard or one that is not trusted.
    """
    imgs, npz, png, js = _shard_paths(Path(work), record.slide_id)
    tmp_imgs = imgs.with_name(f".{imgs.name}.{os.getpid()}.tmp")
    try:
        try:
            res = tile_one_slide(record, cfg, ann_dirs, images_path=tmp_imgs)
        except InputError as exc:
            return {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a bad slide must not stop the batch
            return {"error": f"{record.path}: {type(exc).__name__}: {exc}"}
        res["images"].flush()
        del res["images"]
        os.replace(tmp_imgs, imgs)
    finally:
        tmp_imgs.unlink(missing_ok=True)
    buf = io.BytesIO()
    np.savez(buf, labels=res["labels"], coords=res["coords"])
    atomic_write_bytes(npz, buf.getvalue())
    atomic_write_bytes(png, res["thumbnail"])
    atomic_write_json(js, {"fingerprint": fp, "info": res["info"]})  # written last: marks the shard done
    return {"ok": res["info"]}


def _load_shard(work: Path, slide_id: str, fp: str) -> dict | None:
    paths = _shard_paths(work, slide_id)
    if not all(q.exists() for q in paths):
        return None
    try:
        head = json.loads(paths[3].read_text())
        if head.get("fingerprint") != fp:
            return None
        return head["info"]
    except (OSError, json.JSONDecodeError, KeyError):
        return None


# --------------------------------------------------------------------------- batch
def tile_slides(slides: str | Path | Sequence[str | Path | SlideRecord], out: str | Path, *,
                labels_csv: str | Path | None = None, annotations_dir: str | Path | None = None,
                patch_size: int = 256, mpp: float | None = 2.0, magnification: float | None = None,
                tissue_threshold: float = 0.5, workers: int = 1, slide_mpp: float | None = None,
                tumour_fraction: float = 0.5, seed: int = 0, max_patches_per_slide: int | None = None,
                keep_work: bool = False, strict: bool = False) -> TileReport:
    """Tile slides into one real patch set at ``out`` (see the module doc). ``magnification``
    overrides ``mpp`` when given.

    Bad inputs (manifest rows with an unknown label or a missing file, unreadable or truncated
    slides, slides without MPP, without tissue, with an annotation file that does not parse) are
    each logged as one line naming the file and listed in ``meta["skipped"]``; the batch goes on.
    Raises :class:`InputError` (nothing written at ``out``) when no slide could be tiled, or, with
    ``strict=True``, when any slide was skipped (the finished shards are kept for a re-run).
    """
    from histodd_fed.logging_setup import progress

    t0 = time.perf_counter()
    cfg = TileConfig(patch_size=int(patch_size), mpp=None if magnification is not None else mpp,
                     magnification=magnification, tissue_threshold=float(tissue_threshold),
                     tumour_fraction=float(tumour_fraction), slide_mpp=slide_mpp,
                     max_patches_per_slide=max_patches_per_slide, seed=int(seed))
    cfg.validate()
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    records, manifest, problems = collect_slides(slides, labels_csv)
    out = Path(out)
    ann_root = Path(annotations_dir) if annotations_dir is not None else None
    if ann_root is not None and not ann_root.is_dir():
        raise InputError(f"{ann_root}: annotations folder does not exist")
    for q in problems:
        log.error("skipped slide: %s", q["error"])
    work = out.parent / f".{out.name}.work"
    work.mkdir(parents=True, exist_ok=True)

    dirs = {r.slide_id: annotation_dirs(r, ann_root, manifest) for r in records}
    fps = {r.slide_id: _fingerprint(r, cfg, dirs[r.slide_id]) for r in records}
    infos: dict[str, dict] = {}
    reused: list[str] = []
    errors: dict[str, str] = {}
    todo = []
    for r in records:
        info = _load_shard(work, r.slide_id, fps[r.slide_id])
        if info is not None:
            infos[r.slide_id] = info
            reused.append(r.slide_id)
        else:
            todo.append(r)
    if reused:
        log.info("resuming: %d of %d slides already tiled in %s", len(reused), len(records), work)

    def handle(r: SlideRecord, res: dict) -> None:
        if "error" in res:
            errors[r.slide_id] = res["error"]
            log.error("skipped slide: %s", res["error"])
        else:
            infos[r.slide_id] = res["ok"]

    bar = progress(total=len(todo), desc="tiling slides", unit="slide")
    if workers == 1 or len(todo) <= 1:
        for r in todo:
            handle(r, _tile_to_shard(r, cfg, dirs[r.slide_id], str(work), fps[r.slide_id]))
            bar.update(1)
    else:
        from histodd_fed.worker_pool import spawn_pool

        with spawn_pool(min(workers, len(todo)), initializer=None) as pool:
            futs = {pool.submit(_tile_to_shard, r, cfg, dirs[r.slide_id], str(work), fps[r.slide_id]): r for r in todo}
            for f in as_completed(futs):
                handle(futs[f], f.result())
                bar.update(1)
    bar.close()

    tiled = [r for r in records if r.slide_id in infos]
    skipped = list(problems) + [{"slide_id": r.slide_id, "path": str(r.path), "error": errors[r.slide_id]}
                                for r in records if r.slide_id in errors]
    if not tiled and len(skipped) == 1:
        raise InputError(skipped[0]["error"])
    if not tiled:
        raise InputError(f"no slide could be tiled ({len(skipped)} skipped; first: {skipped[0]['error'] if skipped else '-'})")
    if strict and skipped:
        raise InputError(f"--strict: {len(skipped)} of {len(skipped) + len(tiled)} slides skipped, store not written "
                         f"(finished slides kept in {work}); first: {skipped[0]['error']}")

    centres = sorted({r.centre for r in tiled if r.centre})
    meta = {
        "slide_splits": {r.slide_id: r.split for r in tiled},
        "centre": centres[0] if len(centres) == 1 else None,
        "centres": centres,
        "mpp": cfg.mpp if cfg.mpp is not None else 10.0 / cfg.magnification,
        "magnification": cfg.magnification,
        "patch_size": cfg.patch_size,
        "tissue_threshold": cfg.tissue_threshold,
        "tumour_fraction": cfg.tumour_fraction,
        "skipped": skipped,
        "unlabelled": [r.slide_id for r in tiled if r.label is None],
        "label_source": {r.slide_id: infos[r.slide_id]["label_source"] for r in tiled},
        "source": str(manifest) if manifest is not None else str(slides) if isinstance(slides, (str, Path)) else None,
    }
    ps = _assemble(work, tiled, cfg.patch_size, meta)
    report = TileReport(store=out, n_patches=len(ps), class_counts=ps.class_counts(),
                        tiled=[r.slide_id for r in tiled if r.slide_id not in reused], reused=reused,
                        skipped=skipped, per_slide={r.slide_id: infos[r.slide_id] for r in tiled})
    from histodd_fed.runconfig import write_run_config

    try:
        if len(tiled) == 1:  # the single shard is the store's images.npy: hard-link it into place
            _stage_single_shard(_shard_paths(work, tiled[0].slide_id)[0], work / STAGING, link=not keep_work)
        with atomic_directory(out) as tmp:
            ps.save(tmp, adopt_images=work / STAGING)  # moved into the store, not copied
            (tmp / "thumbnails").mkdir()
            for r in tiled:
                shutil.copyfile(_shard_paths(work, r.slide_id)[2], tmp / "thumbnails" / f"{r.slide_id}.png")
            report.seconds = round(time.perf_counter() - t0, 3)
            atomic_write_json(tmp / "tile_report.json", report.to_json())
            write_run_config(tmp, "tile", {"slides": [str(r.path) for r in records], "labels_csv": manifest,
                                           "annotations_dir": ann_root, "workers": workers, "strict": strict,
                                           **asdict(cfg)})
    finally:
        del ps
        (work / STAGING).unlink(missing_ok=True)
    if not keep_work and not skipped:
        shutil.rmtree(work, ignore_errors=True)
    log.info("tiled %d slides (%d reused, %d skipped) -> %d patches %s at %s", len(tiled), len(reused),
             len(skipped), report.n_patches, report.class_counts, out)
    return report


STAGING = "store-images.npy"


def _stage_single_shard(shard: Path, staging: Path, link: bool) -> None:
    """Put a single slide's shard at ``staging`` for :meth:`PatchSet.save` to adopt.

    A hard link costs no copy and leaves the shard in place for a resumed run (shards are only
    ever replaced by rename, never written in place); with ``link=False`` (``keep_work``: the
    work folder outlives the store, so the two must not share one file) or where linking is
    impossible, the shard is copied.
    """
    staging.unlink(missing_ok=True)
    if link:
        try:
            os.link(shard, staging)
            return
        except OSError:
            pass
    shutil.copyfile(shard, staging)


def _assemble(work: Path, tiled: list[SlideRecord], patch_size: int, meta: dict):
    """One PatchSet from the shards of ``tiled``; its images are a memory map staged in ``work``
    (filled slide by slide) at ``STAGING``, which the store then adopts (renamed, not copied), so
    the store is written without holding all patches in RAM. With one slide the images are the
    shard's own memory map (the caller stages it by hard link)."""
    from histodd_fed.patchset import PatchSet

    labels, coords, sidx, counts = [], [], [], []
    for j, r in enumerate(tiled):
        with np.load(_shard_paths(work, r.slide_id)[1], allow_pickle=False) as z:
            labels.append(z["labels"])
            coords.append(z["coords"].reshape(-1, 2))
        sidx.append(np.full(len(labels[-1]), j, dtype=np.int32))
    n = int(sum(len(x) for x in labels))
    if len(tiled) == 1:  # one slide: its shard already is the image array
        images = np.load(_shard_paths(work, tiled[0].slide_id)[0], mmap_mode="r", allow_pickle=False)
        if images.shape != (n, patch_size, patch_size, 3):
            raise InputError(f"{work}: shard of {tiled[0].slide_id} holds {images.shape}, expected {n} patches; "
                             f"delete the folder and re-run")
        return PatchSet(images=images, labels=labels[0], class_names=list(CLASS_NAMES), slide_index=sidx[0],
                        slide_ids=[tiled[0].slide_id],
                        slide_labels={r.slide_id: r.label_index for r in tiled if r.label_index is not None},
                        coords=coords[0].astype(np.int64), kind="real", meta=meta)
    images = np.lib.format.open_memmap(work / STAGING, mode="w+", dtype=np.uint8,
                                       shape=(n, patch_size, patch_size, 3))
    k = 0
    for r, lab in zip(tiled, labels):
        src = np.load(_shard_paths(work, r.slide_id)[0], mmap_mode="r", allow_pickle=False)
        if src.shape != (len(lab), patch_size, patch_size, 3):
            raise InputError(f"{work}: shard of {r.slide_id} holds {src.shape}, expected {len(lab)} patches; "
                             f"delete the folder and re-run")
        images[k:k + len(lab)] = src
        k += len(lab)
        del src
    images.flush()
    return PatchSet(images=images, labels=np.concatenate(labels), class_names=list(CLASS_NAMES),
                    slide_index=np.concatenate(sidx), slide_ids=[r.slide_id for r in tiled],
                    slide_labels={r.slide_id: r.label_index for r in tiled if r.label_index is not None},
                    coords=np.concatenate(coords).astype(np.int64), kind="real", meta=meta)


# --------------------------------------------------------------------------- already-tiled patches
def tile_patches(patches: str | Path, out: str | Path, *, patch_size: int | None = None,
                 limit_per_class: int | None = None, seed: int = 0) -> TileReport:
    """Import an already-tiled image folder (``CLASS/*.png|jpg``, PCam's layout) as the same kind
    of patch store :func:`tile_slides` writes (kind ``real``, no slide table).

    ``patch_size`` resizes (default: keep the images' size, which must then be equal);
    ``limit_per_class`` takes a seeded random subset per class. Class names are the sub-folder
    names, sorted.
    """
    from histodd_fed.patchset import load_image_folder
    from histodd_fed.runconfig import write_run_config

    t0 = time.perf_counter()
    root = Path(patches)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder of class sub-folders (expected DIR/CLASS/*.png|jpg)")
    if patch_size is not None and patch_size < 4:
        raise ConfigError(f"patch_size must be >= 4, got {patch_size}")
    ps = load_image_folder(root, size=patch_size, limit_per_class=limit_per_class, seed=seed)
    ps.meta = {"source": str(root), "input": "patches", "slide_splits": {}, "centre": None, "centres": [],
               "mpp": None, "magnification": None, "patch_size": ps.image_size, "skipped": [],
               "unlabelled": [], "label_source": {}, **({"view": ps.meta["view"]} if "view" in ps.meta else {})}
    out = Path(out)
    report = TileReport(store=out, n_patches=len(ps), class_counts=ps.class_counts(), tiled=[], reused=[],
                        skipped=[], per_slide={})
    with atomic_directory(out) as tmp:
        ps.save(tmp)
        report.seconds = round(time.perf_counter() - t0, 3)
        atomic_write_json(tmp / "tile_report.json", report.to_json())
        write_run_config(tmp, "tile", {"patches": root, "patch_size": patch_size,
                                       "limit_per_class": limit_per_class, "seed": seed})
    log.info("imported %d patches %s from %s -> %s", len(ps), report.class_counts, root, out)
    return report


# --------------------------------------------------------------------------- summary
def format_summary(report: TileReport) -> str:
    """A plain-text table: one row per slide (label, split, patches per class), totals, and the
    skipped slides with the reason."""
    classes = list(report.class_counts)
    lines: list[str] = []
    if report.per_slide:
        rows = [["slide", "label", "split", "patches", *classes, "status"]]
        for sid, info in report.per_slide.items():
            n, t = int(info["patches"]), int(info.get("tumour_patches", 0))
            rows.append([sid, str(info.get("label") or "-"), str(info.get("split") or "-"), str(n), str(n - t), str(t),
                         "reused" if sid in report.reused else "tiled"])
        rows.append(["total", "", "", str(report.n_patches), *(str(report.class_counts[c]) for c in classes),
                     f"{len(report.per_slide)} ok"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for k, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
            if k == 0 or k == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
    else:
        lines.append(f"patches: {report.n_patches} ("
                     + ", ".join(f"{c} {n}" for c, n in report.class_counts.items()) + ")")
    lines.append(f"slides: {len(report.per_slide)} tiled ({len(report.reused)} reused), "
                 f"{len(report.skipped)} skipped -> {report.store}")
    for q in report.skipped:
        lines.append(f"skipped {q['slide_id']}: {q['error']}")
    return "\n".join(lines)
