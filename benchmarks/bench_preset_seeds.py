"""The shipped `pcam` preset across many seeds: how often the export gate blocks it (false blocks), and
what its sets are worth on `valid`.

Each seed runs the user's own commands, exactly as docs/results.md lists them:

    centre-node distill  --patches TRAIN --preset pcam --ipc 10 --seed S --out SETS/S   # ends with the gate (gate.json)
    centre-node evaluate --train SETS/S --test VALID --preset pcam --seeds 3 --json SETS/S/eval.json

and appends one row per seed to ``--out`` (JSON lines; a killed run resumes at the next seed). The
copy detector's largest R^2 and the gate's reasons are copied from ``gate.json``; nothing is re-decided.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_preset_seeds.py --seeds 1-10 \
        --work ../runs/preset_seeds --out benchmarks/results/preset_seeds.jsonl
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "pcam-ai4all"
CLI = ROOT / ".venv" / "bin" / "centre-node"


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-", 1)
        return list(range(int(lo), int(hi) + 1))
    return [int(s) for s in text.split(",") if s]


def done_seeds(out: Path) -> set[int]:
    if not out.exists():
        return set()
    return {json.loads(line)["seed"] for line in out.read_text().splitlines() if line.strip()}


def run(cmd: list[str], log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    return rc, time.perf_counter() - t0


def max_r2(copies: dict | None) -> float | None:
    if not copies:
        return None
    vals = [v.get("max_r2") for v in copies.get("views", []) if isinstance(v, dict) and v.get("max_r2") is not None]
    if not vals and copies.get("max_r2") is not None:
        vals = [copies["max_r2"]]
    return max(vals) if vals else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="1-10")
    ap.add_argument("--ipc", type=int, default=10)
    ap.add_argument("--work", type=Path, required=True, help="where the sets go (outside the repo)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"{DATA}: PCam folder missing", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    for seed in parse_seeds(args.seeds):
        if seed in done_seeds(args.out):
            continue
        out = args.work / f"s{seed}"
        rc_d, t_d = run([str(CLI), "distill", "--patches", str(DATA / "train"), "--preset", "pcam",
                         "--ipc", str(args.ipc), "--seed", str(seed), "--out", str(out)], args.work / f"s{seed}.distill.log")
        row: dict = {"seed": seed, "ipc": args.ipc, "commit": commit, "distill_rc": rc_d, "distill_s": round(t_d, 1)}
        gate_path = out / "gate.json"
        if gate_path.exists():
            gate = json.loads(gate_path.read_text())
            row.update(passed=gate["passed"], reasons=gate["reasons"], copies=gate.get("copies"))
        meta_path = out / "patchset.json"
        if meta_path.exists():   # best-of-K: every candidate's held-out accuracy and the one kept
            sel = json.loads(meta_path.read_text()).get("meta", {}).get("selection")
            if sel:
                row["selection"] = {k: sel.get(k) for k in ("candidates", "chosen", "chosen_seed", "seconds")}
        if rc_d == 0:
            ej = out / "eval.json"
            rc_e, t_e = run([str(CLI), "evaluate", "--train", str(out), "--test", str(DATA / "valid"),
                             "--preset", "pcam", "--seeds", "3", "--json", str(ej)], args.work / f"s{seed}.eval.log")
            row.update(eval_rc=rc_e, eval_s=round(t_e, 1))
            if ej.exists():
                row["eval"] = json.loads(ej.read_text())
        with args.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps({k: row.get(k) for k in ("seed", "distill_rc", "passed", "distill_s")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
