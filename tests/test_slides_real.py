"""Real SVS slides (../shared/data/slides), plain images via ImageSlide, and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from histodd_fed.errors import InputError
from histodd_fed.patchset import PatchSet
from histodd_fed.slides.tiling import tile_slides

SLIDES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "slides"


def _slide(name: str) -> Path:
    p = SLIDES / name
    if not p.is_file():
        pytest.skip(f"{p} absent: real-slide tests need ../shared/data/slides next to the checkout")
    return p


def test_cmu_small_region_tiles_at_2mpp(tmp_path):
    rep = tile_slides(_slide("CMU-1-Small-Region.svs"), tmp_path / "s", patch_size=64, mpp=2.0)
    ps = PatchSet.load(tmp_path / "s")
    info = rep.per_slide["CMU-1-Small-Region"]
    assert info["mpp"] == pytest.approx(0.499) and info["mpp_source"] == "metadata"
    assert info["target_downsample"] == pytest.approx(2.0 / 0.499)
    assert len(ps) >= 10 and ps.images.shape[1:] == (64, 64, 3)
    assert set(ps.labels.tolist()) == {0} and ps.meta["unlabelled"] == ["CMU-1-Small-Region"]
    # kept patches are tissue (saturated), not glass
    from histodd_fed.slides.tissue import saturation

    assert float(np.median(saturation(ps.images).mean(axis=(1, 2)))) > 0.1


def test_tcga_without_mpp_fails_clearly_and_tiles_with_slide_mpp(tmp_path):
    tcga = _slide("TCGA-CR-7395-01A-01-TS1.svs")
    with pytest.raises(InputError, match=r"TCGA-CR-7395-01A-01-TS1\.svs: slide has no microns-per-pixel.*--slide-mpp"):
        tile_slides(tcga, tmp_path / "no", patch_size=64, mpp=2.0)
    assert not (tmp_path / "no").exists()
    rep = tile_slides(tcga, tmp_path / "yes", patch_size=64, mpp=2.0, slide_mpp=0.25)
    info = rep.per_slide["TCGA-CR-7395-01A-01-TS1"]
    assert info["level"] == 1 and info["mpp_source"] == "user" and rep.n_patches > 10


def test_png_with_slide_mpp_tiles_via_imageslide(tmp_path):
    from PIL import Image

    from histodd_fed.slides.demo import render_demo_slide
    from histodd_fed.slides.stains import get_preset

    s = render_demo_slide(np.random.default_rng(0), "p", "normal", get_preset("C3"), 384, 256, mpp=1.0)
    Image.fromarray(s.rgb).save(tmp_path / "scan.png")
    with pytest.raises(InputError, match="scan.png: slide has no microns-per-pixel"):
        tile_slides(tmp_path / "scan.png", tmp_path / "no", patch_size=16, mpp=2.0)
    rep = tile_slides(tmp_path / "scan.png", tmp_path / "yes", patch_size=16, mpp=2.0, slide_mpp=1.0)
    assert rep.per_slide["scan"]["level"] == 0 and rep.n_patches > 10
    ps = PatchSet.load(tmp_path / "yes")
    x, y = ps.coords[0]
    ref = np.asarray(Image.fromarray(s.rgb[y:y + 32, x:x + 32]).resize((16, 16), Image.Resampling.BOX))
    np.testing.assert_array_equal(ps.images[0], ref)


def test_garbage_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"not a slide at all")
    with pytest.raises(InputError, match="broken.svs: not a readable slide"):
        tile_slides(bad, tmp_path / "o")


def test_cli_make_demo_and_tile(tmp_path):
    from centre_node.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["-q", "make-demo-slides", "--out", str(tmp_path / "demo"), "--centre", "C2",
                            "--n-slides", "2", "--seed", "5", "--width", "384", "--height", "256"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "demo" / "slides.csv").is_file()
    r = runner.invoke(app, ["-q", "tile", "--slides", str(tmp_path / "demo" / "slides.csv"), "--out",
                            str(tmp_path / "store"), "--patch-size", "16", "--mpp", "2.0"])
    assert r.exit_code == 0, r.output
    assert "patches" in r.output and "0 skipped" in r.output
    ps = PatchSet.load(tmp_path / "store")
    assert ps.slide_ids == ["C2_000", "C2_001"] and ps.meta["centre"] == "C2"
    r = runner.invoke(app, ["slide-info", str(tmp_path / "demo" / "slides" / "C2_000.tiff")])
    assert r.exit_code == 0 and "mpp 0.5 (metadata)" in r.output and "level 1: 96x64" in r.output
    r = runner.invoke(app, ["tile", "--slides", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and isinstance(r.exception, InputError)
