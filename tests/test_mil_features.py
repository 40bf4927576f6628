"""Patch encoder, per-slide feature cache (reused on the second call), bags from a patch set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from histodd_fed.errors import InputError
from histodd_fed.mil.bags import bags_from_patchset, bags_nbytes, load_bags, save_bags
from histodd_fed.mil.features import PatchEncoder, load_encoder, module_fingerprint, save_patch_model
from histodd_fed.patchset import PatchSet


class TinyEncoder(nn.Module):
    """A real (small) conv trunk with features(); counts its forward calls."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, dim, 3, padding=1)
        self.head = nn.Linear(dim, 2)
        self.feature_dim = dim
        self.n_features_calls = 0

    def features(self, x):
        self.n_features_calls += 1
        return torch.relu(self.conv(x)).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


def slide_patchset(n_slides: int = 4, per_slide=(3, 5, 1, 7), size: int = 16) -> PatchSet:
    rng = np.random.default_rng(0)
    counts = list(per_slide)[:n_slides]
    n = sum(counts)
    slide_index = np.repeat(np.arange(n_slides), counts)
    rng.shuffle(slide_index)  # patches of a slide need not be contiguous
    ids = [f"slide/{i}" for i in range(n_slides)]
    return PatchSet(images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
                    labels=rng.integers(0, 2, n), class_names=["normal", "tumour"], slide_index=slide_index,
                    slide_ids=ids, slide_labels={s: i % 2 for i, s in enumerate(ids)})


def test_bags_one_per_slide_with_labels_and_sizes():
    torch.manual_seed(0)
    ps = slide_patchset()
    enc = PatchEncoder(TinyEncoder(), batch_size=4)
    bags = bags_from_patchset(ps, enc, progress=False)
    assert [b.slide_id for b in bags] == ps.slide_ids
    assert [b.n_patches for b in bags] == [3, 5, 1, 7]
    assert [b.label for b in bags] == [0, 1, 0, 1]
    assert all(b.features.shape == (b.n_patches, 8) for b in bags)
    assert bags_nbytes(bags) == ps.images.nbytes
    # the features are those of the slide's own patches
    j = 1
    own = ps.images[np.flatnonzero(ps.slide_index == j)]
    direct = enc.model.features(torch.from_numpy(own).permute(0, 3, 1, 2).float() / 255)
    torch.testing.assert_close(bags[j].features, direct.detach())
    assert enc.images_encoded == len(ps)  # the direct call above bypasses the counter


def test_feature_cache_is_reused_and_keyed(tmp_path):
    torch.manual_seed(0)
    ps = slide_patchset()
    model = TinyEncoder()
    enc = PatchEncoder(model, batch_size=4)
    first = bags_from_patchset(ps, enc, cache_dir=tmp_path, progress=False)
    calls = model.n_features_calls
    assert calls > 0 and enc.images_encoded == len(ps)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 4

    second = bags_from_patchset(ps, PatchEncoder(model, batch_size=4), cache_dir=tmp_path, progress=False)
    assert model.n_features_calls == calls  # the encoder did not run again
    for a, b in zip(first, second):
        assert torch.equal(a.features, b.features) and a.label == b.label

    # another encoder (different weights) misses the cache
    other = TinyEncoder()
    bags_from_patchset(ps, PatchEncoder(other), cache_dir=tmp_path, progress=False)
    assert other.n_features_calls > 0
    # another patch set (one pixel changed) misses the cache too
    ps2 = slide_patchset()
    ps2.images[0, 0, 0, 0] ^= 1
    bags_from_patchset(ps2, PatchEncoder(model), cache_dir=tmp_path, progress=False)
    assert model.n_features_calls > calls

    # a damaged cache entry is recomputed, not trusted
    files[0].write_bytes(b"garbage")
    before = model.n_features_calls
    again = bags_from_patchset(ps, PatchEncoder(model, batch_size=4), cache_dir=tmp_path, progress=False)
    assert model.n_features_calls == before + 1
    assert all(torch.equal(a.features, b.features) for a, b in zip(first, again))


def test_encoder_runs_in_eval_mode_without_grad_and_restores_mode():
    model = nn.Sequential()  # no features(): rejected
    with pytest.raises(InputError, match="features"):
        PatchEncoder(model)
    enc_model = TinyEncoder()
    enc_model.train()
    seen = {}

    def hook(mod, inp, out):
        seen["training"] = mod.training
        seen["grad"] = torch.is_grad_enabled()

    enc_model.conv.register_forward_hook(hook)
    PatchEncoder(enc_model).encode(np.zeros((2, 16, 16, 3), np.uint8))
    assert seen == {"training": False, "grad": False} and enc_model.training


def test_bags_need_slides_and_labels():
    ps = slide_patchset()
    enc = PatchEncoder(TinyEncoder())
    ps.slide_labels.pop("slide/2")
    with pytest.raises(InputError, match="slide label"):
        bags_from_patchset(ps, enc, progress=False)
    flat = PatchSet(images=ps.images, labels=ps.labels, class_names=ps.class_names)
    with pytest.raises(InputError, match="no slide table"):
        bags_from_patchset(flat, enc, progress=False)


def test_save_load_bags(tmp_path):
    ps = slide_patchset()
    bags = bags_from_patchset(ps, PatchEncoder(TinyEncoder()), progress=False)
    loaded = load_bags(save_bags(bags, tmp_path / "bags"))
    assert [(b.slide_id, b.label, b.n_patches, b.nbytes) for b in loaded] == \
        [(b.slide_id, b.label, b.n_patches, b.nbytes) for b in bags]
    (tmp_path / "bags" / "bags.json").write_text("{")
    with pytest.raises(InputError, match="bags.json"):
        load_bags(tmp_path / "bags")


def test_load_encoder_from_saved_resnet18_and_weights_file(tmp_path):
    from histodd_fed.models.registry import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=2, image_size=16)
    save_patch_model(model, tmp_path / "enc", arch="resnet18", num_classes=2, image_size=16,
                     arch_kwargs={"small_stem": True})
    enc = load_encoder(tmp_path / "enc", image_size=16)
    x = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    model.eval()
    ref = model.features(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255).detach()
    torch.testing.assert_close(enc.encode(x), ref)
    assert enc.feature_dim == 512
    # a bare state-dict file for a registered architecture
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    enc2 = load_encoder(tmp_path / "w.safetensors", image_size=16)
    assert module_fingerprint(enc2.model) == module_fingerprint(enc.model)
    assert enc.input_size == 16 and enc2.input_size is None
    with pytest.raises(InputError, match="not found"):
        load_encoder(tmp_path / "missing.pt", image_size=16)
