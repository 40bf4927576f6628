"""Histo-DD building blocks: networks, model augmentation, gradient distances, config."""

import pytest
import torch

from histodd_fed.distill import DistillConfig, augment_model, layer_distance, matched_weights
from histodd_fed.errors import ConfigError
from histodd_fed.models import create_model

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,size,kw", [("convnet", 16, {"width": 8, "depth": 2}), ("convnet", 32, {}),
                                          ("resnetap10", 16, {"width": 8}), ("resnetap10", 96, {"width": 4})])
def test_networks_shapes_and_features(name, size, kw):
    net = create_model(name, num_classes=3, image_size=size, **kw)
    x = torch.rand(2, 3, size, size)
    assert net(x).shape == (2, 3)
    assert net.features(x).shape == (2, net.feature_dim)


def test_resnetap_uses_average_pooling_and_instance_norm():
    net = create_model("resnetap10", num_classes=2, image_size=32, width=8)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.stride == (1, 1) for m in convs)
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in net.modules()) == 6  # 3 stages x (main + shortcut)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.MaxPool2d)) for m in net.modules())
    assert all(m.num_groups == m.num_channels for m in net.modules() if isinstance(m, torch.nn.GroupNorm))


@pytest.mark.parametrize("alpha", [0.01, 0.2])
def test_model_augmentation_per_filter_ratio_and_untouched_norms(alpha):
    net = create_model("convnet", num_classes=2, image_size=16, width=8, depth=2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    augment_model(net, alpha, torch.Generator().manual_seed(0))
    w_ids = {id(w) for w in matched_weights(net)}
    for name, p in net.named_parameters():
        if id(p) in w_ids:
            w0 = before[name]
            d = (p.detach() - w0).reshape(w0.shape[0], -1).norm(dim=1)
            ratio = d / w0.reshape(w0.shape[0], -1).norm(dim=1)
            assert torch.allclose(ratio, torch.full_like(ratio, alpha), rtol=1e-4), name
        else:
            assert torch.equal(p.detach(), before[name]), f"{name} must not be perturbed"
    assert len(w_ids) == 3  # two convs + the linear head


def test_model_augmentation_is_seeded():
    a = create_model("convnet", num_classes=2, image_size=16, width=8, depth=2)
    b = create_model("convnet", num_classes=2, image_size=16, width=8, depth=2)
    b.load_state_dict(a.state_dict())
    augment_model(a, 0.05, torch.Generator().manual_seed(3))
    augment_model(b, 0.05, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_distances():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, -2.0]])
    assert layer_distance(a, b, "l1").item() == pytest.approx(5.0)
    assert layer_distance(a, b, "mse").item() == pytest.approx(17.0)
    assert layer_distance(a, b, "l1_mean").item() == pytest.approx(5.0 / 4)  # normalised by the layer size
    assert layer_distance(a, a, "cosine").item() == pytest.approx(0.0, abs=1e-5)
    assert layer_distance(a, -a, "cosine").item() == pytest.approx(4.0, abs=1e-5)  # two rows x (1 - (-1))
    assert layer_distance(a, 3 * a, "cosine").item() == pytest.approx(0.0, abs=1e-5)  # scale-invariant
    with pytest.raises(ConfigError):
        layer_distance(a, b, "l3")


def test_config_yaml_and_overrides(tmp_path):
    cfg = DistillConfig.from_yaml(ROOT / "configs" / "distill-cpu.yaml", ipc=3, lr_img=None)
    assert cfg.model == "convnet" and cfg.ipc == 3 and cfg.image_size == 32
    paper = DistillConfig.from_yaml(ROOT / "configs" / "distill-paper.yaml")
    assert (paper.model, paper.ipc, paper.outer_steps, paper.inner_steps, paper.lr_img_ref_size, paper.distance) == \
        ("resnetap10", 10, 200, 100, 32, "l1")   # lr_img: calibrated per resolution (test_distill_paper_preset.py)
    bad = tmp_path / "bad.yaml"
    bad.write_text("ipc: 3\nbogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        DistillConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="distance"):
        DistillConfig(distance="l2")
    with pytest.raises(ConfigError, match="ipc"):
        DistillConfig(ipc=0)
