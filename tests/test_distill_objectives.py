"""The objective registry: every objective a config can name is registered, one module each, and a config
runs the one objective_name gives."""

import sys
from pathlib import Path

import pytest

from histodd_fed.distill import DistillConfig
from histodd_fed.distill.objectives import MODULES, Objective, get_objective, objective_name, objectives, register

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distill_run import TINY  # noqa: E402

DP = dict(dp_noise=1.0, init="noise", pool_epochs=0, augmentation="crop_flip_rotate")
DM_DP = dict(objective="distribution", dp_epsilon=8.0, init="noise", pool_epochs=0, augmentation="crop_flip_rotate",
             dp_nets=2, dp_augs=1)


def test_registry_holds_one_class_per_name_from_its_own_module():
    table = objectives()
    assert {n: (c.__module__, c.method) for n, c in table.items()} == {
        "gradient": ("histodd_fed.distill.gradient", "histo-dd"),
        "distribution": ("histodd_fed.distill.distribution", "dm"),
        "gradient-dp": ("histodd_fed.distill.dp", "histo-dd-dp"),
        "distribution-dp": ("histodd_fed.distill.dm_dp", "dm-dp"),
    }
    assert all(issubclass(c, Objective) and c.name == n for n, c in table.items())
    assert {c.__module__.rsplit(".", 1)[1] for c in table.values()} == set(MODULES)
    assert [n for n, c in table.items() if c.standalone] == ["distribution-dp"]


@pytest.mark.parametrize("over,name", [({}, "gradient"), ({"objective": "distribution"}, "distribution"),
                                       (DP, "gradient-dp"), (DM_DP, "distribution-dp")])
def test_a_config_runs_the_objective_its_fields_name(over, name):
    cfg = DistillConfig.from_yaml(TINY, **over)
    assert objective_name(cfg) == name and get_objective(cfg) is objectives()[name]


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="registered twice"):
        register("gradient")(type("Other", (Objective,), {}))


def test_a_registered_objective_is_a_config_choice_and_runs_in_the_loop(monkeypatch):
    import torch

    from histodd_fed.distill import objectives as registry
    from histodd_fed.distill import run_distillation
    from histodd_fed.errors import ConfigError
    from test_distill_run import toy_set

    with pytest.raises(ConfigError, match="objective must be one of"):
        DistillConfig.from_yaml(TINY, objective="mean_colour")
    monkeypatch.setattr(registry, "_REGISTRY", dict(objectives()))   # undone after the test

    @register("mean_colour")
    class MeanColour(Objective):
        """Each class's mean colour against its real patches' (a toy objective)."""

        method = "mean-colour"

        def step(self, s, net, weights, aug, opt_img):
            loss = torch.zeros(())
            for k, g in enumerate(s.groups):
                xs = s.x_syn[int(s.offsets[k]):int(s.offsets[k + 1])]
                loss = loss + (xs.mean((0, 2, 3)) - s.x_real[g.real_idx].mean((0, 2, 3))).pow(2).sum()
            self.joint_step(loss, s.x_syn, opt_img)
            return loss

    cfg = DistillConfig.from_yaml(TINY, objective="mean_colour", init="noise", lr_img=100.0)
    assert get_objective(cfg) is MeanColour
    real = toy_set()
    res = run_distillation(real, cfg, progress=False)
    assert res.patchset.meta["method"] == "mean-colour" and res.patchset.meta["complete"]

    def gap(images):   # per class, distance of the mean colour to the real patches'
        return sum(abs(images[res.patchset.labels == c].mean((0, 1, 2)) - real.images[real.labels == c].mean((0, 1, 2))).sum()
                   for c in (0, 1))
    assert gap(res.patchset.images.astype(float)) < 0.5 * gap(res.initial_images.astype(float))
