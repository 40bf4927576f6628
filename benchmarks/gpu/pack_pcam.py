"""Pack a compact PCam subset for the one-shot GPU run of the paper recipe (benchmarks/gpu/paper_pcam.py).

Run HERE (not on the device): copies a seeded subset of ``../shared/data/pcam-ai4all/train`` (default 2,000
patches per class) and all of ``valid`` (1,500 per class) as the original 96 px JPEG files (their bytes
unchanged) into ``OUT/{train,valid}/CLASS/``, the image-folder layout every project loader reads
(``histodd_fed.patchset.load_image_folder``), and writes ``OUT/pack.json``. The subset is the one
``load_image_folder(train, limit_per_class=N, seed=SEED)`` takes (same sorted file list, same seeded draw), so
``load_patches(OUT/train)`` gives exactly the patches ``load_patches(pcam/train, limit=N, seed=SEED)`` would.

The default OUT, ``.gpu-data`` in the repository root, is added to ``.git/info/exclude`` (not ``.gitignore``)
so it never gets committed; the device call names it in ``carry`` (64 MiB for the whole working tree; the
default subset is ~31 MiB).

    .venv/bin/python benchmarks/gpu/pack_pcam.py                 # -> .gpu-data (2,000 / class of train, all valid)
    .venv/bin/python benchmarks/gpu/pack_pcam.py --train-per-class 20 --valid-per-class 10 --out /tmp/tiny
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from histodd_fed.patchset import IMAGE_SUFFIXES  # noqa: E402

DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "pcam-ai4all"
MAX_BYTES = 50 * 2**20          # the device's working tree is limited to 64 MiB in all


def pick_files(root: Path, limit: int | None, seed: int) -> dict[str, list[Path]]:
    """``{class: files}`` exactly as :func:`histodd_fed.patchset.load_image_folder` chooses them: classes
    in sorted order, each class's image files sorted, a seeded draw of ``limit`` (one rng across classes)."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SystemExit(f"{root}: no class sub-folders")
    rng = np.random.default_rng(seed)
    out = {}
    for cname in classes:
        files = sorted(p for p in (root / cname).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if limit is not None and len(files) > limit:
            files = [files[i] for i in sorted(rng.choice(len(files), limit, replace=False))]
        out[cname] = files
    return out


def ensure_excluded(out: Path) -> str | None:
    """Add ``/<out>/`` to the repository's ``.git/info/exclude`` when ``out`` lies inside the repository."""
    try:
        rel = out.resolve().relative_to(REPO)
    except ValueError:
        return None
    try:
        path = subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        print("warning: not a git checkout; add the data folder to your ignore rules yourself", file=sys.stderr)
        return None
    exclude = (REPO / path).resolve()
    line = f"/{rel.as_posix()}/"
    have = exclude.read_text().splitlines() if exclude.exists() else []
    if line not in have:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with exclude.open("a") as f:
            f.write(("" if not have or have[-1] == "" else "\n") + line + "\n")
    return line


def repo_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="PCam folder with train/ and valid/")
    ap.add_argument("--out", type=Path, default=REPO / ".gpu-data")
    ap.add_argument("--train-per-class", type=int, default=2000)
    ap.add_argument("--valid-per-class", type=int, default=None, help="default: all of valid")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if not (args.source / "train").is_dir() or not (args.source / "valid").is_dir():
        raise SystemExit(f"{args.source}: needs train/ and valid/ (CLASS/*.jpg)")
    if args.out.exists():
        shutil.rmtree(args.out)
    excluded = ensure_excluded(args.out)
    record: dict = {"source": str(args.source), "seed": args.seed, "commit": repo_commit(),
                    "format": "original JPEG files, OUT/{train,valid}/CLASS/*.jpg", "splits": {}}
    total = 0
    for split, limit, seed in (("train", args.train_per_class, args.seed), ("valid", args.valid_per_class, args.seed)):
        picked = pick_files(args.source / split, limit, seed)
        counts, nbytes = {}, 0
        for cname, files in picked.items():
            dst = args.out / split / cname
            dst.mkdir(parents=True)
            for f in files:
                shutil.copyfile(f, dst / f.name)
                nbytes += f.stat().st_size
            counts[cname] = len(files)
        record["splits"][split] = {"per_class": counts, "limit_per_class": limit, "bytes": nbytes}
        total += nbytes
    record["bytes"] = total
    record["seconds"] = round(time.perf_counter() - t0, 2)
    (args.out / "pack.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"packed {args.out}: " + ", ".join(f"{s} {v['per_class']}" for s, v in record["splits"].items())
          + f"; {total / 2**20:.1f} MiB of JPEG" + (f"; {excluded} in .git/info/exclude" if excluded else ""))
    if total > MAX_BYTES:
        raise SystemExit(f"{total / 2**20:.1f} MiB is over {MAX_BYTES / 2**20:.0f} MiB: pack fewer patches "
                         "(the device's working tree is limited to 64 MiB)")
    return record


if __name__ == "__main__":
    main()
