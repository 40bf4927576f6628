"""Is a freshly tiled store fit to distil? Say what tiling did (unlabelled slides, the label assumed) and
refuse, with the real cause and the fix, a store that cannot give ``ipc`` images per class.

Used by ``centre-node distill --slides`` between tiling and distillation (a user who hands over a folder
of slides should never meet the distiller's "lower --ipc" for what is really a labelling or tiling
problem).
"""

from __future__ import annotations

from typing import Any

from histodd_fed.errors import InputError

#: the label a slide with neither a manifest label nor annotations gets (histodd_fed.slides.tiling)
ASSUMED_LABEL = "normal"


def _slide_size(info: dict[str, Any], patch_size: int) -> str:
    grid = info.get("grid") or [0, 0]
    down = float(info.get("target_downsample") or 1.0)
    w, h = round(grid[0] * patch_size * down), round(grid[1] * patch_size * down)   # grid: (columns, rows)
    mpp = info.get("mpp")
    return f"~{w}x{h} level-0 px" + (f" at {mpp:g} mpp" if isinstance(mpp, (int, float)) else "")


def tiling_warnings(report: Any) -> list[str]:
    """What tiling did that the user did not ask for: unlabelled slides (and the label they were given),
    skipped slides. ``report``: the :class:`~histodd_fed.slides.tiling.TileReport`."""
    per_slide: dict[str, dict] = dict(report.per_slide)
    out = []
    unlabelled = sorted(s for s, i in per_slide.items() if i.get("label_source") == "unlabelled")
    if unlabelled:
        out.append(f"{len(unlabelled)} of {len(per_slide)} slides have no label and no annotations "
                   f"({', '.join(unlabelled[:5])}{', ...' if len(unlabelled) > 5 else ''}): every patch of them "
                   f"was labelled {ASSUMED_LABEL!r}; label slides in a slides.csv (slide_id,path,label) or give "
                   "--annotations-dir DIR")
    if report.skipped:
        out.append(f"{len(report.skipped)} slides skipped ({report.store}/tile_report.json lists why); first: "
                   f"{report.skipped[0]['error']}")
    return out


def check_distillable(report: Any, *, ipc: int, mpp: float | None, patch_size: int,
                      magnification: float | None = None) -> None:
    """Raise :class:`InputError` naming the cause and the fix when a class of the tiled store has no patch
    (labelling) or fewer than ``ipc`` (slide sizes, the resolution and patch size used, what gives more)."""
    per_slide: dict[str, dict] = dict(report.per_slide)
    counts: dict[str, int] = dict(report.class_counts)
    resolution = f"--magnification {magnification:g}" if magnification is not None else f"--mpp {mpp:g}"
    missing = [c for c, n in counts.items() if n == 0]
    if missing:
        labelled = {c: sorted(s for s, i in per_slide.items() if i.get("label") == c) for c in missing}
        cause = "; ".join(
            f"no {c!r} patches: none of the {len(per_slide)} tiled slides is labelled {c!r}"
            + (" (their tissue gave no patch)" if labelled[c] else "")
            + (" or has annotations marking it" if c != ASSUMED_LABEL else "")
            for c in missing)
        raise InputError(f"cannot distil: {cause}; label slides in a slides.csv (slide_id,path,label; pass it as "
                         "--slides or --labels-csv) or give --annotations-dir DIR with each tumour slide's regions")
    few = {c: n for c, n in counts.items() if n < ipc}
    if few:
        sizes = ", ".join(f"{s}: {_slide_size(i, patch_size)} -> {i.get('patches', 0)} patches"
                          for s, i in sorted(per_slide.items())[:5])
        finer = (f"--mpp {mpp / 2:g}" if mpp is not None and magnification is None
                 else f"--magnification {2 * magnification:g}" if magnification is not None else "a finer --mpp")
        what = ", ".join(f"{c!r} {n}" for c, n in few.items())
        raise InputError(f"cannot distil {ipc} images per class: too few patches ({what}) from "
                         f"{len(per_slide)} slide(s) tiled at {resolution}, --patch-size {patch_size} ({sizes}); "
                         f"{finer} or --patch-size {max(patch_size // 2, 32)} gives about 4x more patches per "
                         f"slide, more slides give more, or lower --ipc to {max(min(few.values()), 1)}")
