"""Screen the target's receive protocols for the demo (patch level), over several fine-tuning seeds.

For a finished ``coordinator demo --out DIR`` run (use a VALIDATION copy: a demo config with another
``seed``, never the seeds the results report): take the ipc-10 set the source distilled in that run
(read from the source's synthetic cache: the very set that was sent) and the source's
train split (Full), and fine-tune the target's pre-trained classifier with every protocol variant and
every fine-tuning seed (``fine_tuning._fine_tune_classifier``, seeds ``demo seed + k``); patch balanced
accuracy / AUC on the target's test split, next to "no transfer" (own data only, one computation for
all variants: no variant changes the own-only fine-tune).

    .venv/bin/python benchmarks/experiments/screen_demo_protocols.py DEMO_DIR [variant,variant,...] [--seeds=3] [--preset=cpu] [--control]
        [--out=screen-protocols.json]

``--control``: also score 20 uniform-noise images (10 per class) with every variant: what the variant's
extra steps do without any information from the source.

Prints one JSON line per variant, row and seed, then per variant the seed-mean balanced accuracy of
each row and the share of Full's gain, and writes DEMO_DIR/screen-protocols.json.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from histodd_fed.federation import centre_data, distil_cache, fine_tuning  # noqa: E402
from histodd_fed.federation.centre import CentreConfig  # noqa: E402
from histodd_fed.federation.presets import get_preset  # noqa: E402
from histodd_fed.patchset import PatchSet  # noqa: E402

#: every variant starts from these receive settings (the sequential protocol before issue 12 section 4),
#: whatever the preset ships, so a variant name means the same thing under any preset
BASE = {"sequential_min_steps": 0, "sequential_replay": 0.0, "sequential_lr_scale": 10.0, "received_share": 0.5,
        "fine_tune_seeds": 1}
#: name -> (protocol, CentrePreset overrides of the receive fields, on top of BASE). ``epochs``: fine-tune
#: epochs of the variant's rows (default: the preset's); "no transfer" is then re-run with the same epochs
#: (its own-only fine-tune), and the variant's share is against that baseline.
VARIANTS: dict[str, tuple[str, dict]] = {
    "union": ("union", {}),
    "union_s25": ("union", {"received_share": 0.25}),
    "union_s75": ("union", {"received_share": 0.75}),
    "union_s90": ("union", {"received_share": 0.9}),
    "union_e10": ("union", {"epochs": 10}),
    "union_s75_e10": ("union", {"received_share": 0.75, "epochs": 10}),
    "seq": ("sequential", {}),
    "seq_steps25": ("sequential", {"sequential_min_steps": 25}),
    "seq_steps50": ("sequential", {"sequential_min_steps": 50}),
    "seq_replay25": ("sequential", {"sequential_replay": 0.25}),
    "seq_replay50": ("sequential", {"sequential_replay": 0.5}),
    "seq_steps25_replay25": ("sequential", {"sequential_min_steps": 25, "sequential_replay": 0.25}),
    "seq_steps50_replay25": ("sequential", {"sequential_min_steps": 50, "sequential_replay": 0.25}),
    "seq_lr5": ("sequential", {"sequential_lr_scale": 5.0}),
    "seq_lr20": ("sequential", {"sequential_lr_scale": 20.0}),
}


def demo_set(src: CentreConfig, ipc: int = 10):
    """The patch-level ipc set the source distilled in the demo run (its synthetic cache), or None."""
    for d in sorted((src.work_dir / "synthetic").glob("*/run_config.json")):
        c = json.loads(d.read_text())["config"]["distill"]
        if not c.get("per_slide") and int(c.get("ipc", 0)) == ipc:
            print(f"ipc{ipc} set: the demo's own ({d.parent.name})", flush=True)
            return PatchSet.load(d.parent)
    return None


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    argv = list(argv)
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    root = Path(args[0])
    names = args[1].split(",") if len(args) > 1 else ["union", "seq"]
    n_seeds = int(opts.get("seeds", 3))
    preset = get_preset(opts.get("preset", "cpu"))
    nodes = {n["centre-id"]: CentreConfig.from_node_config(n) for n in json.loads((root / "nodes.json").read_text())}
    src, tgt = nodes["C1"], nodes["C2"]
    centre_data.one_thread()
    p_src, p_tgt = centre_data.prepare(src, preset), centre_data.prepare(tgt, preset)
    epochs = preset.fine_tune_epochs
    ipc10 = demo_set(src) or distil_cache.distil_cached(src, preset, p_src, ipc=10, seed=src.seed).patchset
    results: list[dict] = []

    def score(variant: str, row: str, pre, received, epochs: int = epochs) -> list[float]:
        rec = None if received is None else fine_tuning.prepare_received(received, p_tgt, pre)[0]
        accs = []
        for k in range(n_seeds):
            t0 = time.perf_counter()
            model, info = fine_tuning._fine_tune_classifier(p_tgt, pre, rec, epochs=epochs, seed=tgt.seed + k)
            m = centre_data.patch_metrics(model, p_tgt.test)
            r = {"variant": variant, "row": row, "ft_seed": tgt.seed + k, "epochs": epochs,
                 "bal_acc": round(m["patch_balanced_accuracy"], 4), "auc": round(m["patch_auc"], 4),
                 "received_s": info.get("received_train_seconds"), "received_epochs": info.get("received_epochs"),
                 "s": round(time.perf_counter() - t0, 1)}
            results.append(r)
            accs.append(m["patch_balanced_accuracy"])
            print(json.dumps(r), flush=True)
        return accs

    own_only = replace(preset, fine_tune_protocol="union", also_protocols=())
    nones = {epochs: score("-", "no transfer", own_only, None)}
    summary = []
    for name in names:
        proto, over = VARIANTS[name]
        over = dict(over)
        n_epochs = int(over.pop("epochs", epochs))
        if n_epochs not in nones:  # a longer schedule: "no transfer" with the same epochs
            nones[n_epochs] = score("-", f"no transfer e{n_epochs}", own_only, None, n_epochs)
        none = nones[n_epochs]
        pre = replace(preset, fine_tune_protocol=proto, also_protocols=(), **{**BASE, **over})
        ipc = score(name, "ipc10", pre, ipc10, n_epochs)
        full = score(name, "Full", pre, p_src.train, n_epochs)
        n, i, f = float(np.mean(none)), float(np.mean(ipc)), float(np.mean(full))
        s = {"variant": name, "epochs": n_epochs, "none": round(n, 4), "ipc10": round(i, 4), "full": round(f, 4),
             "share": round((i - n) / (f - n), 3) if f != n else None,
             "ipc10_by_seed": [round(x, 4) for x in ipc], "full_by_seed": [round(x, 4) for x in full],
             "none_by_seed": [round(x, 4) for x in none]}
        if "control" in opts or "--control" in argv:   # 20 uniform-noise images: the steps without the data
            rng = np.random.default_rng(0)
            imgs = rng.integers(0, 256, (20, *p_src.train.images.shape[1:]), dtype=np.uint8)
            noise = PatchSet(images=imgs, labels=np.repeat([0, 1], 10).astype(np.int64),
                             class_names=list(p_src.train.class_names), kind="synthetic")
            c = float(np.mean(score(name, "control_noise", pre, noise, n_epochs)))
            s.update(control_noise=round(c, 4), control_share=round((c - n) / (f - n), 3) if f != n else None)
        summary.append(s)
        print("SUMMARY " + json.dumps(s), flush=True)
    (root / opts.get("out", "screen-protocols.json")).write_text(json.dumps({"runs": results, "summary": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
