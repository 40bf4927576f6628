"""Diagnostic for the demo's slide columns: would the target's FINE-TUNED patch classifiers rank its
test slides? (No CLAM.)

For each finished ``coordinator demo --out DIR`` (use VALIDATION copies): fine-tune C2's classifier
as the demo does (cpu preset, union and sequential) for no transfer / ipc 10 (the set the demo sent,
from C1's synthetic cache) / Full, then score every test slide by the mean of its 3 highest patch
tumour probabilities (and by its max) and print the slide AUCs [top-3, max] per row. Compare with
the demo's slide_auc column (CLAM on C2's frozen pre-trained encoder).

    .venv/bin/python benchmarks/experiments/diag_demo_slides.py DEMO_DIR [DEMO_DIR ...]
"""
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from histodd_fed.federation import centre_data, fine_tuning  # noqa: E402
from histodd_fed.federation.centre import CentreConfig  # noqa: E402
from histodd_fed.federation.presets import get_preset  # noqa: E402
from histodd_fed.training.evaluation import predict_probs  # noqa: E402
from screen_demo_protocols import demo_set  # noqa: E402


def auc(s, y):
    s, y = np.asarray(s), np.asarray(y)
    pos, neg = s[y == 1], s[y == 0]
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


def main(argv: list[str]) -> int:
    for root in map(Path, argv):
        preset = get_preset("cpu")
        nodes = {n["centre-id"]: CentreConfig.from_node_config(n) for n in json.loads((root / "nodes.json").read_text())}
        src, tgt = nodes["C1"], nodes["C2"]
        centre_data.one_thread()
        p_src, p_tgt = centre_data.prepare(src, preset), centre_data.prepare(tgt, preset)
        test = p_tgt.test
        ids = np.unique(test.slide_index)
        y = np.array([test.slide_labels[test.slide_ids[i]] for i in ids])
        ipc10 = demo_set(src)
        out = {}
        for proto in ("union", "sequential"):
            pre = preset.for_protocol(proto)
            for row, rec in (("none", None), ("ipc10", ipc10), ("Full", p_src.train)):
                if proto == "sequential" and row == "none":
                    out[f"{proto} {row}"] = out["union none"]   # own data only: the same fine-tune
                    continue
                r = None if rec is None else fine_tuning.prepare_received(rec, p_tgt, pre)[0]
                model, _ = fine_tuning._fine_tune_classifier(p_tgt, pre, r, epochs=5, seed=tgt.seed)
                pr = predict_probs(model, test.images, device="cpu")[:, 1]
                top3 = [np.sort(pr[test.slide_index == i])[-3:].mean() for i in ids]
                mx = [pr[test.slide_index == i].max() for i in ids]
                out[f"{proto} {row}"] = (round(auc(top3, y), 3), round(auc(mx, y), 3))
        print(root.name, json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
