import json

import numpy as np
import pytest

from histodd_fed.atomic import atomic_directory, atomic_write_json
from histodd_fed.errors import InputError
from histodd_fed.patchset import PatchSet, load_image_folder
from histodd_fed.runconfig import config_hash, write_run_config


def test_roundtrip_keeps_everything(tmp_path, tiny_patchset):
    tiny_patchset.meta = {"centre": "C1"}
    tiny_patchset.save(tmp_path / "ps")
    back = PatchSet.load(tmp_path / "ps")
    assert np.array_equal(back.images, tiny_patchset.images)
    assert np.array_equal(back.labels, tiny_patchset.labels)
    assert np.array_equal(back.slide_index, tiny_patchset.slide_index)
    assert np.array_equal(back.coords, tiny_patchset.coords)
    assert back.slide_ids == ["s0", "s1", "s2"] and back.slide_labels == {"s0": 0, "s1": 1, "s2": 1}
    assert back.meta == {"centre": "C1"}
    assert back.class_counts() == {"normal": 6, "tumour": 6}
    mm = PatchSet.load(tmp_path / "ps", mmap=True)
    assert isinstance(mm.images, np.memmap)


def test_for_slide_and_subset(tiny_patchset):
    s1 = tiny_patchset.for_slide("s1")
    assert len(s1) == 4 and set(s1.slide_of(i) for i in range(4)) == {"s1"}
    x, y = tiny_patchset.subset([0, 1]).to_tensors()
    assert x.shape == (2, 3, 16, 16) and float(x.max()) <= 1.0 and y.tolist() == [0, 1]


def test_validation_errors_name_the_problem(tiny_patchset):
    with pytest.raises(InputError, match="label out of range"):
        PatchSet(images=tiny_patchset.images, labels=np.full(12, 5), class_names=["a", "b"])
    with pytest.raises(InputError, match="uint8"):
        PatchSet(images=tiny_patchset.images.astype(np.float32), labels=tiny_patchset.labels, class_names=["a", "b"])


def test_load_rejects_bad_directories(tmp_path, tiny_patchset):
    with pytest.raises(InputError, match="no such"):
        PatchSet.load(tmp_path / "missing")
    tiny_patchset.save(tmp_path / "ps")
    (tmp_path / "ps" / "labels.npy").write_bytes(b"garbage")
    with pytest.raises(InputError, match="labels.npy"):
        PatchSet.load(tmp_path / "ps")
    hdr = tmp_path / "ps" / "patchset.json"
    h = json.loads(hdr.read_text()); h["format_version"] = 99; hdr.write_text(json.dumps(h))
    with pytest.raises(InputError, match="newer"):
        PatchSet.load(tmp_path / "ps")


def test_pickled_arrays_are_refused(tmp_path, tiny_patchset):
    tiny_patchset.save(tmp_path / "ps")
    np.save(tmp_path / "ps" / "labels.npy", np.array([object()] * 12, dtype=object), allow_pickle=True)
    with pytest.raises(InputError):
        PatchSet.load(tmp_path / "ps")


def test_failed_save_leaves_previous_intact(tmp_path, tiny_patchset):
    target = tmp_path / "out"
    atomic_write_json(target / "keep.json", {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half.npy").write_bytes(b"x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["keep.json"]
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_image_folder_import(tmp_path):
    from PIL import Image

    for c, v in (("normal", 10), ("tumour", 200)):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), v, np.uint8)).save(tmp_path / c / f"{i}.png")
    ps = load_image_folder(tmp_path, size=4)
    assert ps.class_names == ["normal", "tumour"] and ps.images.shape == (6, 4, 4, 3)
    assert ps.labels.tolist() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "tumour" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="bad.png"):
        load_image_folder(tmp_path)


def test_run_config_and_hash(tmp_path):
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    p = write_run_config(tmp_path, "distill", {"seed": 3})
    rec = json.loads(p.read_text())
    assert rec["config"] == {"seed": 3} and rec["command"] == "distill" and "torch" in rec
