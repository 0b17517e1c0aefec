"""Forward+backward time of MetadataNorm beside nn.BatchNorm1d and a plain copy (x * 1).

Usage: python benchmarks/bench_layer.py [--repeats R] [--rounds N] [--threads T]

"plain" is the paper's equations written with plain autograd ops, for reference. All run on
the same tensor, interleaved round by round, so the ratios are measured side by side in one run
(this machine is noisy); each figure is the best of the rounds, the one least disturbed by other
processes. The MDN layer runs with every check it does in normal use (input and metadata
validation, the finiteness check of the estimate, the running-β update).
Bars (issue 2): MDN ≤ 0.65× BatchNorm at (200, 18432, 3) and (256, 4096, 16), ≤ 3.5× the copy.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from metanorm.nn import MetadataNorm

SHAPES = [(200, 18432, 3), (200, 84, 3), (256, 4096, 16)]


def _time(fn: Callable[[], None], repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


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
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=20, help="calls per timing (default 20)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of "
        f"{args.rounds} rounds x {args.repeats} calls, forward+backward"
    )
    print(
        f"{'(m, D, K)':>18} {'MDN ms':>9} {'plain ms':>9} {'BN ms':>9} {'copy ms':>9} "
        f"{'MDN/BN':>7} {'MDN/copy':>9} {'plain/BN':>9}"
    )
    for m, d, k in SHAPES:
        t = bench(m, d, k, args.repeats, args.rounds)
        print(
            f"{(m, d, k)!s:>18} {t['mdn'] * 1e3:9.3f} {t['plain'] * 1e3:9.3f} "
            f"{t['batchnorm'] * 1e3:9.3f} {t['copy'] * 1e3:9.3f} "
            f"{t['mdn'] / t['batchnorm']:7.2f} {t['mdn'] / t['copy']:9.2f} "
            f"{t['plain'] / t['batchnorm']:9.2f}"
        )


if __name__ == "__main__":
    main()
