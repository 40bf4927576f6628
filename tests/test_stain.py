"""Macenko estimation and differentiable stain normalisation on Beer-Lambert images."""

from pathlib import Path

import numpy as np
import pytest
import torch

from histodd_fed.stain import (REFERENCE_STAINS, ImageStains, StainContext, choose_template, normalize_stain,
                               stain_matrix)
from histodd_fed.stain.macenko import od_to_rgb

STAIN_A = np.array([[0.62, 0.22], [0.72, 0.86], [0.31, 0.46]])
STAIN_B = np.array([[0.38, 0.30], [0.85, 0.70], [0.36, 0.65]])


def unit(m):
    return m / np.linalg.norm(m, axis=0)


def beer_lambert(stains: np.ndarray, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 image whose OD is stains @ C with some pure-H, pure-E and mixed pixels."""
    rng = np.random.default_rng(seed)
    n = size * size
    c = rng.uniform(0.1, 1.0, size=(n, 2)) * np.array([1.6, 1.6])
    c[: n // 4, 1] = 0.0
    c[n // 4: n // 2, 0] = 0.0
    od = c @ unit(stains).T
    return od_to_rgb(od).reshape(size, size, 3).round().astype(np.uint8)


def column_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (unit(a) * unit(b)).sum(axis=0)


def test_macenko_recovers_the_stains_of_a_beer_lambert_image():
    m, estimated = stain_matrix(beer_lambert(STAIN_A))
    assert estimated
    assert column_cos(m, STAIN_A).min() > 0.99


def test_normalisation_maps_stain_a_to_template_b():
    img_a, img_b = beer_lambert(STAIN_A, seed=1), beer_lambert(STAIN_B, seed=2)
    ctx = StainContext.from_images(img_b[None])
    assert column_cos(ctx.template_matrix.numpy().astype(float), STAIN_B).min() > 0.99
    x = torch.from_numpy(img_a).permute(2, 0, 1)[None].float() / 255
    out = normalize_stain(x, ImageStains.estimate(img_a[None]), ctx)
    out_u8 = (out[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    m_out, estimated = stain_matrix(out_u8)
    assert estimated
    assert column_cos(m_out, STAIN_B).min() > 0.98
    assert column_cos(STAIN_A, STAIN_B).min() < 0.97 and column_cos(m_out, STAIN_A).min() < 0.97  # it moved


def test_normalisation_is_differentiable():
    img = beer_lambert(STAIN_A, size=16)
    x = (torch.from_numpy(img).permute(2, 0, 1)[None].double() / 255).contiguous().requires_grad_(True)
    st = ImageStains.estimate(img[None])
    st = ImageStains(st.matrices.double(), st.max_conc.double())
    ctx = StainContext(torch.tensor(unit(STAIN_B)), torch.tensor([1.2, 0.8]))
    out = normalize_stain(x, st, ctx)
    (out * torch.linspace(0, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # finite-difference check on a few pixels away from the clamp
    f = lambda z: (normalize_stain(z, st, ctx) * torch.linspace(0, 1, out.numel(), dtype=z.dtype).view_as(out)).sum()
    for flat in (5, 77, 301):
        e = torch.zeros(x.numel(), dtype=x.dtype)
        e[flat] = 1e-5
        e = e.view_as(x)
        fd = (f(x.detach() + e) - f(x.detach() - e)) / 2e-5
        assert abs(fd.item() - x.grad.reshape(-1)[flat].item()) < 1e-4 * max(1.0, abs(fd.item()))


def test_white_patch_falls_back_and_stays_finite():
    white = np.full((1, 16, 16, 3), 255, np.uint8)
    near_white = np.full((1, 16, 16, 3), 238, np.uint8)
    for img in (white, near_white):
        m, estimated = stain_matrix(img[0])
        assert not estimated and np.allclose(m, REFERENCE_STAINS)
        x = (torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255).requires_grad_(True)
        out = normalize_stain(x, ImageStains.estimate(img), StainContext.reference())
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    black = np.zeros((1, 16, 16, 3), np.uint8)
    out = normalize_stain(torch.zeros(1, 3, 16, 16), ImageStains.estimate(black), StainContext.reference())
    assert torch.isfinite(out).all()


def test_template_is_the_image_closest_to_the_set_statistics():
    imgs = np.stack([beer_lambert(STAIN_A, seed=s) for s in range(3)] + [np.full((32, 32, 3), 250, np.uint8)])
    imgs[0] = np.clip(imgs[0].astype(int) - 60, 0, 255)   # much darker outlier
    i = choose_template(imgs)
    assert i in (1, 2)


def test_normaliser_passes_gradcheck_in_float64():
    """Analytic gradients of the online normaliser equal finite differences (torch.autograd.gradcheck)."""
    from histodd_fed.stain import macenko
    from histodd_fed.stain.normalize import ImageStains, StainContext, normalize_stain

    ref = torch.tensor(macenko.REFERENCE_STAINS, dtype=torch.float64)
    other = ref + torch.tensor([[0.05, -0.03], [-0.04, 0.02], [0.01, 0.03]], dtype=torch.float64)
    other = other / other.norm(dim=0, keepdim=True)
    stains = ImageStains(ref.unsqueeze(0), torch.tensor([[1.2, 0.9]], dtype=torch.float64))
    ctx = StainContext(other, torch.tensor([1.0, 1.0], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    x = (0.45 + 0.3 * torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64)).requires_grad_(True)
    y = normalize_stain(x, stains, ctx)
    assert 0.0 < float(y.min()) and float(y.max()) < 1.0, "keep the output clamp inactive for gradcheck"
    assert torch.autograd.gradcheck(lambda t: normalize_stain(t, stains, ctx), (x,), eps=1e-6, atol=1e-5)


# ---------------------------------------------------------------- float64 reference Macenko
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PCAM_TRAIN = SHARED_DATA / "pcam-ai4all" / "train"


def reference_macenko(image: np.ndarray, io: float = 255.0, beta: float = 0.15, alpha: float = 1.0):
    """Plain float64 Macenko (2009), written independently of histodd_fed.stain.macenko.

    Same conventions as macenko.py: OD = -log((I + 1) / (Io + 1)), tissue = OD > beta in every
    channel, stains at the alpha / 100 - alpha angle percentiles in the plane of the two leading
    principal directions (from an SVD of the centred tissue OD, not an eigendecomposition), each
    direction signed toward the mean tissue OD, H = the vector with the larger red OD, non-negative
    unit columns; max concentrations = 99th percentile of least-squares concentrations of all pixels.
    Returns None when there is no usable tissue.
    """
    od = -np.log((image.reshape(-1, 3).astype(np.float64) + 1.0) / (io + 1.0))
    tissue = od[(od > beta).all(axis=1)]
    if len(tissue) < max(16, int(0.02 * len(od))):
        return None
    centred = tissue - tissue.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    e1, e2 = vt[0], vt[1]
    mean = tissue.mean(axis=0)
    e1 = e1 if e1 @ mean >= 0 else -e1
    e2 = e2 if e2 @ mean >= 0 else -e2
    angles = np.arctan2(tissue @ e2, tissue @ e1)
    a_lo, a_hi = np.percentile(angles, alpha), np.percentile(angles, 100.0 - alpha)
    s_lo = np.cos(a_lo) * e1 + np.sin(a_lo) * e2
    s_hi = np.cos(a_hi) * e1 + np.sin(a_hi) * e2
    h, e = (s_lo, s_hi) if s_lo[0] > s_hi[0] else (s_hi, s_lo)
    stains = np.abs(np.column_stack([h, e]))
    stains /= np.linalg.norm(stains, axis=0)
    conc, *_ = np.linalg.lstsq(stains, od.T, rcond=None)        # (2, P)
    return stains, np.percentile(conc, 99.0, axis=1)


def assert_matches_reference(image: np.ndarray, where: str) -> None:
    from histodd_fed.stain.macenko import max_concentrations

    ref = reference_macenko(image)
    assert ref is not None, f"{where}: no tissue in the test image"
    ref_m, ref_c = ref
    m, estimated = stain_matrix(image)
    assert estimated, where
    assert m.shape == (3, 2)
    cos = column_cos(m, ref_m)
    assert cos.min() > 0.999, (where, cos, m, ref_m)
    c = max_concentrations(image, m, estimated=estimated)
    assert np.all(np.abs(c - ref_c) <= 0.01 * np.abs(ref_c)), (where, c, ref_c)


def noisy_beer_lambert(stains: np.ndarray, size: int = 48, seed: int = 0) -> np.ndarray:
    """Beer-Lambert image with mixed stains and OD noise, so the stain-angle distribution is spread out
    (its 1st / 99th percentiles are not pinned at pure-stain pixels) as on real tissue."""
    rng = np.random.default_rng(seed)
    c = rng.gamma(2.0, 0.4, size=(size * size, 2))
    od = c @ unit(stains).T + rng.normal(0.0, 0.04, size=(size * size, 3))
    return od_to_rgb(od).reshape(size, size, 3).round().astype(np.uint8)


def test_macenko_matches_float64_reference_on_beer_lambert_images():
    for stains, seed in ((STAIN_A, 3), (STAIN_B, 4)):
        assert_matches_reference(noisy_beer_lambert(stains, seed=seed), f"beer-lambert seed {seed}")


def test_macenko_matches_float64_reference_on_real_pcam_patches():
    from PIL import Image

    if not PCAM_TRAIN.is_dir():
        pytest.skip(f"real PCam patches not found at {PCAM_TRAIN}")
    checked = {}
    for cls in ("normal", "tumour"):
        checked[cls] = 0
        for p in sorted((PCAM_TRAIN / cls).glob("*.jpg"))[:20]:
            img = np.asarray(Image.open(p).convert("RGB"))
            if reference_macenko(img) is None:       # background patch: covered by the white-patch test
                continue
            assert_matches_reference(img, str(p))
            checked[cls] += 1
            if checked[cls] == 4:
                break
    assert checked == {"normal": 4, "tumour": 4}, f"too few tissue patches among the first PCam files: {checked}"
