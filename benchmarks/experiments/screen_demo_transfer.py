"""Screen ipc-10 distillation recipes for the demo through the real receive protocols (patch level).

For a finished ``coordinator demo --out DIR`` run (use a VALIDATION copy: a demo config with another
``seed``, never the seeds the results report): distil the source's prepared train split with each
recipe (``distil_cache.distil_cached``, cached in the source's work dir), run the source's export gate
(``privacy_reports.gate_report``), and for every recipe fine-tune the target's pre-trained classifier by
each protocol (``union``, ``sequential``; ``fine_tuning._fine_tune_classifier``) and report patch
balanced accuracy / AUC on the target's test split, next to "no transfer" (own data only) and Full
(the source's train split). A blocked recipe is still scored (marked), to see what the gate costs.

    .venv/bin/python benchmarks/experiments/screen_demo_transfer.py DEMO_DIR [recipe,recipe,...] [--preset=cpu]

``control_noise``: 10 uniform-noise images per class instead of a distilled set (a control: what
the extra fine-tuning steps do without any information from the source).

Prints one line per recipe and protocol, and writes DEMO_DIR/screen-transfer.json.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from histodd_fed.federation import centre_data, distil_cache, fine_tuning, privacy_reports  # noqa: E402
from histodd_fed.federation.centre import CentreConfig  # noqa: E402
from histodd_fed.federation.presets import get_preset  # noqa: E402

PCAM = "configs/preset-pcam.yaml"
#: name -> (distillation config, DistillConfig overrides on top of the preset's)
RECIPES: dict[str, tuple[str | None, dict]] = {
    "gm": (None, {}),                                     # the cpu preset's recipe (init real, lr_img 1.0)
    "dm": (PCAM, {"checkpoint_every": 0}),                # the --preset pcam recipe (the cpu-dm preset)
    "dm_priv02": (PCAM, {"checkpoint_every": 0, "privacy_step": 0.02}),
    "dm_priv05": (PCAM, {"checkpoint_every": 0, "privacy_step": 0.05}),
    "dm_priv10": (PCAM, {"checkpoint_every": 0, "privacy_step": 0.10}),
    "dm_noise": (PCAM, {"checkpoint_every": 0, "init": "noise"}),
    "dm_mix8_priv05": (PCAM, {"checkpoint_every": 0, "init_mix": 8, "privacy_step": 0.05}),
    "dm_mosaic_priv05": (PCAM, {"checkpoint_every": 0, "init": "mosaic", "privacy_step": 0.05}),
    "gm_priv05": (None, {"privacy_step": 0.05, "lr_img": 0.3}),
}


def main(argv: list[str]) -> int:
    args = [a for a in argv if not a.startswith("--")]
    preset_name = next((a.split("=", 1)[1] for a in argv if a.startswith("--preset=")), "cpu")
    root = Path(args[0])
    names = args[1].split(",") if len(args) > 1 else list(RECIPES)
    preset = get_preset(preset_name)
    nodes = {n["centre-id"]: CentreConfig.from_node_config(n) for n in json.loads((root / "nodes.json").read_text())}
    src, tgt = nodes["C1"], nodes["C2"]
    centre_data.one_thread()
    p_src, p_tgt = centre_data.prepare(src, preset), centre_data.prepare(tgt, preset)
    epochs = preset.fine_tune_epochs
    results: list[dict] = []

    def score(name: str, received, blocked: bool | None, extra: dict) -> None:
        for proto in ("union", "sequential"):
            t0 = time.perf_counter()
            pre = replace(preset, fine_tune_protocol=proto, also_protocols=())
            rec = None if received is None else fine_tuning.prepare_received(received, p_tgt, pre)[0]
            model, info = fine_tuning._fine_tune_classifier(p_tgt, pre, rec, epochs=epochs, seed=tgt.seed)
            m = centre_data.patch_metrics(model, p_tgt.test)
            row = {"recipe": name, "protocol": proto, "blocked": blocked, **extra,
                   "bal_acc": round(m["patch_balanced_accuracy"], 4), "auc": round(m["patch_auc"], 4),
                   "received_s": info.get("received_train_seconds"), "s": round(time.perf_counter() - t0, 1)}
            results.append(row)
            print(json.dumps(row), flush=True)

    score("no transfer", None, None, {})
    score("Full", p_src.train, None, {"images": len(p_src.train)})
    for name in names:
        if name == "control_noise":  # 10 uniform-noise images per class: is a gain the data's or the extra steps'?
            import numpy as np

            from histodd_fed.patchset import PatchSet

            rng = np.random.default_rng(0)
            imgs = rng.integers(0, 256, (20, *p_src.train.images.shape[1:]), dtype=np.uint8)
            noise = PatchSet(images=imgs, labels=np.repeat([0, 1], 10).astype(np.int64),
                             class_names=list(p_src.train.class_names), kind="synthetic")
            score(name, noise, None, {})
            continue
        config, overrides = RECIPES[name]
        pre = preset if config is None else replace(preset, distill_config=config, distill_overrides=())
        pre = replace(pre, distill_overrides=tuple({**dict(pre.distill_overrides), **overrides}.items()))
        t0 = time.perf_counter()
        res = distil_cache.distil_cached(src, pre, p_src, ipc=10, seed=src.seed)
        blocked, report, msg = privacy_reports.gate_report(res.patchset, p_src)
        score(name, res.patchset, blocked, {"distil_s": res.seconds, "gate": msg[:160],
                                            "screen_s": round(time.perf_counter() - t0, 1)})
    (root / "screen-transfer.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
