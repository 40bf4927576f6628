"""MIL heads: shapes and attention on bags of 1, 3 and 500 instances; CLAM with tiny bags;
TransMIL's Nystrom attention and pseudo inverse against exact references; save / load."""

from __future__ import annotations

import math

import pytest
import torch

from histodd_fed.errors import ConfigError
from histodd_fed.mil import create_mil, list_mil
from histodd_fed.mil.transmil import NystromAttention, moore_penrose_pinv

D = 32
ARCHS = ["abmil", "clam", "dsmil", "transmil"]


def test_registry_lists_all_heads():
    assert set(ARCHS) <= set(list_mil())
    with pytest.raises(ConfigError, match="unknown MIL model"):
        create_mil("nope", in_dim=D)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n", [1, 3, 500])
def test_forward_shapes_attention_and_loss(arch, n):
    torch.manual_seed(0)
    model = create_mil(arch, in_dim=D, num_classes=2, hidden=32)
    model.eval()
    bag = torch.randn(n, D)
    out = model(bag)
    assert out["logits"].shape == (1, 2)
    att = out["attention"]
    assert att.shape in ((n,), (2, n))
    assert att.shape[-1] == n
    assert torch.all(att >= 0)
    torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[:-1]), atol=1e-5, rtol=0)
    model.train()
    loss = model.loss(model(bag), torch.tensor(1))
    assert loss.dim() == 0 and math.isfinite(float(loss.detach()))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_dsmil_attention_is_per_class_and_critical_instance_is_the_max():
    torch.manual_seed(0)
    model = create_mil("dsmil", in_dim=D, num_classes=2, hidden=32).eval()
    out = model(torch.randn(7, D))
    assert out["attention"].shape == (2, 7)
    assert torch.equal(out["critical"], out["instance_logits"].argmax(0))
    torch.testing.assert_close(out["max_logits"][0], out["instance_logits"].max(0).values)


def test_clam_bag_smaller_than_k():
    torch.manual_seed(0)
    model = create_mil("clam", in_dim=D, num_classes=2, hidden=32, k_sample=8, subtyping=True)
    assert model.effective_k(1) == 0 and model.effective_k(5) == 2 and model.effective_k(100) == 8
    for n in (1, 2, 5):
        out = model(torch.randn(n, D))
        inst = model.instance_loss(out, 1)
        if n == 1:
            assert float(inst.detach()) == 0.0
        else:
            assert float(inst.detach()) > 0.0
        model.loss(out, torch.tensor(1)).backward()


def test_clam_instance_loss_trains_the_true_class_classifier():
    torch.manual_seed(0)
    model = create_mil("clam", in_dim=D, num_classes=2, hidden=32, k_sample=4)
    out = model(torch.randn(20, D))
    model.loss(out, torch.tensor(0)).backward()
    assert model.instance_classifiers[0].weight.grad.abs().sum() > 0
    assert model.instance_classifiers[1].weight.grad is None  # not subtyping: other class unused


@pytest.mark.parametrize("n", [2, 5, 7, 10, 17, 50])
def test_transmil_non_square_bags(n):
    torch.manual_seed(0)
    model = create_mil("transmil", in_dim=D, num_classes=3, hidden=32, num_landmarks=8).eval()
    out = model(torch.randn(n, D))
    assert out["logits"].shape == (1, 3) and out["attention"].shape == (n,)
    torch.testing.assert_close(out["attention"].sum(), torch.tensor(1.0))


def test_moore_penrose_pinv_matches_exact():
    torch.manual_seed(0)
    x = torch.softmax(torch.randn(4, 8, 8) * 2, dim=-1)
    exact = torch.linalg.pinv(x)
    approx = moore_penrose_pinv(x, iters=20)
    assert ((approx - exact).abs().max() / exact.abs().max()) < 1e-3
    assert ((moore_penrose_pinv(x, iters=1) - exact).abs().max() / exact.abs().max()) > 1e-2  # iterating matters


def test_nystrom_equals_exact_attention_with_one_token_per_landmark():
    """With as many landmarks as tokens, segment means are the tokens and Nystrom is exact."""
    torch.manual_seed(0)
    n, dim, heads = 8, 16, 2
    attn = NystromAttention(dim, heads=heads, num_landmarks=n, pinv_iters=30, dropout=0.0).eval()
    torch.nn.init.zeros_(attn.res_conv.weight)
    x = torch.randn(1, n, dim) * 0.5
    q, k, v = attn.qkv(x)
    ref = torch.softmax((q * attn.scale) @ k.transpose(-1, -2), dim=-1) @ v
    ref = attn.to_out(ref.transpose(1, 2).reshape(1, n, dim))
    torch.testing.assert_close(attn(x), ref, atol=2e-3, rtol=1e-2)


def test_save_load_roundtrip(tmp_path):
    from histodd_fed.mil.train import load_mil, save_mil

    torch.manual_seed(0)
    for arch in ARCHS:
        model = create_mil(arch, in_dim=D, num_classes=2, hidden=16).eval()
        save_mil(model, tmp_path / arch)
        loaded, meta = load_mil(tmp_path / arch)
        assert meta["arch"] == arch
        bag = torch.randn(9, D)
        torch.testing.assert_close(loaded(bag)["logits"], model(bag)["logits"])
