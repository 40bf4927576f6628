"""Content hashes of patch sets: a leaf below distillation, privacy and federation (all of them name a
set by its content)."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from histodd_fed.patchset import PatchSet


def data_hash(real: PatchSet) -> str:
    """SHA-256 over the images, labels and slide indices of a patch set."""
    h = hashlib.sha256()
    h.update(json.dumps({"shape": list(real.images.shape), "classes": real.class_names,
                         "slides": real.slide_ids}).encode())
    h.update(np.ascontiguousarray(real.images).tobytes())
    h.update(real.labels.astype(np.int64).tobytes())
    h.update(real.slide_index.astype(np.int32).tobytes())
    return h.hexdigest()
