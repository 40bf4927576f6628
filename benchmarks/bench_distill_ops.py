"""Where a CPU matching step's time goes, and which op-level alternatives are faster (issue #3).

All on one ConvNet-3 (instance norm, avg-pool) at 32 px, ``--threads`` torch threads, same inputs:

1. one gradient-matching step (real batch of 2 x ``--batch-real``, 20 synthetic images, L1, image
   gradient): NCHW vs channels_last, and the real-side CE gradient alone;
2. 2x2 average pooling forward + backward: ``F.avg_pool2d`` vs reshape-mean vs strided slices;
3. instance norm forward + backward: ``GroupNorm(C, C)`` vs ``F.instance_norm``;
4. the real-side per-class gradient: eager autograd vs ``torch.compile`` of ``torch.func.grad``
   (first call = compile time), with the max abs difference.

Prints seconds (median of ``--repeat``) and ratios; ``--json`` writes them.

    .venv/bin/python benchmarks/bench_distill_ops.py [--width 32] [--batch-real 128] [--threads 1] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from histodd_fed.models.convnet import ConvNet  # noqa: E402


def timed(fn, repeat: int) -> float:
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch-real", type=int, default=128, help="real images per class (2 classes)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (needs a C++ compiler)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    net = ConvNet(2, 32, width=args.width)
    ws = list(net.parameters())
    n = 2 * args.batch_real
    xr = torch.rand(n, 3, 32, 32, generator=g)
    yr = torch.arange(n) % 2
    xs = torch.rand(20, 3, 32, 32, generator=g, requires_grad=True)
    ys = torch.arange(20) % 2
    rows: dict[str, float] = {}

    def step(model, a, b):
        gr = torch.autograd.grad(F.cross_entropy(model(a), yr), ws)
        gs = torch.autograd.grad(F.cross_entropy(model(b), ys), ws, create_graph=True)
        return torch.autograd.grad(sum((p - q).abs().sum() for p, q in zip(gr, gs)), b)[0]

    rows["step_nchw_s"] = timed(lambda: step(net, xr, xs), args.repeat)
    rows["real_grad_nchw_s"] = timed(lambda: torch.autograd.grad(F.cross_entropy(net(xr), yr), ws), args.repeat)
    net_cl = ConvNet(2, 32, width=args.width)
    net_cl.load_state_dict(net.state_dict())
    net_cl = net_cl.to(memory_format=torch.channels_last)
    ws_cl = list(net_cl.parameters())
    xr_cl = xr.contiguous(memory_format=torch.channels_last)

    def step_cl():
        gr = torch.autograd.grad(F.cross_entropy(net_cl(xr_cl), yr), ws_cl)
        xb = xs.contiguous(memory_format=torch.channels_last)
        gs = torch.autograd.grad(F.cross_entropy(net_cl(xb), ys), ws_cl, create_graph=True)
        return torch.autograd.grad(sum((p - q).abs().sum() for p, q in zip(gr, gs)), xs)[0]

    rows["step_channels_last_s"] = timed(step_cl, args.repeat)

    x = torch.rand(n, args.width, 32, 32, generator=g, requires_grad=True)
    gp = torch.rand(n, args.width, 16, 16, generator=g)
    gn_out = torch.rand(n, args.width, 32, 32, generator=g)
    pools = {
        "pool_avg_pool2d_s": lambda t: F.avg_pool2d(t, 2),
        "pool_reshape_mean_s": lambda t: t.reshape(t.shape[0], t.shape[1], 16, 2, 16, 2).mean((3, 5)),
        "pool_slices_s": lambda t: (t[:, :, 0::2, 0::2] + t[:, :, 1::2, 0::2] + t[:, :, 0::2, 1::2] + t[:, :, 1::2, 1::2]) * 0.25,
    }
    for name, fn in pools.items():
        rows[name] = timed(lambda fn=fn: torch.autograd.grad(fn(x), x, gp), args.repeat)
    gnorm = torch.nn.GroupNorm(args.width, args.width)
    rows["norm_groupnorm_s"] = timed(lambda: torch.autograd.grad(gnorm(x), x, gn_out), args.repeat)
    rows["norm_instance_norm_s"] = timed(
        lambda: torch.autograd.grad(F.instance_norm(x, weight=gnorm.weight, bias=gnorm.bias), x, gn_out), args.repeat)

    if not args.no_compile:
        from torch.func import functional_call, grad

        params = {k: v.detach() for k, v in net.named_parameters()}
        real_grad = grad(lambda p, a, b: F.cross_entropy(functional_call(net, p, (a,)), b))
        compiled = torch.compile(real_grad)
        t = time.perf_counter()
        out_c = compiled(params, xr, yr)
        rows["compile_first_call_s"] = time.perf_counter() - t
        rows["real_grad_compiled_s"] = timed(lambda: compiled(params, xr, yr), args.repeat)
        out_e = real_grad(params, xr, yr)
        rows["compiled_max_abs_diff"] = max(float((out_e[k] - out_c[k]).abs().max()) for k in out_e)

    for k, v in rows.items():
        print(f"{k:28s} {v:.4g}")
    r = rows
    print(f"\nchannels_last vs NCHW step: {r['step_nchw_s'] / r['step_channels_last_s']:.2f}x; real-side share of a step: "
          f"{r['real_grad_nchw_s'] / r['step_nchw_s']:.0%}; pooling reshape / slices vs avg_pool2d: "
          f"{r['pool_avg_pool2d_s'] / r['pool_reshape_mean_s']:.2f}x / {r['pool_avg_pool2d_s'] / r['pool_slices_s']:.2f}x; "
          f"instance_norm vs GroupNorm: {r['norm_groupnorm_s'] / r['norm_instance_norm_s']:.2f}x"
          + (f"; compiled vs eager real-side gradient: {r['real_grad_nchw_s'] / r['real_grad_compiled_s']:.2f}x"
             if "real_grad_compiled_s" in r else ""))
    if args.json is not None:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "torch": torch.__version__,
                                         "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
