"""Shared test fixtures: paths to ../shared/data and a small random patch set."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HISTODD_NO_PROGRESS", "1")
# The CLI reads the key passphrase from HISTODD_KEY_PASSPHRASE when it is set; a user's own value must not
# leak into tests of clear keys (tests that need a passphrase set their own).
os.environ.pop("HISTODD_KEY_PASSPHRASE", None)

from histodd_fed.allocator import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as the CLIs do: the suite's torch work without a page fault per step

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} absent: real-data tests need ../shared/data next to the checkout")
    return SHARED_DATA


@pytest.fixture()
def tiny_patchset():
    from histodd_fed.patchset import PatchSet

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    labels = np.array([0, 1] * 6)
    return PatchSet(
        images=images,
        labels=labels,
        class_names=["normal", "tumour"],
        slide_index=np.repeat(np.arange(3), 4),
        slide_ids=["s0", "s1", "s2"],
        slide_labels={"s0": 0, "s1": 1, "s2": 1},
        coords=rng.integers(0, 1000, size=(12, 2)),
    )
