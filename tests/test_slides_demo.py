"""Demo slide generator: real pyramidal TIFFs opened by real OpenSlide, annotations, manifest."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from histodd_fed.errors import InputError
from histodd_fed.slides.annotations import (Polygon, rasterise, read_annotations, read_asap_xml, read_geojson,
                                            write_asap_xml, write_geojson)
from histodd_fed.slides.demo import make_demo_centre, render_demo_slide
from histodd_fed.slides.stains import get_preset, mean_tissue_od

TINY = dict(width=512, height=384, mpp=0.5, downsamples=(1, 4, 16), tile=128)


@pytest.fixture(scope="module")
def centre(tmp_path_factory):
    return make_demo_centre(tmp_path_factory.mktemp("demo") / "C1", "C1", n_slides=4, seed=3, **TINY)


def test_openslide_reads_levels_and_mpp(centre):
    import openslide

    with openslide.OpenSlide(str(centre.parent / "slides" / "C1_000.tiff")) as s:
        assert s.level_count == 3
        assert s.level_dimensions == ((512, 384), (128, 96), (32, 24))
        assert [round(d, 3) for d in s.level_downsamples] == [1.0, 4.0, 16.0]
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5, rel=1e-4)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.5, rel=1e-4)
        rgba = np.asarray(s.read_region((0, 0), 1, (128, 96)))
    assert rgba.shape == (96, 128, 4) and rgba[..., 3].min() == 255
    # tissue (darker than glass) and glass both present
    grey = rgba[..., :3].mean(-1)
    assert (grey < 200).mean() > 0.2 and (grey > 235).mean() > 0.1


def test_same_seed_same_bytes_other_seed_differs(centre, tmp_path):
    again = make_demo_centre(tmp_path / "again", "C1", n_slides=4, seed=3, **TINY)
    other = make_demo_centre(tmp_path / "other", "C1", n_slides=1, seed=4, **TINY)
    root, root2 = centre.parent, again.parent
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name != "run_config.json")
    assert len(files) >= 4 + 2 * 2 + 4 + 1
    for rel in files:
        assert (root / rel).read_bytes() == (root2 / rel).read_bytes(), rel
    assert (other.parent / "slides" / "C1_000.tiff").read_bytes() != (root / "slides" / "C1_000.tiff").read_bytes()


def test_centres_differ_in_colour(tmp_path):
    ods = []
    for c in ("C1", "C2"):
        s = render_demo_slide(np.random.default_rng(0), "x", "normal", get_preset(c), 384, 256)
        ods.append(mean_tissue_od(s.rgb))
    # same tissue, different stain: per-channel mean OD differs clearly
    assert np.abs(ods[0] - ods[1]).max() > 0.1, ods


def test_tumour_regions_darker_and_labels(tmp_path):
    s = render_demo_slide(np.random.default_rng(1), "t", "tumour", get_preset("C1"), 512, 384)
    n = render_demo_slide(np.random.default_rng(1), "n", "normal", get_preset("C1"), 512, 384)
    assert s.polygons and not n.polygons
    tum = rasterise(s.polygons, (512, 384), 1.0)
    grey = s.rgb.mean(-1)
    assert grey[tum].mean() < grey[s.tissue & ~tum].mean() - 20


def test_tumour_contrast_makes_tumour_subtler():
    """Lower ``tumour_contrast``: same tissue and polygons, tumour closer to normal tissue in grey level."""
    gaps = []
    for c in (1.0, 0.3):
        s = render_demo_slide(np.random.default_rng(1), "t", "tumour", get_preset("C1"), 512, 384, tumour_contrast=c)
        tum = rasterise(s.polygons, (512, 384), 1.0)
        grey = s.rgb.mean(-1)
        gaps.append(grey[s.tissue & ~tum].mean() - grey[tum].mean())
    assert gaps[1] < 0.6 * gaps[0], gaps
    assert gaps[1] > 0, gaps  # still darker: subtle, not absent
    with pytest.raises(Exception, match="tumour_contrast"):
        make_demo_centre("/nonexistent/never", "C1", n_slides=1, tumour_contrast=0.0)


def test_tumour_size_shrinks_tumour_regions():
    """``tumour_size`` scales the tumour regions' radius (small foci: a harder slide-level task)."""
    def area(size: float, regions: int = 3) -> float:
        s = render_demo_slide(np.random.default_rng(2), "t", "tumour", get_preset("C2"), 512, 384,
                              tumour_size=size, tumour_regions=regions)
        assert 1 <= len(s.polygons) <= regions
        return float(sum(0.5 * abs(np.dot(p.points[:, 0], np.roll(p.points[:, 1], 1))
                                   - np.dot(p.points[:, 1], np.roll(p.points[:, 0], 1))) for p in s.polygons))
    assert area(0.5) < 0.4 * area(1.0)
    assert len(render_demo_slide(np.random.default_rng(2), "t", "tumour", get_preset("C2"), 512, 384,
                                 tumour_regions=1).polygons) == 1
    for bad in ({"tumour_size": 0.0}, {"tumour_regions": 0}):
        with pytest.raises(Exception, match=next(iter(bad))):
            make_demo_centre("/nonexistent/never", "C1", n_slides=1, **bad)


