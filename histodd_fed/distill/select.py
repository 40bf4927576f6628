"""Best of K: distil K candidate sets and keep the one that trains best on the centre's own held-out patches.

Sets distilled with different seeds differ a lot in what they are worth (on PCam, ipc 10: 58-70%
accuracy for the same recipe). A centre can tell them apart without anything leaving it: it holds
out ``candidate_holdout`` labelled patches per class, distils every candidate from the rest, trains
a fresh evaluation network on each candidate (``candidate_epochs``, ``candidate_augmentation``,
``candidate_eval_seeds`` seeds) and keeps the candidate with the best held-out accuracy. The choice
reveals at most log2(K) bits about the held-out patches; the export gate still audits the chosen set
against all of the centre's real patches.

With ``candidate_gate`` the choice also asks a ``candidate_check`` (``set -> (passed, reason)``) given by
the caller - the export gate's calibrated rules against the centre's raw reference patches
(:func:`histodd_fed.release.choose.candidate_check`; this package never imports the privacy code):
candidates are checked in order of held-out accuracy and the first that passes is kept. When none
passes, the most accurate is kept with a warning. The gate's independent rule (the copy detector) is
never consulted here; the caller applies the full gate to the chosen set (the same call ``export``
makes) and reports that verdict.

With ``workers`` > 1 the first candidate to finish is checked in a thread of this process while the others are
distilled (:class:`_EarlyCheck`): the check's work on the real patches alone (the memorisation audit's reference
draw, SSIM index and encoder, kept per process) is then done while this process would otherwise only wait, and the
ordered checks afterwards reuse it. The same checks in the same order decide: the choice and its record do not change.

Candidate ``k`` is an ordinary run (``candidates: 1``) with seed ``seed * 1000 + k``, so each is
checkpointed and resumable on its own, and candidate 0 of seed 0 is not the plain seed-0 run.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from pathlib import Path

import numpy as np

from histodd_fed.errors import InputError
from histodd_fed.patchset import PatchSet
from histodd_fed.preprocess import resize_to
from histodd_fed.runconfig import config_hash
from histodd_fed.worker_pool import run_in_processes

log = logging.getLogger(__name__)


def holdout_split(real: PatchSet, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(distil-from, held-out) indices: ``per_class`` patches per class held out (at most a fifth of the
    class, at least 1), seeded."""
    rng = np.random.default_rng([int(seed), 7321])
    keep, hold = [], []
    for c in range(real.num_classes):
        idx = rng.permutation(np.flatnonzero(real.labels == c))
        n = min(per_class, len(idx) // 5)
        if n < 1:
            raise InputError(f"distill: class {real.class_names[c]!r} has {len(idx)} patches; best-of-K selection "
                             f"needs at least 5 per class to hold some out (set candidates: 1)")
        hold.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(hold))


def candidate_config(config, k: int):
    """Candidate ``k``'s own config: an ordinary one-set run with seed ``seed * 1000 + k``."""
    return dataclasses.replace(config, candidates=1, candidate_gate=False, seed=int(config.seed) * 1000 + int(k))


def run_candidate(source: PatchSet, held: PatchSet, config, k: int, work_dir: Path | None = None,
                  progress: bool = False, resume: bool = True):
    """Candidate ``k``: distil it from ``source`` and score it on ``held``; (score record, held-out accuracy,
    DistillResult)."""
    from histodd_fed.distill.engine import run_distillation
    from histodd_fed.training.evaluation import evaluate_sets

    cand_cfg = candidate_config(config, k)
    res = run_distillation(source, cand_cfg, work_dir, progress, resume=resume)
    ev = evaluate_sets({f"candidate {k}": res.patchset}, held, config.model,
                       seeds=config.candidate_eval_seeds, epochs=config.candidate_epochs,
                       augmentation=config.candidate_augmentation, arch_kwargs=dict(config.model_kwargs),
                       device=config.device, progress=False)[f"candidate {k}"]
    acc = float(ev.summary()["accuracy_mean"])
    return {"candidate": k, "seed": cand_cfg.seed, "heldout_accuracy": round(acc, 4)}, acc, res


def _run_candidates(source: PatchSet, held: PatchSet, config, work_dir: Path | None, progress: bool,
                    resume: bool, workers: int, early: "_EarlyCheck | None" = None) -> list[tuple[dict, float, object]]:
    """Every candidate's (score, accuracy, result), in candidate order: here one after the other, or ``workers``
    at a time in spawned processes (one torch thread each). A candidate's error stops the run, named. ``early``:
    offered each finished candidate's set (it checks the first in a thread)."""
    n = config.candidates
    out: list = [None] * n

    def done(k: int, item) -> None:
        out[k] = item
        if early is not None:
            early.offer(k, item[2].patchset)
        log.info("distill: candidate %d/%d (seed %d): held-out accuracy %.4f", k + 1, n, item[0]["seed"],
                 item[0]["heldout_accuracy"])

    if workers <= 1:
        for k in range(n):
            done(k, run_candidate(source, held, config, k, work_dir, progress, resume))
        return out
    from histodd_fed.logging_setup import progress as progress_bar

    bar = progress_bar(total=n, desc=f"distill candidates ({workers} workers)", disable=not progress)

    def finished(k: int, item) -> None:
        done(k, item)
        bar.update(1)

    try:
        run_in_processes(run_candidate, {k: (source, held, config, k, work_dir, False, resume) for k in range(n)},
                         workers=workers, on_result=finished, name=lambda k: f"distill: candidate {k}")
    finally:
        bar.close()
    return out


