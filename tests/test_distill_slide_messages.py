"""`centre-node distill --slides ...` says what tiling did and refuses an undistillable store with its real
cause and the fix (issue 23 item 5): the real CLI entry point on real SVS files and on generated slides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLIDES = ROOT.parent / "shared" / "data" / "slides"


def _distill(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "centre_node.cli", "distill", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_unlabelled_real_slides_warned_and_missing_class_refused_with_cause(tmp_path):
    if not SLIDES.is_dir():
        pytest.skip(f"{SLIDES} absent: real-slide tests need ../shared/data/slides next to the checkout")
    out = tmp_path / "S"
    r = _distill("--slides", str(SLIDES), "--out", str(out))
    err = " ".join(r.stderr.split())
    assert r.returncode != 0
    # the unlabelled slide is named with the label it was given
    assert "warning:" in err and "CMU-1-Small-Region" in err and "labelled 'normal'" in err
    # the missing class is refused with its cause and the fix, not with the distiller's "lower --ipc"
    assert "no 'tumour' patches" in err and "slides.csv" in err and "--annotations-dir" in err
    assert "lower --ipc" not in err
    assert not out.exists()


def test_too_few_patches_names_slide_sizes_and_what_gives_more(tmp_path):
    from histodd_fed.slides.demo import make_demo_centre

    import shutil

    csv = make_demo_centre(tmp_path / "demo", "C1", n_slides=4, seed=3, width=1536, height=1024)
    shutil.rmtree(tmp_path / "demo" / "annotations")   # slide labels only: 8 normal, 7 tumour patches
    out = tmp_path / "S"
    r = _distill("--slides", str(csv), "--out", str(out), "--patch-size", "128", "--mpp", "2.0", "--ipc", "10")
    err = " ".join(r.stderr.split())
    assert r.returncode != 0, r.stderr
    assert "too few patches" in err and "'normal' 8" in err and "'tumour' 7" in err
    assert "--mpp 2, --patch-size 128" in err and "C1_000: ~1536x1024 level-0 px at 0.5 mpp" in err
    assert "--mpp 1 or --patch-size 64 gives about 4x more" in err and "lower --ipc to 7" in err
    assert not out.exists()