def test_annotation_files_parse_back_to_written_polygons(centre):
    rows = list(csv.DictReader(open(centre)))
    tumour_ids = [r["slide_id"] for r in rows if r["label"] == "tumour"]
    for sid in tumour_ids:
        xml = read_asap_xml(centre.parent / "annotations" / f"{sid}.xml")
        gj = read_geojson(centre.parent / "annotations" / f"{sid}.geojson")
        assert len(xml) == len(gj) >= 1
        for a, b in zip(xml, gj):
            assert a.label == b.label == "tumour"
            np.testing.assert_allclose(a.points, b.points, atol=0.006)
    # the files carry the formats' own markers
    text = (centre.parent / "annotations" / f"{tumour_ids[0]}.xml").read_text()
    assert "<ASAP_Annotations>" in text and 'PartOfGroup="Tumor"' in text and 'Type="Polygon"' in text
    doc = json.loads((centre.parent / "annotations" / f"{tumour_ids[0]}.geojson").read_text())
    assert doc["type"] == "FeatureCollection"
    assert doc["features"][0]["properties"]["classification"]["name"] == "Tumor"


def test_annotation_roundtrip_with_holes_and_rasterise(tmp_path):
    sq = Polygon(np.array([[10, 10], [90, 10], [90, 90], [10, 90]], float),
                 holes=[np.array([[40, 40], [60, 40], [60, 60], [40, 60]], float)])
    write_asap_xml(tmp_path / "a.xml", [sq])
    write_geojson(tmp_path / "a.geojson", [sq])
    xml, gj = read_annotations(tmp_path / "a.xml"), read_annotations(tmp_path / "a.geojson")
    assert [p.label for p in xml] == ["tumour", "exclusion"]  # ASAP stores the hole as group _2
    assert len(gj) == 1 and len(gj[0].holes) == 1
    for polys in (xml, gj):
        m = rasterise(polys, (100, 100), 1.0)
        assert m[20, 20] and m[80, 80] and not m[50, 50] and not m[5, 5]
        assert m.sum() == pytest.approx(80 * 80 - 20 * 20, rel=0.05)
    m2 = rasterise(gj, (50, 50), 2.0)
    assert m2[10, 10] and not m2[25, 25]


def test_geojson_classes_and_errors(tmp_path):
    feats = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [5, 5], [0, 0]]]},
         "properties": {}},  # unclassified -> tumour
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [5, 5], [0, 0]]]},
         "properties": {"classification": {"name": "Stroma"}}},  # other class -> ignored
    ]
    (tmp_path / "f.geojson").write_text(json.dumps(feats))
    got = read_geojson(tmp_path / "f.geojson")
    assert [p.label for p in got] == ["tumour"]
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(InputError, match="bad.geojson"):
        read_geojson(tmp_path / "bad.geojson")
    (tmp_path / "bad.xml").write_text("<other/>")
    with pytest.raises(InputError, match="bad.xml: not ASAP"):
        read_asap_xml(tmp_path / "bad.xml")


def test_manifest_columns_and_splits(centre):
    from histodd_fed.slides.manifest import read_manifest

    with open(centre) as fh:
        header = next(csv.reader(fh))
    assert header == ["slide_id", "path", "label", "centre", "split"]
    recs = read_manifest(centre)
    assert len(recs) == 4 and all(r.path.is_file() and r.centre == "C1" for r in recs)
    pairs = {(r.label, r.split) for r in recs}
    assert pairs == {("tumour", "train"), ("tumour", "test"), ("normal", "train"), ("normal", "test")}
    assert (centre.parent / "run_config.json").is_file()
    assert (centre.parent / "thumbnails" / "C1_000.png").is_file()


def test_refuses_to_replace_foreign_folder(tmp_path):
    from histodd_fed.errors import ConfigError

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "precious.txt").write_text("keep")
    with pytest.raises(ConfigError, match="refusing"):
        make_demo_centre(tmp_path / "x", "C1", n_slides=1, **TINY)
    assert (tmp_path / "x" / "precious.txt").read_text() == "keep"
