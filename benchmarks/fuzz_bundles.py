"""Fuzz the bundle opener: N seeded hostile mutations of a valid bundle, counts per error class.

Every mutation must be refused with one of the exact error classes it expects (see
``histodd_fed.bundle.hostile``); any other class, any non-bundle exception, any successful open,
or any output left behind is counted as a defect (exit status 1).

    timeout 600 .venv/bin/python benchmarks/fuzz_bundles.py --n 10000 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10000, help="number of mutations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=8, help="patches in the bundle (16x16)")
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--format-version", type=int, default=2, choices=(1, 2), help="bundle format to mutate")
    ap.add_argument("--out-dir-every", type=int, default=10,
                    help="every k-th open writes to an output dir (checked to stay absent)")
    ap.add_argument("--json", type=Path, default=None, help="also write the counts here")
    args = ap.parse_args(argv)

    from histodd_fed.bundle import NO_LEDGER, BundleError, Ledger, TrustStore, generate_identity, open_bundle, seal
    from histodd_fed.bundle.hostile import Mutator
    from histodd_fed.patchset import PatchSet

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        c1, c2 = generate_identity("C1", root / "C1"), generate_identity("C2", root / "C2")
        trust = TrustStore.load(root / "C2")
        trust.add(c1.public)
        trust.save()
        rng = np.random.default_rng(args.seed)
        ps = PatchSet(images=rng.integers(0, 256, (args.images, 16, 16, 3), dtype=np.uint8),
                      labels=np.arange(args.images) % 2, class_names=["normal", "tumour"], kind="synthetic",
                      meta={"seed": args.seed})
        blob = seal(ps, c1, [c2.public], chunk_size=args.chunk_size, version=args.format_version)
        open_bundle(blob, c2, trust, NO_LEDGER)  # the unmutated bundle opens
        mut = Mutator(blob, sign=c1.sign)
        ledger = Ledger(root / "ledger.json")
        counts: Counter = Counter()
        by_kind: Counter = Counter()
        defects: list[str] = []
        t0 = time.perf_counter()
        for i, mu in enumerate(mut.stream(args.seed, args.n)):
            out = root / "out" if i % args.out_dir_every == 0 else None
            try:
                open_bundle(mu.data, c2, trust, ledger, out_dir=out)
                defects.append(f"#{i} {mu.kind}/{mu.region}: opened")
            except BundleError as exc:
                counts[type(exc).__name__] += 1
                by_kind[f"{mu.kind}/{mu.region} -> {type(exc).__name__}"] += 1
                if type(exc) not in mu.expected:
                    defects.append(f"#{i} {mu.kind}/{mu.region}: {type(exc).__name__} not in "
                                   f"{[e.__name__ for e in mu.expected]}: {exc}")
            except Exception as exc:  # noqa: BLE001 - the point is to catch any other exception
                counts[f"OTHER:{type(exc).__name__}"] += 1
                defects.append(f"#{i} {mu.kind}/{mu.region}: unexpected {type(exc).__name__}: {exc}")
            if out is not None and out.exists():
                defects.append(f"#{i} {mu.kind}/{mu.region}: output left behind")
        dt = time.perf_counter() - t0
        leftovers = [p.name for p in root.iterdir() if p.name not in {"C1", "C2"}]
        if leftovers:
            defects.append(f"left behind: {leftovers}")

    print(f"bundle: {len(blob)} bytes, {mut.h.num_chunks} chunks of {args.chunk_size}; regions {len(mut.regions)}")
    print(f"{args.n} mutations in {dt:.2f} s: {args.n / dt:.0f} mutations/s")
    print("refusals per error class:")
    for k, v in counts.most_common():
        print(f"  {k:<28} {v:>7}")
    print("per mutation kind/region -> class:")
    for k, v in sorted(by_kind.items()):
        print(f"  {k:<60} {v:>7}")
    print(f"defects: {len(defects)}")
    for d in defects[:20]:
        print("  " + d)
    if args.json:
        args.json.write_text(json.dumps({"n": args.n, "seconds": dt, "rate": args.n / dt, "counts": counts,
                                         "by_kind": by_kind, "defects": defects}, indent=2))
    return 1 if defects else 0


if __name__ == "__main__":
    sys.exit(main())
