#!/usr/bin/env bash
# The one device call of issue 22 item 4: the paper recipe on PCam on a lent GPU (H100 / H200), one shot.
#
# How a session runs it (15 min of device time in all, start-up included; this call uses ~9 of them):
#   1. here, once:  .venv/bin/python benchmarks/gpu/pack_pcam.py
#        -> .gpu-data/ (2,000 train patches per class + all 3,000 valid, original 96 px JPEGs, ~30 MiB;
#           listed in .git/info/exclude, so it travels only when carried)
#      and check it runs:  nice .venv/bin/python -m pytest -q tests/test_gpu_paper_script.py
#   2. the `run` tool, once:
#        command:   bash benchmarks/gpu/run_on_device.sh
#        carry:     [".gpu-data"]
#        timeout_s: 540          (the script stops adding work at --deadline-s 500)
#      then `give_back` at once (there is no time for a second full run).
#   3. What comes back under files_at: paper_gpu.json (every step, with timestamps), log.txt,
#      synthetic_grid.png (initial vs synthetic images), synthetic_set.npz (the set, to re-audit here).
#      Copy into docs/benchmarks.md, "Prepared: the paper schedule on PCam": the GPU name and torch
#      (a_device); b_timing's outer_s / inner_s per engine (U = 10) and outer_s_at_paper_u; c_distill's
#      k_run / k_paper, outer_step_s_median (U = 100), pool_s, full_schedule_min_extrapolated and
#      goal_full_schedule_le_600_s; d_eval's synthetic_summary (and initial_summary) with its seeds;
#      e_gate's passed and first reason; the drift record (c_distill.drift). Keep paper_gpu.json as
#      benchmarks/results/paper_gpu_pcam.json.
set -o pipefail
cd "$(dirname "$0")/../.." || exit 2
: "${OUT:?OUT is not set (the device machine sets it)}"
test -f .gpu-data/pack.json || { echo "no .gpu-data/pack.json: run benchmarks/gpu/pack_pcam.py here and carry .gpu-data" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/log.txt"
PYTHONUNBUFFERED=1 python3 benchmarks/gpu/paper_pcam.py --data .gpu-data --out "$OUT" \
  --budget-s 330 --deadline-s 500 --reserve-s 120 2>&1 | tee -a "$OUT/log.txt"
