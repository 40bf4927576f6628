"""histodd_fed.preprocess: one view spec, one resize, recorded in the PatchSet's meta."""

from __future__ import annotations

import numpy as np
import pytest

from histodd_fed.errors import InputError
from histodd_fed.patchset import PatchSet
from histodd_fed.preprocess import (ViewSpec, apply_view, audit_views, current_view, prepare, recorded_view,
                                    resize_to, to_view)


def raw(n: int = 4, size: int = 96) -> PatchSet:
    rng = np.random.default_rng(0)
    return PatchSet(images=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), labels=np.arange(n) % 2,
                    class_names=["a", "b"])


def test_views_are_canonical_and_round_trip():
    assert ViewSpec(96, crop=96, size=96).is_identity and ViewSpec(96, crop=96) == ViewSpec(96)
    assert ViewSpec(96, crop=32, size=32) == ViewSpec.centre_crop(96, 32)
    v = ViewSpec.centre_crop(96, 48, 32)
    assert v.out_size == 32 and v.describe() == "96 px -> centre crop 48 -> resize 32 (bilinear_aa)"
    assert ViewSpec.from_dict(v.to_dict()) == v and v.slug == "96px-crop48-to32"
    assert ViewSpec.centre_crop(96, 32).with_size(16) == ViewSpec(96, crop=32, size=16)
    with pytest.raises(InputError, match="does not fit"):
        ViewSpec(32, crop=48)
    with pytest.raises(InputError, match="bad view"):
        ViewSpec.from_dict({"crop": 32})


def test_apply_to_view_and_resize_record_the_view():
    ps = raw()
    crop = apply_view(ps, ViewSpec.centre_crop(96, 32))
    assert crop.image_size == 32 and np.array_equal(crop.images, ps.images[:, 32:64, 32:64])
    assert recorded_view(crop) == ViewSpec.centre_crop(96, 32) and recorded_view(ps) is None
    assert to_view(crop, ViewSpec.centre_crop(96, 32)) is crop            # already in that view
    with pytest.raises(InputError, match="give the raw 96-px"):
        to_view(crop, ViewSpec.resize(96, 32))                            # another view
    with pytest.raises(InputError, match="patches are 32 px"):
        to_view(raw(size=32), ViewSpec.centre_crop(96, 32))                # raw, but of another size
    small = resize_to(crop, 16)
    assert small.image_size == 16 and recorded_view(small) == ViewSpec(96, crop=32, size=16)
    assert current_view(ps) == ViewSpec(96) and resize_to(ps, 96) is ps
    assert recorded_view(prepare(ps, crop=32, size=16)) == ViewSpec(96, crop=32, size=16)
    with pytest.raises(InputError, match="already in view"):
        prepare(crop, crop=16)


def test_audit_views_take_both_plausible_views():
    crop = ViewSpec.centre_crop(96, 32)
    assert audit_views(crop, 96, 32) == [crop, ViewSpec.resize(96, 32)]
    assert audit_views(None, 96, 32) == [ViewSpec.resize(96, 32), crop]
    assert audit_views(ViewSpec.centre_crop(96, 64, 32), 96, 32) == [
        ViewSpec.centre_crop(96, 64, 32), ViewSpec.resize(96, 32), crop]
    assert audit_views(None, 32, 32) == [ViewSpec(32)]
