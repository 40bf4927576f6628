"""What every study run shares: loading its data, evaluating sets with the preset, its run record."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histodd_fed.patchset import PatchSet
from histodd_fed.runconfig import write_run_config
from histodd_fed.studies.presets import StudyPreset
from histodd_fed.studies.training_sets import StudyData
from histodd_fed.training.data import load_patches
from histodd_fed.training.evaluation import SetEvaluation, evaluate_sets

log = logging.getLogger(__name__)


def fingerprint(ps: PatchSet) -> str:
    """SHA-256 prefix of a patch set's pixels, labels and classes."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(ps.images).tobytes())
    h.update(ps.labels.tobytes())
    h.update(",".join(ps.class_names).encode())
    return h.hexdigest()[:16]


def load_study_data(patches: str | Path | PatchSet, test: str | Path | PatchSet, preset: StudyPreset) -> StudyData:
    """Load (resize, cap per class) the training and test sets of a study."""
    train = patches if isinstance(patches, PatchSet) else load_patches(
        patches, image_size=preset.image_size, limit=preset.limit_per_class, seed=preset.seed,
        crop_center=preset.crop_center)
    tst = test if isinstance(test, PatchSet) else load_patches(
        test, image_size=preset.image_size, limit=preset.test_limit_per_class, seed=preset.seed + 1,
        crop_center=preset.crop_center)
    log.info("study data: %d train %s, %d test %s, %d px", len(train), train.class_counts(), len(tst),
             tst.class_counts(), train.image_size)
    return StudyData(train=train, test=tst, fingerprint=fingerprint(train))


@dataclass
class StudyRun:
    """One study invocation: preset, data, output folder."""

    kind: str
    preset: StudyPreset
    data: StudyData
    out_dir: Path
    progress: bool = True
    command: str = ""
    sources: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def write_config(self) -> None:
        write_run_config(self.out_dir, self.command or f"centre-node study {self.kind}",
                         {"study": self.kind, "preset": self.preset.to_dict(), "sources": self.sources,
                          "n_train": len(self.data.train), "n_test": len(self.data.test),
                          "train_class_counts": self.data.train.class_counts(),
                          "test_class_counts": self.data.test.class_counts(),
                          "train_fingerprint": self.data.fingerprint})

    def evaluate(self, name: str, ps: PatchSet, *, full: bool = False, arch: str | None = None,
                 arch_kwargs: dict | None = None, epochs: int | None = None) -> SetEvaluation:
        """Train the preset's evaluation model on ``ps`` over the preset's seeds and test it."""
        ev = self.preset.eval
        n_epochs = epochs if epochs is not None else (ev.full_epochs if full else ev.epochs)
        return evaluate_sets({name: ps}, self.data.test, arch or ev.arch, ev.seeds, n_epochs, lr=ev.lr,
                             batch_size=ev.batch_size, augmentation=ev.augmentation,
                             arch_kwargs=ev.arch_kwargs if arch is None else (arch_kwargs or {}),
                             device=self.preset.device, progress=self.progress)[name]
