"""The five-hospital benchmark: ``coordinator transfer --benchmark pcam-c17 --centres DIR --sources S --target T``.

``DIR`` from ``centre-node make-pcam-centres --hospitals 0,1,2,3,4`` (one centre per Camelyon17
hospital, :func:`histodd_fed.datasets.pcam_c17.make_hospital_centres`). For every target hospital and
seed ``s`` one ordinary transfer study (:func:`histodd_fed.federation.coordinator.run_transfer_study`
through whatever runtime ``run_study`` uses - the Flower simulation for the CLI): the sources'
nodes hold their ``source`` part (all of it is "Full", sent under each source's explicit
``export-real`` policy), the target's node its ``target`` part (small labelled train set, large test
set). Several sources go POOLED into the target (``StudyConfig.sources``): one "+ ipc 10" row with
every source's ipc 10 set, one "+ Full" row with all of their train patches. ``--target all`` runs
leave-one-hospital-out: each hospital in turn the target, all others its sources.

The default preset ``pcam-c17-hospitals-fixed`` fine-tunes every row by one protocol fixed on a tuning pair
of PCam ``train`` data (no target's data); with ``--preset pcam-c17-hospitals`` the target chooses its protocol
(epochs, share of received data, lr) per row on a validation split of its own train patches
(:mod:`histodd_fed.federation.receive_select`). Either way the test split is read only for the reported numbers.

Slide columns: when the folder has pseudo-slides (:mod:`histodd_fed.datasets.pseudo_slides`), every centre's
slide data are its ``slides-train`` / ``slides-test`` sets; each row's slide AUC / accuracy, the slide AUC gain
over "target alone" (paired by seed) and ipc rows' share of Full's slide gain are in the summary; a row
without them says why (``slide_note``).

Writes ``OUT/summary.{md,csv,png}``, ``OUT/summary_per_seed.csv`` and ``OUT/report.json``
(:mod:`benchmark_summary`: mean and 95% t-interval over seeds, gains paired by seed); every study's own
report under ``OUT/runs/<target>/seed<s>/``. The summary files are rewritten after every study: while the run
goes, or after it was stopped, they hold the studies done so far, marked partial. A centre that fails, times
out or whose set is blocked is a fault (row kept, counted; a row no seed produced is a fault row), never a
missing row or a crash.

Resumable: the same command with the same ``OUT`` reuses every (target, seed) study a killed run
finished (its ``report.json``, when ``OUT/resume_key.json`` - centres folder, its manifest's hash,
preset, ipcs, epochs - and the study's own config match) and runs only the others; the centres'
keys in ``OUT/federation`` are reused too. Another folder or settings with the same ``OUT``: nothing
is reused (said in one line). To re-run a seed, delete its ``OUT/runs/<target>/seed<s>``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from histodd_fed.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from histodd_fed.errors import ConfigError, HistoddError, InputError
from histodd_fed.federation import benchmark_summary as bs
from histodd_fed.runconfig import write_run_config

#: the fixed protocol chosen on the tuning pair (presets.py, docs/federation.md step 9); ``--preset
#: pcam-c17-hospitals`` chooses per row on the target's own validation split instead (the default until this one)
DEFAULT_PRESET = "pcam-c17-hospitals-fixed"
#: seconds the coordinator waits for one reply: a source distils every ipc best-of-5 from its 2,000
#: patches in one reply (ipc 10 + 50: ~15 min on one contended core), so the CLI's 900 s is too short
HOSPITALS_REPLY_TIMEOUT = 3600.0


def is_hospitals(centres: Path) -> bool:
    """True when ``centres`` holds the hospitals layout (``make-pcam-centres --hospitals``)."""
    try:
        return json.loads((Path(centres) / "manifest.json").read_text()).get("layout") == "hospitals"
    except (OSError, json.JSONDecodeError):
        return False


def check_hospitals(centres: Path) -> dict[str, Any]:
    """The hospitals manifest (one-line errors for a wrong or incomplete folder)."""
    centres = Path(centres)
    mf = centres / "manifest.json"
    if not mf.exists():
        raise InputError(f"{centres}: no manifest.json (make it with centre-node make-pcam-centres --hospitals)")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{mf}: unreadable ({exc})") from None
    if manifest.get("layout") != "hospitals":
        raise InputError(f"{centres}: the two-centre layout (C1 + C2); --sources/--target need "
                         "centre-node make-pcam-centres --hospitals 0,1,2,3,4")
    for cid, c in manifest.get("centres", {}).items():
        for p in (f"{c['source']}/train", f"{c['source']}/test", f"{c['target']}/train", f"{c['target']}/test"):
            if not (centres / p / "patchset.json").exists():
                raise InputError(f"{centres / p}: missing")
    return manifest


def _hid(text: str, known: list[int], flag: str) -> int:
    t = str(text).strip().upper().removeprefix("H")
    if not t.isdigit() or int(t) not in known:
        raise ConfigError(f"{flag}: unknown hospital {text!r} (this folder has {', '.join(map(str, known))})")
    return int(t)


def plan(manifest: dict[str, Any], sources: str | None, target: str | None) -> list[tuple[int, list[int]]]:
    """``[(target, [sources])]``: ``target`` a hospital or ``all`` (each in turn, all others its sources);
    ``sources`` comma-separated, default all hospitals but the target."""
    known = [int(d) for d in manifest.get("hospitals", [])]
    if target is None or str(target).strip() == "":
        raise ConfigError("--benchmark pcam-c17 with hospital centres needs --target N (or --target all)")
    if str(target).strip().lower() == "all":
        if sources:
            raise ConfigError("--target all is leave-one-hospital-out (every other hospital is a source): "
                              "leave out --sources")
        return [(t, [s for s in known if s != t]) for t in known]
    tgt = _hid(target, known, "--target")
    srcs = [_hid(s, known, "--sources") for s in str(sources).split(",") if s.strip()] if sources else \
        [s for s in known if s != tgt]
    if tgt in srcs:
        raise ConfigError(f"--sources {sources}: the target H{tgt} cannot also be a source")
    if len(set(srcs)) != len(srcs) or not srcs:
        raise ConfigError(f"--sources {sources!r}: name each source hospital once")
    return [(tgt, srcs)]


def transfer_label(t: str) -> str:
    """study.table_rows' transfer -> the summary's row name."""
    return bs.BASE if t == "no transfer" else "+ Full" if t == "Full" else f"+ {t}"


def _fault_transfer(detail: str) -> str | None:
    """The row a fault concerns (None: every row of that study)."""
    m = re.search(r"\bipc(\d+)\b", detail)
    if m:
        return f"+ ipc {int(m.group(1))}"
    if re.search(r"\bfull\b|\bFull\b", detail):
        return "+ Full"
    return None


#: the StudyConfig fields a finished study must share with the one about to run to be reused
_RESUME_FIELDS = ("source", "sources", "target", "ipcs", "full", "fine_tune_epochs", "seed", "preset", "extras",
                  "both_directions")


def _resume_key(centres: Path, preset: str, ipcs: list[int], epochs: int) -> dict[str, Any]:
    import hashlib

    return {"centres": str(centres), "preset": preset, "ipcs": sorted(int(i) for i in ipcs), "epochs": int(epochs),
            "manifest_sha256": hashlib.sha256((centres / "manifest.json").read_bytes()).hexdigest()}


def _check_resume(out: Path, key: dict[str, Any], say: Callable[[str], None]) -> bool:
    """True when studies under ``out`` were run with ``key`` (so finished ones may be reused); records ``key``."""
    path = out / "resume_key.json"
    old = None
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
    if old is not None and old != key:
        say(f"[resume] {out}: earlier studies there used other settings or centres; none is reused")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, key)
    return old == key


def finished_study(study_dir: Path, cfg) -> Any:
    """The :class:`StudyOutcome` of a study already run in ``study_dir`` with ``cfg``'s settings, else None."""
    from histodd_fed.federation.coordinator import StudyOutcome
    from histodd_fed.federation.faults import Fault

    path = study_dir / "report.json"
    if not path.is_file():
        return None
    try:
        rep = json.loads(path.read_text())
        done = rep["config"]
        want = json.loads(json.dumps({k: getattr(cfg, k) for k in _RESUME_FIELDS}))
        if any(done.get(k) != v for k, v in want.items()) or not rep["raw_rows"]:
            return None
        return StudyOutcome(rows=list(rep["raw_rows"]), faults=[Fault(**f) for f in rep["faults"]],
                            centres=dict(rep["centres"]), messages=dict(rep["messages"]),
                            seconds=float(rep["seconds"]), attestations=list(rep.get("attestations", [])))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def run_hospitals_benchmark(centres: Path, out: Path, *, sources: str | None, target: str | None, ipcs: list[int],
                            seeds: int, run_study: Callable, preset: str = DEFAULT_PRESET, epochs: int = 5,
                            timeout: float = 1800.0, runtime: str = "simulation", benchmark: str = "pcam-c17",
                            say: Callable[[str], None] = print, command: str = "", workers: int = 1) -> dict[str, Any]:
    """Run every (target, seed) study; returns the report (also written under ``out``). ``workers``: the
    processes each source may distil with (its best-of-K candidates at once; the sets do not change)."""
    from histodd_fed.federation.coordinator import StudyConfig
    from histodd_fed.federation.enrol import enrol
    from histodd_fed.federation.presets import get_preset
    from histodd_fed.federation.study import table_rows, write_report
    from histodd_fed.logging_setup import progress

    manifest = check_hospitals(centres)
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if not ipcs:
        raise ConfigError("--ipc: give at least one images-per-class value")
    p = get_preset(preset)
    jobs = plan(manifest, sources, target)
    centres, out = Path(centres).resolve(), Path(out).resolve()
    hosp = [int(d) for d in manifest["hospitals"]]
    cid = {d: f"H{d}" for d in hosp}
    info = manifest["centres"]
    resume = _check_resume(out, _resume_key(centres, preset, ipcs, epochs), say)
    cfgs, trust = enrol(out / "federation", {cid[d]: centres / info[cid[d]]["source"] for d in hosp}, preset=preset)
    by_id = {c.centre_id: c for c in cfgs}
    n_targets = len({t for t, _ in jobs})
    # every row may be two sets (patch + per-slide synthetic; Full: train patches + real pseudo-slides)
    max_releases = 2 * seeds * (len(ipcs) + 1) * n_targets + 2
    expected = {cid[t]: [bs.BASE] + [f"+ ipc {i}" for i in sorted(ipcs)] + ["+ Full"] for t, _ in jobs}
    shown_sources = {cid[t]: "+".join(cid[s] for s in srcs) for t, srcs in jobs}
    per_seed: list[dict[str, Any]] = []
    faults: list[dict[str, Any]] = []
    fixed = p.fixed_protocol(epochs)
    protocol = ({"chosen_on": "a validation split of each target's own train patches "
                              f"({p.select_val_fraction:.0%} per class; never its test set)",
                 "grid": [{"epochs": e, "received_share": sh, "lr_scale": lr} for e, sh, lr in p.select_grid]}
                if not fixed else
                {"fixed": f"{p.fine_tune_protocol}, {fixed[0]} epochs, received share {fixed[1]:g}, "
                          f"lr {p.fine_tune_lr * fixed[2]:g}, {p.classifier}"
                          + (f", augmentation {p.train_augmentation}" if p.train_augmentation else "")
                          + (", received sets stain-mapped to the target" if p.stain_normalise_received else "")})
    outputs = _Outputs(
        out=out, benchmark=benchmark, command=command, centres=centres, manifest=manifest,
        plan=[{"target": cid[t], "sources": [cid[s] for s in srcs]} for t, srcs in jobs], expected=expected,
        sources=shown_sources, ipcs=list(ipcs), seeds=seeds, preset=preset, epochs=epochs, protocol=protocol,
        protocol_text=(f"chosen per row and seed on {protocol['chosen_on']} from (epochs, received share, lr x "
                       f"{p.fine_tune_lr:g}) " + ", ".join(f"({e}, {sh:g}, {lr:g})" for e, sh, lr in p.select_grid)
                       + "; the epochs, received share and lr columns show what was chosen") if not fixed
        else "fixed by the preset (" + protocol["fixed"] + ")")
    t0 = time.perf_counter()
    bar = progress(total=len(jobs) * seeds, desc=f"{benchmark} studies", unit="study")
    tell = (lambda m: bar.write(m)) if not bar.disable else say  # noqa: E731
    done = 0
    ran, ran_s = 0, 0.0   # studies run (not reused from an earlier run) and their seconds: the ETA's rate
    for t, srcs in jobs:
        tgt = cid[t]
        for s in range(seeds):
            ts = time.perf_counter()
            study_dir = out / "runs" / tgt / f"seed{s}"
            nodes = []
            for d in srcs:  # each source's explicit policy: its real train patches (Full) may leave
                nc = dict(by_id[cid[d]].to_node_config(), seed=s, data=str(centres / info[cid[d]]["source"]))
                nc.update({"export-real": "true", "export-max-ipc": max(ipcs), "workers": int(workers),
                           "export-max-releases": max(int(nc.get("export-max-releases", 0)), max_releases)})
                nodes.append(nc)
            nodes.append(dict(by_id[tgt].to_node_config(), seed=s, data=str(centres / info[tgt]["target"]),
                              workers=int(workers)))   # its rows fine-tuned side by side
            names = [cid[d] for d in srcs]
            eta = ""
            if ran:
                left = ran_s / ran * (len(jobs) * seeds - done)
                eta = f", about {left / 60:.0f} min left"
            tell(f"[{benchmark}] {done + 1}/{len(jobs) * seeds}: {'+'.join(names)} -> {tgt}, seed {s}, "
                 f"ipc {ipcs} + Full{eta}")
            try:
                cfg = StudyConfig(source=names[0], sources=names if len(names) > 1 else [], target=tgt,
                                  ipcs=list(ipcs), full=True, fine_tune_epochs=epochs, seed=s, preset=preset,
                                  study_dir=study_dir, trust=trust, runtime=runtime, reply_timeout=timeout,
                                  identity_timeout=timeout)
                outcome = finished_study(study_dir, cfg) if resume else None
                if outcome is not None:
                    tell(f"[{benchmark}] {tgt} seed {s}: finished in an earlier run, reused ({study_dir / 'report.json'})")
                else:
                    outcome = run_study(cfg, nodes)
                    write_report(cfg, outcome, command=f"coordinator transfer --benchmark {benchmark} "
                                                       f"({'+'.join(names)} -> {tgt}, seed {s})")
                    ran, ran_s = ran + 1, ran_s + time.perf_counter() - ts
            except (HistoddError, OSError, RuntimeError, ValueError, KeyError) as exc:  # the study, not the run
                faults.append({"target": tgt, "seed": s, "transfer": None, "centre": "-", "stage": "study",
                               "kind": "error", "fault": f"study failed: {type(exc).__name__}: {str(exc)[:300]}"})
                tell(f"[{benchmark}] {tgt} seed {s}: study failed ({type(exc).__name__}: {str(exc)[:200]})")
            else:
                for r in table_rows(outcome):
                    if r.get("protocol") not in ("union", "-", None) and r.get("protocol") != p.fine_tune_protocol:
                        continue  # one protocol per row in this benchmark
                    raw = next((x for x in outcome.rows if (x.get("name") == "none" and r["transfer"] == "no transfer")
                                or (x.get("source") == r["source"] and x.get("mode") != "none"
                                    and _same(x, r))), {})
                    per_seed.append({"target": tgt, "sources": r["source"] if r["source"] != "-" else "+".join(names),
                                     "seed": s,
                                     "transfer": transfer_label(r["transfer"]),
                                     "patch_bal_acc": r.get("patch_bal_acc"), "patch_acc": r.get("patch_acc"),
                                     "patch_auc": r.get("patch_auc"), "slide_acc": r.get("slide_acc"),
                                     "slide_auc": r.get("slide_auc"), "epochs": r.get("epochs"),
                                     "received_share": None if r["transfer"] == "no transfer"
                                     else raw.get("received_share"),
                                     "lr_scale": (raw.get("selection") or {}).get("lr_scale"),
                                     "fine_tune_s": r.get("fine_tune_s"), "select_s": raw.get("select_seconds"),
                                     "bytes": r.get("bytes"), "bytes_vs_full": r.get("bytes_vs_full"),
                                     "patch_bytes": r.get("patch_bytes"),
                                     "images": r.get("images"), "protocol": r.get("protocol"),
                                     "slide_epochs": raw.get("slide_epochs"), "slide_note": raw.get("slide_note")})
                _bytes_vs_received_full(per_seed, tgt, s)
                for f in outcome.faults:
                    row = _fault_transfer(f.detail)
                    if row is None and f.centre != tgt:  # a source's fault: its sets, not "target alone"
                        row = bs.ALL_TRANSFERS
                    faults.append({"target": tgt, "seed": s, "transfer": row,
                                   "centre": f.centre, "stage": f.stage, "kind": f.kind, "fault": f.line()})
                tell(f"[{benchmark}] {tgt} seed {s}: {time.perf_counter() - ts:.0f} s, "
                     f"{len(outcome.rows)} row(s), {len(outcome.faults)} fault(s)")
            done += 1
            bar.update(1)
            if done < len(jobs) * seeds:  # the summary so far (the last one is written below, whole)
                outputs.write(per_seed, faults, done=done, seconds=time.perf_counter() - t0)
    bar.close()
    return outputs.write(per_seed, faults, done=done, seconds=time.perf_counter() - t0)


