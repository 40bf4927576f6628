"""SSIM, normalised L2 and cosine distance of histodd_fed.image_similarity."""

import numpy as np
import pytest
import torch

from histodd_fed.image_similarity import (SSIMIndex, cosine_distance_matrix, effective_window, gaussian_window,
                                            normalised_l2_matrix, ssim)


def _images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (0.7 * smooth + 0.3 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


def test_ssim_of_an_image_with_itself_is_one():
    x = _images(5)
    assert torch.allclose(ssim(x, x), torch.ones(5), atol=1e-5)


def test_ssim_is_symmetric_and_lower_for_different_or_degraded_images():
    x, y = _images(4, seed=1), _images(4, seed=2)
    s_xy, s_yx = ssim(x, y), ssim(y, x)
    assert torch.allclose(s_xy, s_yx, atol=1e-6)
    assert (s_xy < 0.9).all()
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    s_noisy = ssim(x, noisy)
    assert ((s_noisy < 0.999) & (s_noisy > s_xy)).all()  # a noisy copy is closer than a different image


def test_ssim_index_matches_pairwise_ssim():
    ref, q = _images(20, seed=4), _images(1, seed=5)[0]
    index = SSIMIndex(ref, window=7)
    assert torch.allclose(index.against(q), ssim(q.unsqueeze(0), ref, window=7), atol=1e-5)
    rows = torch.tensor([3, 7, 11])
    assert torch.allclose(index.against(q, rows), ssim(q.unsqueeze(0), ref[rows], window=7), atol=1e-5)


def test_gaussian_window_and_effective_size():
    g = gaussian_window(11, 1.5)
    assert g.shape == (11,) and abs(float(g.sum()) - 1) < 1e-6 and int(g.argmax()) == 5
    assert effective_window(8, 11) == 7 and effective_window(32, 11) == 11


def test_normalised_l2_is_rms_difference():
    a, b = _images(3, seed=6), _images(4, seed=7)
    d = normalised_l2_matrix(a, b)
    want = ((a[1] - b[2]) ** 2).mean().sqrt()
    assert d.shape == (3, 4) and abs(float(d[1, 2]) - float(want)) < 1e-5
    assert float(normalised_l2_matrix(a, a).diagonal().abs().max()) < 1e-4
    white, black = torch.ones(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    assert float(normalised_l2_matrix(white, black)[0, 0]) == pytest.approx(1.0)


def test_cosine_distance():
    f = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
    d = cosine_distance_matrix(f, f).numpy()
    np.testing.assert_allclose(d, [[0, 1, 2], [1, 0, 1], [2, 1, 0]], atol=1e-6)


def test_ssim_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 9, 9))
