"""A tiny Histo-DD run on generated patches makes images that teach a classifier (issue 3, Tests).

Noise init makes the starting images uninformative; the toy classes differ by H&E-like colour.
The distillation network has no normalisation layer (instance norm would erase global colour);
the evaluation classifier is a small batch-norm ConvNet trained with a fixed seed on P and on the
initial images, then scored on held-out generated patches.
Measured (seeds 0, 1, 2; lr_img 0.1, K=10, U=5, ipc 5): P accuracy 1.00 / 1.00 / 1.00, initial
images 0.09 / 0.50 / 0.50.
"""

from pathlib import Path

import numpy as np
import torch

from histodd_fed.distill import DistillConfig, run_distillation
from histodd_fed.patchset import PatchSet
from histodd_fed.training.evaluation import build_seeded_model, evaluate_classifier
from histodd_fed.training.trainer import train_classifier

TINY = Path(__file__).resolve().parents[1] / "configs" / "distill-tiny.yaml"


def colour_toy(n_per_class: int, seed: int, size: int = 16) -> PatchSet:
    """Pink (normal) vs purple (tumour) noisy patches."""
    rng = np.random.default_rng(seed)
    ims = [np.clip(np.array(base) + rng.normal(0, 12, size=(n_per_class, size, size, 3)), 0, 255).astype(np.uint8)
           for base in ([225, 150, 195], [140, 80, 165])]
    return PatchSet(images=np.concatenate(ims), labels=np.repeat([0, 1], n_per_class),
                    class_names=["normal", "tumour"])


def held_out_accuracy(images: np.ndarray, labels: np.ndarray, test: PatchSet) -> float:
    train = PatchSet(images=images, labels=labels, class_names=test.class_names)
    model = build_seeded_model("convnet", seed=0, num_classes=2, image_size=16, width=16, depth=2, norm="batch")
    train_classifier(model, train, epochs=60, lr=0.05, batch_size=32, lr_step=False, seed=0, device="cpu",
                     progress=False)
    return evaluate_classifier(model, test, device="cpu").accuracy


def test_distilled_images_train_a_better_classifier_than_their_noise_init():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors: extra threads only contend on the shared cores
    try:
        _check_distilled_beats_init()
    finally:
        torch.set_num_threads(threads)


def _check_distilled_beats_init() -> None:
    cfg = DistillConfig.from_yaml(TINY, init="noise", ipc=5, lr_img=0.1, outer_steps=10, inner_steps=5,
                                  augmentation="none", model_kwargs={"width": 16, "depth": 2, "norm": "none"},
                                  seed=0, device="cpu")
    res = run_distillation(colour_toy(16, seed=0), cfg, progress=False)
    test = colour_toy(50, seed=100)
    acc_p = held_out_accuracy(res.patchset.images, res.patchset.labels, test)
    acc_init = held_out_accuracy(res.initial_images, res.patchset.labels, test)
    assert acc_p >= 0.9 and acc_p >= acc_init + 0.3, (acc_p, acc_init)