@dataclass(frozen=True)
class _Outputs:
    """The run's summary files (summary.md/csv/png, summary_per_seed.csv, report.json, run_config.json), written
    after every study as well as at the end: a run stopped mid-way leaves the summary of the studies it finished,
    marked partial (targets it never reached left out), until the same command resumes it."""

    out: Path
    benchmark: str
    command: str
    centres: Path
    manifest: dict[str, Any]
    plan: list[dict[str, Any]]
    expected: dict[str, list[str]]
    sources: dict[str, str]
    ipcs: list[int]
    seeds: int
    preset: str
    epochs: int
    protocol: dict[str, Any]
    protocol_text: str

    def write(self, per_seed: list[dict[str, Any]], faults: list[dict[str, Any]], *, done: int,
              seconds: float) -> dict[str, Any]:
        total = len(self.plan) * self.seeds
        partial = done < total
        reached = {r["target"] for r in per_seed} | {f["target"] for f in faults}
        expected = {t: v for t, v in self.expected.items() if t in reached} if partial else self.expected
        rows = bs.summarise(per_seed, faults, expected=expected, sources=self.sources)
        seconds = round(seconds, 1)
        hosp, mf = [int(d) for d in self.manifest["hospitals"]], self.manifest
        head = [f"# {self.benchmark}: transfer into {', '.join(self.expected)} ({len(self.plan)} target(s))", ""]
        if partial:
            head += [f"**Partial: {done} of {total} studies done** (the run is still going or was stopped; the "
                     "same command with the same --out resumes from here).", ""]
        head.append(
            f"Centres {self.centres} ({len(hosp)} hospitals, {mf.get('target_train_per_class')} labelled train "
            f"patches per class at each target; Full = all of the sources' train patches, no cap). Preset "
            f"{self.preset}; {self.seeds} seed(s) (0..{self.seeds - 1}); mean with a 95% t-interval over seeds; gains "
            "over \"target alone\" paired by seed. Several sources: their sets pooled into one row. Fine-tuning "
            f"protocol: {self.protocol_text}. {slide_text(mf, per_seed)} {seconds:.0f} s wall.")
        report = {"benchmark": self.benchmark, "layout": "hospitals", "centres": str(self.centres),
                  "command": self.command, "hospitals": hosp, "plan": self.plan, "ipcs": list(self.ipcs),
                  "seeds": self.seeds, "preset": self.preset, "epochs_requested": self.epochs,
                  "protocol": self.protocol, "manifest": {k: mf.get(k) for k in (
                      "hospitals", "target_train_per_class", "seed", "limit_per_class", "stain_angle_deg_between")},
                  "partial": partial, "studies": total, "studies_done": done,
                  "rows": rows, "per_seed": per_seed, "faults": faults, "seconds": seconds}
        out = self.out
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "report.json", report)
        atomic_write_text(out / "summary.md", bs.markdown(rows, head))
        atomic_write_text(out / "summary.csv", bs.csv_text(rows, bs.SUMMARY_COLS))
        seed_rows = per_seed + [{"target": f["target"], "sources": self.sources.get(f["target"], ""),
                                 "seed": f["seed"], "fault": f["fault"],
                                 "transfer": {None: "(all rows)", bs.ALL_TRANSFERS: "(all transfer rows)"}.get(
                                     f["transfer"], f["transfer"])} for f in faults]
        atomic_write_text(out / "summary_per_seed.csv",
                          bs.csv_text(seed_rows, ["target", "sources", "seed", "transfer"] + bs.SEED_COLS))
        title = f"{self.benchmark}: {len(self.plan)} target(s), {self.seeds} seed(s)" + (
            f" - partial, {done} of {total} studies" if partial else "")
        atomic_write_bytes(out / "summary.png", bs.plot(rows, title))
        write_run_config(out, self.command or f"coordinator transfer --benchmark {self.benchmark}",
                         {k: v for k, v in report.items() if k not in ("rows", "per_seed", "faults")})
        return report


