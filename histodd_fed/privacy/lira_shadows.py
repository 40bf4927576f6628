"""LiRA's shadows: each one the set's recipe re-run on a half of the pool, a model trained on the result, and
every pool patch scored against it - resumable from disk and, on a machine with cores to spare, run in
parallel processes.

The shadows are the long part of an audit (for the pcam preset each is a best-of-10 distillation), so:

- :class:`ShadowCheckpoint` keeps every finished shadow on disk; a re-run of the same audit takes them back;
- :func:`run_shadows` runs the missing ones in this process or in ``workers`` spawned processes (one torch
  thread each). Every shadow is seeded (its recipe seed and model seed come from the audit's seed), so the
  numbers do not depend on how many workers made them or on whether the run was interrupted.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from histodd_fed.atomic import atomic_write_bytes, atomic_write_json
from histodd_fed.errors import InputError
from histodd_fed.formation import decode_set
from histodd_fed.logging_setup import progress as progress_bar
from histodd_fed.patchset import PatchSet
from histodd_fed.privacy.classifier import TrainSpec, train_model
from histodd_fed.worker_pool import run_in_processes


# ---------------------------------------------------------------------------- on disk
class ShadowCheckpoint:
    """The finished shadows of one LiRA run on disk, so an interrupted audit resumes where it stopped.

    A run is named by a key over everything a shadow's result depends on: the pool's images and labels,
    the halves, the seeds, the evaluation classifier, the queries, the recipe (``recipe_id``) and the
    library version. Its shadows live in ``root/<key[:16]>/shadow-NNN.npz`` (plain arrays, read back with
    ``allow_pickle=False``), each written atomically when the shadow is done; ``run.json`` beside them
    says what the run is. Another run (a different pool, seed, recipe ...) gets another folder, so a
    stale shadow is never mixed in; a file that does not read back as the expected arrays is re-run.
    """

    def __init__(self, root: str | Path, parts: dict[str, Any], expect: tuple[int, int]):
        from histodd_fed import __version__

        h = hashlib.sha256()
        for name in sorted(parts):
            v = parts[name]
            data = (np.ascontiguousarray(v).tobytes() if isinstance(v, np.ndarray)
                    else json.dumps(v, sort_keys=True, default=str).encode())
            h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
        h.update(b"version\0" + __version__.encode())
        self.key = h.hexdigest()
        self.dir = Path(root) / self.key[:16]
        self.expect = expect                      # (pool size, number of augmentations)
        self.description = {k: v for k, v in parts.items() if not isinstance(v, np.ndarray)}

    def _path(self, k: int) -> Path:
        return self.dir / f"shadow-{k:03d}.npz"

    def load(self, k: int) -> tuple[np.ndarray, np.ndarray, int] | None:
        """Shadow ``k``'s (phi, proximity, released size), or None when it is not (validly) on disk."""
        path = self._path(k)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                phi, prox, size = np.array(z["phi"]), np.array(z["prox"]), int(z["size"])
        except (OSError, ValueError, KeyError):
            return None
        if phi.shape != self.expect or prox.shape != self.expect or not np.isfinite(phi).all():
            return None
        return phi, prox, size

    def save(self, k: int, phi: np.ndarray, prox: np.ndarray, size: int) -> None:
        if not (self.dir / "run.json").is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.dir / "run.json", {"key": self.key, **self.description})
        buf = io.BytesIO()
        np.savez(buf, phi=phi, prox=prox, size=np.int64(size))
        atomic_write_bytes(self._path(k), buf.getvalue())


# ---------------------------------------------------------------------------- one shadow
@dataclass(frozen=True)
class ShadowWork:
    """What every shadow needs: the pool, the recipe, the classifier and the queries (sent once to each
    worker process)."""

    pool: PatchSet
    make_set: Callable[[PatchSet, int], PatchSet]
    spec: TrainSpec
    augmentations: tuple[str, ...]
    image_size: int                            #: the target set's training-image size


@dataclass(frozen=True)
class ShadowResult:
    k: int
    phi: np.ndarray                            #: (P, A) the shadow model's phi on every pool patch
    prox: np.ndarray                           #: (P, A) the pool's proximity to the shadow set's images
    size: int                                  #: images in the shadow set
    seconds: dict[str, float]


