"""Diagnostic for the demo's slide columns: CLAM on the row's FINE-TUNED encoder instead of the frozen
pre-trained one.

For each finished ``coordinator demo --out DIR`` (use VALIDATION copies): fine-tune C2's classifier by
the demo's sequential protocol (no transfer / ipc 10 / Full), then encode C2's own train bags, the
received slide bags (the per-slide set the demo sent; Full: C1's real train slides) and C2's test
bags with THAT classifier, fine-tune a copy of C2's pre-trained CLAM head on them exactly as the demo
does (received bags alone, then own bags; ``slide_level``'s settings) and report slide AUC / calibrated
accuracy, next to the demo's way (frozen pre-trained encoder: ``slide_level.fine_tune``).

    .venv/bin/python benchmarks/diag_demo_slides_encoder.py DEMO_DIR [DEMO_DIR ...]
"""
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from histodd_fed.federation import local_work, slide_level  # noqa: E402
from histodd_fed.federation.centre import CentreConfig  # noqa: E402
from histodd_fed.federation.presets import get_preset  # noqa: E402
from histodd_fed.patchset import PatchSet  # noqa: E402
from screen_demo_protocols import demo_set  # noqa: E402


def per_slide_set(src: CentreConfig) -> PatchSet:
    for d in sorted((src.work_dir / "synthetic").glob("*/run_config.json")):
        if json.loads(d.read_text())["config"]["distill"].get("per_slide"):
            return PatchSet.load(d.parent)
    raise SystemExit("no per-slide set in the source's cache")


def clam_on(encoder_model, received, own, root, preset, seed, epochs):
    """slide_level.fine_tune's sequential path, with every bag (test included) from ``encoder_model``."""
    from histodd_fed.mil.bags import bags_from_patchset
    from histodd_fed.mil.train import load_mil, train_mil

    head, _ = load_mil(root / slide_level.MIL_DIR)
    enc = slide_level.encoder_for(encoder_model, preset)
    own_bags = list(bags_from_patchset(own, enc, progress=False))
    test_bags = list(bags_from_patchset(TEST[root], enc, progress=False))
    if received is not None:
        rec_bags = list(bags_from_patchset(received, enc, progress=False))
        head = train_mil(rec_bags, preset.mil_model, epochs=epochs, lr=preset.mil_fine_tune_lr, seed=seed,
                         model=head, progress=False).model
    head = train_mil(own_bags, preset.mil_model, epochs=epochs, lr=preset.mil_fine_tune_lr, seed=seed,
                     model=head, progress=False).model
    return slide_level.slide_metrics(head, test_bags, own_bags)


TEST: dict = {}


def main(argv: list[str]) -> int:
    from histodd_fed.training import load_model

    for root in map(Path, argv):
        preset = get_preset("cpu")
        pre = preset.for_protocol("sequential")
        nodes = {n["centre-id"]: CentreConfig.from_node_config(n) for n in json.loads((root / "nodes.json").read_text())}
        src, tgt = nodes["C1"], nodes["C2"]
        local_work._threads()
        p_src, p_tgt = local_work.prepare(src, preset), local_work.prepare(tgt, preset)
        TEST[p_tgt.root] = p_tgt.test
        patch_sets = {"none": None, "ipc10": demo_set(src), "Full": p_src.train}
        slide_sets = {"none": None, "ipc10": per_slide_set(src), "Full": p_src.train}
        out = {}
        for row in ("none", "ipc10", "Full"):
            rec = None if patch_sets[row] is None else local_work.prepare_received(patch_sets[row], p_tgt, pre)[0]
            srec = None if slide_sets[row] is None else local_work.prepare_received(slide_sets[row], p_tgt, pre)[0]
            model, _ = local_work._fine_tune_classifier(p_tgt, pre if rec is not None else preset.for_protocol("union"),
                                                        rec, epochs=5, seed=tgt.seed)
            new = clam_on(model, srec, p_tgt.train, p_tgt.root, pre, tgt.seed, 5)
            old = slide_level.fine_tune(load_model(p_tgt.classifier_dir), srec, p_tgt.train, p_tgt.root, pre,
                                        tgt.seed, epochs=5)
            out[row] = {"frozen_auc": round(old["slide_auc"], 3), "frozen_acc": round(old["slide_accuracy"], 3),
                        "finetuned_auc": round(new["slide_auc"], 3), "finetuned_acc": round(new["slide_accuracy"], 3)}
        print(root.name, json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