def slide_text(manifest: dict[str, Any], per_seed: list[dict[str, Any]]) -> str:
    """The summary's sentence on its slide columns: what the slides are, or why the columns are empty."""
    spec = manifest.get("pseudo_slides")
    if not spec:
        return ("Slide columns: none (this folder has no pseudo-slides; make-pcam-centres --hospitals builds them "
                "unless --no-slides).")
    if not any(r.get("slide_auc") is not None for r in per_seed):
        notes = sorted({str(r["slide_note"]) for r in per_seed if r.get("slide_note")})
        return "Slide columns: empty (" + ("; ".join(notes) or "no centre reported slide metrics") + ")."
    (lo, hi), (s_lo, s_hi) = spec["patches"], spec["tumour_share"]
    epochs = _distinct_values(r.get("slide_epochs") for r in per_seed)
    return (f"Slide columns: pseudo-slides of real patches (bags of {lo}-{hi} patches of one split, at most half "
            f"of its normals; tumour slides {s_lo:.0%}-{s_hi:.0%} tumour patches, normal slides none; "
            "docs/federation.md \"Pseudo-slides\"), the MIL head pre-trained on the target's own train slides, "
            f"fine-tuned {epochs} epoch(s) per row on its own + the received slide sets (per-slide synthetic sets; "
            "Full: the sources' real train slides), slide AUC / accuracy on its test slides (threshold calibrated "
            "on its own train slides).")


