"""Does the export gate catch real patches sent with added noise and a colour cast?

Takes a real patch store (a PatchSet directory or a CLASS/*.jpg folder), picks ``--n`` patches
per class (seeded), adds gaussian pixel noise of each ``--sigmas`` (and an optional per-channel
colour cast), and runs :func:`histodd_fed.privacy.gate.check_export` of the noisy copies against
the store with ``configs/privacy.yaml``. Prints, per sigma, how many patches each rule flags and
the verdict; writes JSON with ``--json``.

    .venv/bin/python benchmarks/experiments/bench_gate_noisy_copies.py --real STORE [--sigmas 0.03,0.06,0.1,0.15,0.25]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from histodd_fed.patchset import PatchSet  # noqa: E402
from histodd_fed.privacy.gate import check_export  # noqa: E402


def noisy_copies(real: PatchSet, n_per_class: int, sigma: float, cast: tuple[float, float, float], seed: int) -> PatchSet:
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.where(real.labels == c)[0], n_per_class, replace=False)
                          for c in range(real.num_classes)])
    x = real.images[idx].astype(np.float32) / 255 * np.asarray(cast, np.float32)
    x = np.clip(x + rng.normal(0, sigma, x.shape), 0, 1)
    return PatchSet(images=(x * 255).round().astype(np.uint8), labels=real.labels[idx],
                    class_names=list(real.class_names), kind="synthetic")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", required=True, type=Path, help="real patch store (PatchSet dir or CLASS/*.jpg folder)")
    ap.add_argument("--sigmas", default="0.03,0.06,0.1,0.15,0.25")
    ap.add_argument("--cast", default="1,1,1", help="per-channel RGB gain applied before the noise")
    ap.add_argument("--n", type=int, default=10, help="copies per class")
    ap.add_argument("--limit-per-class", type=int, default=500, help="cap when reading an image folder")
    ap.add_argument("--size", type=int, default=32, help="patch size when reading an image folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from histodd_fed.logging_setup import configure_logging

    configure_logging(quiet=True)
    if (args.real / "patchset.json").exists():
        real = PatchSet.load(args.real)
    else:
        from histodd_fed.patchset import load_image_folder

        real = load_image_folder(args.real, size=args.size, limit_per_class=args.limit_per_class, seed=args.seed)
    cast = tuple(float(v) for v in args.cast.split(","))
    rows = []
    for sigma in (float(s) for s in args.sigmas.split(",")):
        fake = noisy_copies(real, args.n, sigma, cast, args.seed)
        d = check_export(synthetic=fake, real=real, accept_risk=False, require_audit=True, raise_on_block=False)
        rules = {"ssim": "near copy", "l2": "than 99%", "structure": "keeps the layout", "auc": "membership"}
        fired = {k: next((r for r in d.reasons if v in r), "") for k, v in rules.items()}
        row = {"sigma": sigma, "cast": cast, "blocked": d.blocked, **{f"{k}_rule": bool(v) for k, v in fired.items()},
               "reasons": d.reasons}
        rows.append(row)
        print(f"sigma {sigma:5.3f}: {'BLOCKED' if d.blocked else 'passes '}  "
              + "  ".join(f"{k}: {(v.split(';')[-1].strip(' )') if v else '-')}" for k, v in fired.items() if k != "auc"),
              flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"real": str(args.real), "n_real": len(real), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
