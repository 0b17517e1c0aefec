"""Forward+backward time of MetadataNorm beside nn.BatchNorm1d and a plain copy (x * 1).

Usage: python benchmarks/bench_layer.py [--repeats R] [--rounds N] [--threads T] [--no-kernel]

"plain" is the paper's equations written with plain autograd ops, for reference. All run on
the same tensor, interleaved round by round, so the ratios are measured side by side in one run
(this machine is noisy). Times are the best of the rounds (the round least disturbed by other
processes); the ratios are medians of the per-round ratios, which drift less with the load.
The MDN layer runs with every check it does in normal use (input and metadata validation, the
finiteness check of the estimate and the metadata, the running-β update), on the compiled CPU
kernel when it is built (``--no-kernel``: the plain PyTorch fallback).
"floor" is the time the 4 matrix products of MDN's forward and backward (2·K·m·D
multiply-adds each) take at this machine's measured float32 GEMM peak, before any memory
traffic: no implementation of the same maths in float32 can be faster.
Bars (issue 2): MDN ≤ 0.65× BatchNorm at (200, 18432, 3) and (256, 4096, 16), ≤ 3.5× the copy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from metanorm import glm
from metanorm.nn import MetadataNorm

SHAPES = [(200, 18432, 3), (200, 84, 3), (256, 4096, 16)]


def _time(fn: Callable[[], None], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def gemm_peak(n: int = 1024, rounds: int = 5) -> float:
    """Best float32 GEMM rate of this machine in FLOP/s (an n×n by n×n product)."""
    a, b, c = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=c)
    best = min(_time(lambda: torch.mm(a, b, out=c), 3) for _ in range(rounds))
    return 2 * n**3 / best


def bench(m: int, d: int, k: int, repeats: int, rounds: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    n = 10 * m
    design = torch.cat([torch.randn(n, k - 1, generator=g), torch.ones(n, 1)], dim=1)
    rows = design[:m].contiguous()
    x = torch.randn(m, d, generator=g, requires_grad=True)
    grad = torch.randn(m, d, generator=g)
    mdn = MetadataNorm(d, design, keep=[0])
    bn = nn.BatchNorm1d(d)

    def run_mdn() -> None:
        mdn(x, rows).backward(grad)

    kernel = mdn.kernel.float()
    keep_out = rows.clone()
    keep_out[:, 0] = 0

    def run_plain() -> None:
        # the paper's equations written with plain autograd ops, for reference
        beta = (n / m) * kernel @ (rows.T @ x)
        (x - keep_out @ beta).backward(grad)

    def run_bn() -> None:
        bn(x).backward(grad)

    def run_copy() -> None:
        (x * 1).backward(grad)

    fns = {"mdn": run_mdn, "plain": run_plain, "batchnorm": run_bn, "copy": run_copy}
    for fn in fns.values():  # warm-up
        _time(fn, 3)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_time(fn, repeats))
    out = {name: min(t) for name, t in times.items()}
    for name, ref in (("mdn/bn", "batchnorm"), ("mdn/copy", "copy"), ("plain/bn", "batchnorm")):
        top = "plain" if name.startswith("plain") else "mdn"
        out[name] = statistics.median(a / b for a, b in zip(times[top], times[ref], strict=True))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=20, help="calls per timing (default 20)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-kernel", action="store_true", help="use the plain PyTorch fallback")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.no_kernel and glm.has_cpu_kernel():
        glm.set_cpu_kernel(False)
    path = "compiled CPU kernel" if glm.has_cpu_kernel() else "PyTorch fallback (no kernel)"
    peak = gemm_peak()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, MDN on the {path}; "
        f"float32 GEMM peak {peak / 1e9:.0f} GFLOP/s; forward+backward, best of "
        f"{args.rounds} rounds x {args.repeats} calls; ratios: median over rounds"
    )
    print(
        f"{'(m, D, K)':>18} {'MDN ms':>8} {'plain ms':>8} {'BN ms':>8} {'copy ms':>8} "
        f"{'floor ms':>8} {'MDN/BN':>7} {'MDN/copy':>8} {'plain/BN':>8} {'floor/BN':>8}"
    )
    for m, d, k in SHAPES:
        t = bench(m, d, k, args.repeats, args.rounds)
        floor = 4 * 2 * k * m * d / peak
        print(
            f"{(m, d, k)!s:>18} {t['mdn'] * 1e3:8.3f} {t['plain'] * 1e3:8.3f} "
            f"{t['batchnorm'] * 1e3:8.3f} {t['copy'] * 1e3:8.3f} {floor * 1e3:8.3f} "
            f"{t['mdn/bn']:7.2f} {t['mdn/copy']:8.2f} {t['plain/bn']:8.2f} "
            f"{floor / t['batchnorm']:8.2f}"
        )


if __name__ == "__main__":
    main()