def _distinct_values(vals) -> str:
    return "/".join(str(v) for v in dict.fromkeys(v for v in vals if v is not None)) or "-"


def _same(raw: dict[str, Any], row: dict[str, Any]) -> bool:
    """The raw outcome row behind a table row (same kind and ipc)."""
    if row["transfer"] == "Full":
        return raw.get("mode") == "full"
    return raw.get("mode") in ("synthetic", "coreset") and f"ipc {raw.get('ipc')}" == row["transfer"]


def _bytes_vs_full(rows: list[dict[str, Any]]) -> None:
    """``bytes_vs_full`` of one study's rows: bytes / the bytes of the Full row actually received in it (a
    pooled ipc row that lost a source's set is still measured against the Full the target got);
    ``patch_bytes_vs_full`` the same for the patch-level parts alone (None where a study did not record them)."""
    full = next((r for r in rows if r["transfer"] == "+ Full" and r.get("bytes")), None)
    for r in rows:
        if r["transfer"] != bs.BASE:
            r["bytes_vs_full"] = round(float(r.get("bytes") or 0) / float(full["bytes"]), 5) if full else None
            known = full is not None and full.get("patch_bytes") and r.get("patch_bytes") is not None
            r["patch_bytes_vs_full"] = round(float(r["patch_bytes"]) / float(full["patch_bytes"]), 5) if known \
                else None


def _bytes_vs_received_full(per_seed: list[dict[str, Any]], target: str, seed: int) -> None:
    _bytes_vs_full([r for r in per_seed if r["target"] == target and r["seed"] == seed])
