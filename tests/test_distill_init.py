"""``init: herding``: Histo-DD starts from exactly the herding coreset's images; the default stays ``real``."""

import numpy as np
import pytest

from histodd_fed.coreset import build_coreset
from histodd_fed.distill import DistillConfig, run_distillation
from histodd_fed.errors import ConfigError
from histodd_fed.studies.toy_data import make_toy_patchset

FAST = dict(model="convnet", model_kwargs={"width": 8, "depth": 2}, image_size=16, ipc=3, outer_steps=1,
            inner_steps=1, batch_real=8, pool_size=1, pool_epochs=0, pool_batch=16, batch_net=16,
            augmentation="flip", distance="l1", lr_img=0.01, checkpoint_every=0, device="cpu", seed=3)


def test_herding_init_starts_from_the_herding_coreset():
    real = make_toy_patchset(n_per_class=15, size=16, num_classes=2, seed=1)
    cfg = DistillConfig(**FAST, init="herding", init_coreset={"feature_epochs": 1, "batch_size": 16})
    res = run_distillation(real, cfg, progress=False)
    core = build_coreset(real, cfg.herding_coreset_config(), progress=False)
    # step 0 images are exactly the coreset's images, class by class, in herding order
    assert np.array_equal(res.initial_images, core.images)
    assert np.array_equal(res.patchset.labels, core.labels)
    meta = res.patchset.meta
    assert meta["init"] == "herding"
    assert meta["init_source_indices"] == core.meta["source_indices"]
    assert meta["init_herding"]["source_indices"] == core.meta["source_indices"]
    assert meta["init_herding"]["coreset_config"]["arch"] == "convnet"  # defaults to the distillation net
    # a random-real start from the same seed picks other patches (herding is not a no-op here)
    rnd = run_distillation(real, DistillConfig(**FAST), progress=False)
    assert rnd.patchset.meta["init_source_indices"] != core.meta["source_indices"]


def test_init_default_and_keys():
    assert DistillConfig().init == "real"
    assert "init_coreset" not in DistillConfig(**FAST).result_dict()  # old cache / resume keys unchanged
    assert "init_coreset" in DistillConfig(**FAST, init="herding").result_dict()
    with pytest.raises(ConfigError, match="init_coreset"):
        DistillConfig(**FAST, init="herding", init_coreset={"epochs": 1})
    with pytest.raises(ConfigError, match="per_slide"):
        DistillConfig(**FAST, init="herding", per_slide=True)
