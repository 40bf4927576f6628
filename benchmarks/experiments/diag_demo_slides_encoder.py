"""The demo's slide columns with each slide encoder (preset field ``slide_encoder``), on finished demos.

For each finished ``coordinator demo --out DIR`` (use VALIDATION copies): re-run C2's rows "no transfer",
ipc 10 and Full through the library path the demo itself runs (``fine_tuning.own_only_fine_tune`` and
``fine_tuning._fine_tune_opened``: classifier fine-tune, then CLAM via ``fine_tuning.slide_fine_tune``),
for every protocol of the preset and every slide encoder asked for, on the sets C1 produced in that run
(its ipc 10 patch set and per-slide set from its synthetic cache; Full: its prepared train split).
``frozen``: CLAM on C2's pre-trained classifier (reproduces the demo's slide columns of a frozen-encoder
run); ``fine_tuned``: every bag of a row re-encoded with that row's fine-tuned classifier. Nothing is
cached (the demo's own caches are not written).

    .venv/bin/python benchmarks/experiments/diag_demo_slides_encoder.py DEMO_DIR [DEMO_DIR ...] [--encoders=frozen,fine_tuned]

Prints one JSON line per copy, encoder and protocol: slide AUC / calibrated slide accuracy / patch
balanced accuracy of each row; writes DEMO_DIR/diag-slide-encoder.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from histodd_fed.atomic import atomic_write_json  # noqa: E402
from histodd_fed.federation import centre_data, fine_tuning  # noqa: E402
from histodd_fed.federation.centre import CentreConfig  # noqa: E402
from histodd_fed.federation.presets import get_preset  # noqa: E402
from histodd_fed.patchset import PatchSet  # noqa: E402
from screen_demo_protocols import demo_set  # noqa: E402

EPOCHS = 5  # configs/demo.yaml fine_tune_epochs


def per_slide_set(src: CentreConfig) -> PatchSet:
    for d in sorted((src.work_dir / "synthetic").glob("*/run_config.json")):
        if json.loads(d.read_text())["config"]["distill"].get("per_slide"):
            return PatchSet.load(d.parent)
    raise SystemExit("no per-slide set in the source's cache")


def _short(r: dict) -> dict:
    return {"slide_auc": round(r["slide_auc"], 3), "slide_acc": round(r["slide_accuracy"], 3),
            "patch_bal_acc": round(r["patch_balanced_accuracy"], 3)}


def main(argv: list[str]) -> int:
    encoders = ["frozen", "fine_tuned"]
    roots = []
    for a in argv:
        if a.startswith("--encoders="):
            encoders = a.split("=", 1)[1].split(",")
        else:
            roots.append(Path(a))
    centre_data.one_thread()
    for root in roots:
        nodes = {n["centre-id"]: CentreConfig.from_node_config(n) for n in json.loads((root / "nodes.json").read_text())}
        src, tgt = nodes["C1"], nodes["C2"]
        out: dict = {}
        for enc in encoders:
            preset = get_preset("cpu", slide_encoder=enc)
            p_src, p_tgt = centre_data.prepare(src, preset), centre_data.prepare(tgt, preset)
            sets = {"ipc10": (demo_set(src), per_slide_set(src)), "Full": (p_src.train, p_src.train)}
            # "no transfer": the own-only fine-tune (union's; the same row for both protocols)
            none = fine_tuning.own_only_fine_tune(p_tgt, preset.for_protocol("union"), epochs=EPOCHS, seed=tgt.seed)
            for proto in preset.protocols():
                pre = preset.for_protocol(proto)
                res = {"none": _short(none)}
                for row, (patch, slides) in sets.items():
                    res[row] = _short(fine_tuning._fine_tune_opened(tgt, pre, p_tgt, patch=patch, slides=slides,
                                                                    epochs=EPOCHS))
                out.setdefault(enc, {})[proto] = res
                print(root.name, enc, proto, json.dumps(res), flush=True)
        atomic_write_json(root / "diag-slide-encoder.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