def run_best_of(real: PatchSet, config, work_dir: Path | None = None, progress: bool = True, *,
                resume: bool = True, candidate_check=None, workers: int = 1):
    """The best of ``config.candidates`` distillations (see the module doc); a DistillResult whose meta
    records every candidate's held-out accuracy in ``meta["selection"]``. ``workers`` > 1 distils that
    many candidates at once in their own processes (same sets and scores as one process with one torch
    thread; checkpoints per candidate as ever)."""
    if workers < 1:
        raise InputError(f"distill: workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    keep, hold = holdout_split(real, config.candidate_holdout, config.seed)
    source, held = real.subset(keep), resize_to(real.subset(hold), config.image_size)
    gated = bool(config.candidate_gate and candidate_check is not None)
    early = _EarlyCheck(candidate_check) if gated and workers > 1 else None
    made = _run_candidates(source, held, config, work_dir, progress, resume, workers, early)
    known = early.finish() if early is not None else {}
    scores = [s for s, _, _ in made]
    accs = [a for _, a, _ in made]
    results = [r for _, _, r in made]
    order = sorted(range(len(accs)), key=lambda i: (-accs[i], i))   # best first, the first of equals
    gate = None
    if config.candidate_gate and candidate_check is None:
        log.warning("distill: candidate_gate is set but no gate check was given; choosing by held-out accuracy only")
    if config.candidate_gate and candidate_check is not None:
        chosen_i, gate = _first_passing(order, results, candidate_check, scores, known)
    else:
        chosen_i = order[0]
    chosen = scores[chosen_i]
    best_res = results[chosen["candidate"]]
    meta = dict(best_res.patchset.meta)
    meta["config"] = config.to_dict()        # the run's own config (the candidate's seed is in selection)
    meta["config_sha256"] = config_hash(config)
    meta["result_config_sha256"] = config_hash(config.result_dict())
    meta["selection"] = {"candidates": scores, "chosen": chosen["candidate"], "chosen_seed": chosen["seed"],
                         "holdout_per_class": int(len(hold) // real.num_classes), "heldout_images": int(len(hold)),
                         "distilled_from_images": int(len(keep)), "epochs": config.candidate_epochs,
                         "augmentation": config.candidate_augmentation, "eval_seeds": config.candidate_eval_seeds,
                         "seconds": round(time.perf_counter() - t0, 1)}
    if gate is not None:
        meta["selection"]["gate"] = gate
    best_res.patchset.meta = meta
    local = best_res.drift_local
    if local and isinstance(local.get("to_real"), dict):   # indices into the distilled-from part -> into ``real``
        local["to_real"]["source_indices"] = keep[np.asarray(local["to_real"]["source_indices"])].tolist()
    return best_res


def _first_passing(order: list[int], results: list, check, scores: list[dict],
                   known: dict[int, tuple[bool, str]] | None = None) -> tuple[int, dict]:
    """The first candidate in ``order`` that ``check(set) -> (passed, reason)`` passes, and a record of the
    audits; the first in ``order`` when none passes. Sets ``gate_passed`` in ``scores``. ``known``: verdicts
    already computed by the same check (:class:`_EarlyCheck`), used instead of checking again."""
    audited = []
    known = known or {}
    t0 = time.perf_counter()
    for i in order:
        t = time.perf_counter()
        passed, reason = known[i] if i in known else check(results[i].patchset)
        scores[i]["gate_passed"] = bool(passed)
        audited.append(i)
        log.info("distill: candidate %d: calibrated gate rules %s (%.0fs)%s", i, "pass" if passed else "block it",
                 time.perf_counter() - t, "" if passed else f": {reason}")
        if passed:
            return i, {"audited": audited, "passed": True, "seconds": round(time.perf_counter() - t0, 1)}
    log.warning("distill: none of the %d candidates passes the export gate; keeping the most accurate (export "
                "will block it: lower ipc, raise init_mix or add privacy_step)", len(order))
    return order[0], {"audited": audited, "passed": False, "seconds": round(time.perf_counter() - t0, 1)}


class _EarlyCheck:
    """``check`` of the first candidate offered, in a thread of this process, while the other candidates are being
    distilled in worker processes (this process only waits for them meanwhile).

    The check is a pure function of the set and the caller's reference (the same verdict whenever it runs); its
    work on the reference alone is kept by the privacy code per process, so the ordered checks of
    :func:`_first_passing` afterwards reuse it. :meth:`finish` waits for the thread and returns ``{k: verdict}``
    (empty when the check failed: it is then simply made again in order, where its error surfaces).
    """

    def __init__(self, check) -> None:
        self.check = check
        self.thread: threading.Thread | None = None
        self.verdicts: dict[int, tuple[bool, str]] = {}

    def offer(self, k: int, patchset: PatchSet) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, args=(k, patchset), name="early-candidate-check",
                                           daemon=True)
            self.thread.start()

    def _run(self, k: int, patchset: PatchSet) -> None:
        try:
            self.verdicts[k] = self.check(patchset)
        except Exception:  # noqa: BLE001 - made again in order, where it is raised
            log.debug("distill: early check of candidate %d failed; checked again in order", k, exc_info=True)

    def finish(self) -> dict[int, tuple[bool, str]]:
        if self.thread is not None:
            self.thread.join()
        return dict(self.verdicts)
