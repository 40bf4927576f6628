"""Per-bundle pseudonyms for what ties a sealed set to the source's records.

A per-slide set (and Full) carries the source's slide ids, and a distilled set records which real
patches initialised it (``meta["init_source_indices"]``). Slide ids are often record numbers and the
indices point into the source's patch store, so unless the source's policy allows them
(``export-slide-ids``) the recipient gets per-bundle random stand-ins: the slide structure (which
patches share a slide, the slide labels) survives, the real ids and indices do not.
"""

from __future__ import annotations

import secrets
from dataclasses import replace

from histodd_fed.patchset import PatchSet

#: meta keys holding indices into the source's real patch store
SOURCE_INDEX_KEYS = ("init_source_indices",)


def pseudonymise(ps: PatchSet) -> PatchSet:
    """``ps`` with random slide ids (``s-<hex>``, fresh per call) and source indices replaced."""
    salt = secrets.token_hex(4)
    ids = {sid: f"s-{salt}-{secrets.token_hex(6)}" for sid in ps.slide_ids}
    meta = dict(ps.meta)
    for key in SOURCE_INDEX_KEYS:
        if isinstance(meta.get(key), list):
            stand_in: dict = {}
            meta[key] = [stand_in.setdefault(i, f"i-{salt}-{secrets.token_hex(6)}") for i in meta[key]]
    meta["pseudonymised"] = {"slide_ids": bool(ids), "source_indices": [k for k in SOURCE_INDEX_KEYS if k in meta]}
    return replace(ps, slide_ids=[ids[s] for s in ps.slide_ids],
                   slide_labels={ids.get(s, s): v for s, v in ps.slide_labels.items() if s in ids},
                   meta=meta)
