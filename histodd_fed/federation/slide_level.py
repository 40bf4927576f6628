"""Slide-level accuracy: a CLAM head on bags of patch features from the centre's classifier.

One bag per slide (its patches encoded by the classifier's ``features``). The head is trained on
the train split's bags (or fine-tuned from ``init``) and evaluated on the test split's bags.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from histodd_fed.federation.presets import CentrePreset
from histodd_fed.patchset import PatchSet


def bags(model, ps: PatchSet) -> list[tuple["torch.Tensor", int]]:  # noqa: F821
    """(features (N, D), slide label) for every labelled slide of ``ps`` with patches."""
    from histodd_fed.mil.features import PatchEncoder

    enc = PatchEncoder(model, batch_size=256, device="cpu")
    out = []
    for j, sid in enumerate(ps.slide_ids):
        if sid not in ps.slide_labels:
            continue
        idx = np.flatnonzero(ps.slide_index == j)
        if len(idx) == 0:
            continue
        out.append((enc.encode(np.ascontiguousarray(ps.images[idx])), int(ps.slide_labels[sid])))
    return out


def train_and_evaluate(model, train: PatchSet, test: PatchSet, preset: CentrePreset, seed: int, *,
                       init: dict[str, Any] | None = None, epochs: int | None = None):
    """Train (or fine-tune from ``init``) CLAM on ``train`` bags; return (head, test slide accuracy)."""
    import torch

    from histodd_fed.mil import create_mil

    train_bags, test_bags = bags(model, train), bags(model, test)
    if not train_bags or not test_bags:
        return None, None
    dim = int(train_bags[0][0].shape[1])
    torch.manual_seed(seed)  # head initialisation; explicit seed, never the clock
    head = create_mil(preset.mil_model, in_dim=dim, num_classes=max(train.num_classes, 2))
    if init is not None:
        head.load_state_dict(init)
    opt = torch.optim.Adam(head.parameters(), lr=2e-4 if init is not None else 1e-3, weight_decay=1e-5)
    gen = torch.Generator().manual_seed(seed)
    n_epochs = preset.mil_epochs if epochs is None else epochs
    for _ in range(n_epochs):
        head.train()
        for i in torch.randperm(len(train_bags), generator=gen).tolist():
            feats, label = train_bags[i]
            out = head(feats)
            loss = head.loss(out, torch.tensor(label)) if hasattr(head, "loss") else \
                torch.nn.functional.cross_entropy(out["logits"], torch.tensor([label]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head.eval()
    correct = 0
    with torch.no_grad():
        for feats, label in test_bags:
            out = head(feats)
            logits = out["logits"] if isinstance(out, dict) else out
            correct += int(int(logits.argmax(-1).view(-1)[0]) == label)
    return head, correct / len(test_bags)
