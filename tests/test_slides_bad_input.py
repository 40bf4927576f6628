"""Bad input to `tile`: each case one clear line naming the file, the batch goes on, nothing half-written."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from histodd_fed.errors import InputError
from histodd_fed.patchset import PatchSet
from histodd_fed.slides.demo import make_demo_centre
from histodd_fed.slides.pyramid import write_pyramid_tiff
from histodd_fed.slides.tiling import tile_slides

TINY = dict(width=384, height=256, mpp=0.5, downsamples=(1, 4), tile=128)
TILE = dict(patch_size=16, mpp=2.0)


@pytest.fixture(scope="module")
def centre(tmp_path_factory):
    """Two good demo slides (C1_000 tumour, C1_001 normal) with annotations and slides.csv."""
    return make_demo_centre(tmp_path_factory.mktemp("demo") / "C1", "C1", n_slides=2, seed=3, **TINY)


def _rows(manifest):
    with open(manifest, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_rows(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["slide_id", "path", "label", "centre", "split"])
        w.writeheader()
        w.writerows(rows)


def _bad_files(d, good_tiff):
    """Create every bad slide in ``d``; return {slide_id: (row overrides, expected error regex)}."""
    (d / "empty.svs").write_bytes(b"")
    data = good_tiff.read_bytes()
    (d / "truncated.tiff").write_bytes(data[: len(data) // 2])
    (d / "text.svs").write_text("this is a text file, not a slide\n")
    glass = np.full((256, 384, 3), 243, np.uint8)
    write_pyramid_tiff(d / "glass.tiff", glass, mpp=0.5, downsamples=(1, 4), tile=128, compression="deflate")
    import tifffile

    tissue = np.full((256, 384, 3), 243, np.uint8)
    tissue[40:220, 40:340] = (190, 90, 170)
    tifffile.imwrite(d / "nompp.tiff", tissue, tile=(128, 128), photometric="rgb")  # no resolution unit
    shutil.copyfile(good_tiff, d / "badann.tiff")
    (d / "annotations").mkdir(exist_ok=True)
    (d / "annotations" / "badann.xml").write_text("<ASAP_Annotations><Annotations><Annot")
    return {
        "empty": ({}, r"empty\.svs: empty file \(0 bytes\)"),
        "truncated": ({}, r"truncated\.tiff: truncated or corrupt TIFF"),
        "text": ({}, r"text\.svs: not a readable slide"),
        "glass": ({}, r"glass\.tiff: no tissue found"),
        "nompp": ({}, r"nompp\.tiff: slide has no microns-per-pixel metadata \(needed for --magnification 5\)"),
        "badann": ({"label": "tumour"}, r"badann\.xml: unreadable ASAP XML"),
        "missing": ({"path": "slides/missing.tiff"}, r"slide 'missing': file .*missing\.tiff does not exist"),
        "oddlabel": ({"label": "maybe"}, r"\.csv:\d+: slide 'oddlabel': unknown label 'maybe'"),
    }


@pytest.fixture(scope="module")
def batch(centre, tmp_path_factory):
    """A copy of the centre plus every bad input, listed in one slides.csv."""
    root = tmp_path_factory.mktemp("batch")
    shutil.copytree(centre.parent / "slides", root / "slides")
    shutil.copytree(centre.parent / "annotations", root / "annotations")
    cases = _bad_files(root / "slides", root / "slides" / "C1_000.tiff")
    shutil.move(root / "slides" / "annotations" / "badann.xml", root / "annotations" / "badann.xml")
    rows = _rows(centre)
    for sid, (over, _) in cases.items():
        suffix = {"empty": ".svs", "text": ".svs"}.get(sid, ".tiff")
        rows.append({"slide_id": sid, "path": f"slides/{sid}{suffix}", "label": "normal", "centre": "C1",
                     "split": "train", **over})
    _write_rows(root / "slides.csv", rows)
    return root, cases


def test_each_bad_input_alone_is_one_clear_error(batch, tmp_path):
    root, cases = batch
    from histodd_fed.slides.manifest import read_manifest

    for sid, (over, pattern) in cases.items():
        rows = [r for r in _rows(root / "slides.csv") if r["slide_id"] == sid]
        _write_rows(root / f"only_{sid}.csv", rows)
        kw = dict(TILE, magnification=5.0) if sid == "nompp" else TILE
        with pytest.raises(InputError, match=pattern) as ei:
            tile_slides(root / f"only_{sid}.csv", tmp_path / sid, **kw)
        assert "\n" not in str(ei.value), sid
        assert not (tmp_path / sid).exists(), sid  # nothing written
        leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(f".{sid}") and p.name != f".{sid}.work"]
        assert leftovers == [], leftovers
    with pytest.raises(InputError, match="unknown label 'maybe'"):  # strict reading, for other callers
        read_manifest(root / "slides.csv")


def test_batch_goes_on_and_reports_every_bad_input(batch, tmp_path, caplog):
    root, cases = batch
    out = tmp_path / "store"
    with caplog.at_level("ERROR"):
        rep = tile_slides(root / "slides.csv", out, magnification=5.0, patch_size=16)
    skipped = {s["slide_id"]: s["error"] for s in rep.skipped}
    assert set(skipped) == set(cases)
    for sid, (_, pattern) in cases.items():
        assert "\n" not in skipped[sid]
        assert __import__("re").search(pattern, skipped[sid]), (sid, skipped[sid])
        assert any(skipped[sid] in r.getMessage() for r in caplog.records), sid  # logged as it happened
    ps = PatchSet.load(out)
    assert ps.slide_ids == ["C1_000", "C1_001"] and ps.slide_labels == {"C1_000": 1, "C1_001": 0} and len(ps) > 10
    assert {s["slide_id"] for s in ps.meta["skipped"]} == set(cases)
    assert (out.parent / ".store.work").is_dir()  # kept for a re-run after fixing the bad slides
    assert not list(out.parent.glob(".store.*.tmp*")) and not list((out.parent / ".store.work").glob("*.tmp"))


def test_cli_summary_exit_codes_and_strict(batch, centre, tmp_path):
    from centre_node.cli import app

    root, cases = batch
    runner = CliRunner()
    r = runner.invoke(app, ["-q", "tile", "--slides", str(root / "slides.csv"), "--out", str(tmp_path / "s"),
                            "--patch-size", "16", "--magnification", "5"])
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert "slide" in out and "C1_000" in out and "C1_001" in out and "total" in out
    assert f"{len(cases)} skipped" in out
    for sid in cases:
        assert f"skipped {sid}:" in out
    # --strict: exit non-zero, no store
    r = runner.invoke(app, ["-q", "tile", "--slides", str(root / "slides.csv"), "--out", str(tmp_path / "t"),
                            "--patch-size", "16", "--magnification", "5", "--strict"])
    assert r.exit_code != 0 and isinstance(r.exception, InputError) and "--strict" in str(r.exception)
    assert not (tmp_path / "t").exists()
    # nothing usable: non-zero
    only_bad = [row for row in _rows(root / "slides.csv") if row["slide_id"] in cases]
    _write_rows(root / "only_bad.csv", only_bad)
    r = runner.invoke(app, ["-q", "tile", "--slides", str(root / "only_bad.csv"), "--out", str(tmp_path / "u"),
                            "--patch-size", "16", "--magnification", "5"])
    assert r.exit_code != 0 and "no slide could be tiled" in str(r.exception)
    assert not (tmp_path / "u").exists()
    # a clean run exits 0 with the same table and no skips
    r = runner.invoke(app, ["-q", "tile", "--slides", str(centre), "--out", str(tmp_path / "v"), "--patch-size", "16"])
    assert r.exit_code == 0 and "0 skipped" in r.stdout


def test_labels_csv_naming_a_slide_not_in_the_folder(centre, tmp_path):
    rows = _rows(centre) + [{"slide_id": "ghost", "path": "slides/ghost.tiff", "label": "tumour", "centre": "C1",
                             "split": "test"}]
    _write_rows(tmp_path / "labels.csv", rows)
    rep = tile_slides(centre.parent / "slides", tmp_path / "s", labels_csv=tmp_path / "labels.csv", **TILE)
    assert [s["slide_id"] for s in rep.skipped] == ["ghost"]
    assert "labels.csv: slide 'ghost' is listed but no file for it is in" in rep.skipped[0]["error"]
    assert PatchSet.load(tmp_path / "s").slide_ids == ["C1_000", "C1_001"]