def make_shadow(work: ShadowWork, pool_xy: tuple[torch.Tensor, torch.Tensor], k: int, keep_row: np.ndarray,
                set_seed: int, model_seed: int) -> ShadowResult:
    """Shadow ``k``: the recipe on the pool patches ``keep_row`` marks, a model on its set, the pool
    (``pool_xy``: ``work.pool.to_tensors()``, made once per process) scored."""
    from histodd_fed.privacy.lira import logit_confidence, set_proximity

    t0 = time.perf_counter()
    half = work.pool.subset(np.flatnonzero(keep_row))
    try:
        released = decode_set(work.make_set(half, set_seed))
    except InputError as exc:
        raise InputError(f"lira: the recipe failed on shadow {k}'s half of the pool ({len(half)} patches, "
                         f"{half.class_counts()}): {exc}; a larger pool may help") from exc
    if released.image_size != work.image_size:
        raise InputError(f"lira: shadow set {k} is {released.image_size} px, the target set "
                         f"{work.image_size} px: the recipe does not reproduce the set's view")
    t1 = time.perf_counter()
    model = train_model(work.spec, released, seed=model_seed, desc=f"shadow {k} model")
    t2 = time.perf_counter()
    x, y = pool_xy
    phi = logit_confidence(model, x, y, work.augmentations)
    prox = set_proximity(released.to_tensors()[0], x, work.augmentations)
    return ShadowResult(k, phi, prox, len(released),
                        {"make_sets": t1 - t0, "train_models": t2 - t1, "score": time.perf_counter() - t2})


# ---------------------------------------------------------------------------- worker processes
_WORKER: tuple | None = None    # (work, pool tensors), set once per worker process by _start_worker


def _start_worker(payload: bytes) -> None:
    global _WORKER
    torch.set_num_threads(1)
    work = pickle.loads(payload)    # our own parent's bytes, never input from outside
    _WORKER = (work, work.pool.to_tensors())


def _worker_shadow(k: int, keep_row: np.ndarray, set_seed: int, model_seed: int) -> ShadowResult:
    assert _WORKER is not None
    return make_shadow(*_WORKER, k, keep_row, set_seed, model_seed)


# ---------------------------------------------------------------------------- all of them
def run_shadows(work: ShadowWork, keep: np.ndarray, set_seeds: list[int], model_seeds: list[int], *,
                checkpoint: ShadowCheckpoint | None = None, workers: int = 1, progress: bool = True):
    """Every shadow: (shadow_phi (S, P, A), shadow_prox (S, P, A), sizes, seconds, resumed count).

    Shadows already in ``checkpoint`` are read back; the others are made (here, or in ``workers``
    processes) and saved there as each one finishes, so an interruption loses at most the shadows in
    flight. A shadow's error stops the run with the shadow named.
    """
    if workers < 1:
        raise InputError(f"lira: workers must be >= 1, got {workers}")
    shadows = len(keep)
    n_pool, n_aug = len(work.pool), len(work.augmentations)
    shadow_phi = np.zeros((shadows, n_pool, n_aug))
    shadow_prox = np.zeros_like(shadow_phi)
    sizes = [0] * shadows
    seconds = {"make_sets": 0.0, "train_models": 0.0, "score": 0.0}
    todo = []
    for k in range(shadows):
        done = checkpoint.load(k) if checkpoint is not None else None
        if done is None:
            todo.append(k)
        else:
            shadow_phi[k], shadow_prox[k], sizes[k] = done
    resumed = shadows - len(todo)

    def keep_result(r: ShadowResult) -> None:
        shadow_phi[r.k], shadow_prox[r.k], sizes[r.k] = r.phi, r.prox, r.size
        for name, v in r.seconds.items():
            seconds[name] += v
        if checkpoint is not None:
            checkpoint.save(r.k, r.phi, r.prox, r.size)

    bar = progress_bar(total=shadows, initial=resumed, desc="lira shadows", disable=not progress)
    try:
        if workers == 1 or len(todo) <= 1:
            pool_xy = work.pool.to_tensors()
            for k in todo:
                keep_result(make_shadow(work, pool_xy, k, keep[k], set_seeds[k], model_seeds[k]))
                bar.update(1)
        else:
            try:
                payload = pickle.dumps(work)
            except (pickle.PicklingError, AttributeError, TypeError) as exc:
                raise InputError(f"lira: workers > 1 needs a recipe that can be sent to a worker process ({exc})") from exc

            def finished(k: int, r: ShadowResult) -> None:
                keep_result(r)
                bar.update(1)

            run_in_processes(_worker_shadow, {k: (k, keep[k], set_seeds[k], model_seeds[k]) for k in todo},
                             workers=workers, on_result=finished, name=lambda k: f"lira: shadow {k}",
                             initializer=_start_worker, initargs=(payload,))
    finally:
        bar.close()
    return shadow_phi, shadow_prox, sizes, seconds, resumed
