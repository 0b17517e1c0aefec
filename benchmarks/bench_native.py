"""The optional compiled op (``native/``) against the PyTorch operations it replaces.

Usage::

    python benchmarks/bench_native.py [--threads 2] [--rounds 15] [--target 0.05] [--json PATH]

Times, in turn round after round (the order rotates each round), on the same tensors:

  low_rank_residual  ``_C.low_rank_residual(F, A, B)`` against
                     ``torch.addmm(F, A, B.T @ F, alpha=-1)`` at the layer's benchmark shapes,
                     float32 and float64;
  running_update     ``metanorm._native.running_update_fast`` (the direct call the layer makes in
                     eager mode; the registered op adds its dispatch) against
                     ``metanorm.nn.functional.update_running_beta`` on the PyTorch path (one
                     process, an int batch size, all three counters), on a (K, D) running β.

Reported per case: the best time of each and the median over rounds of torch/op (above 1: the
op is faster). Needs ``make native``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
from bench_layer import calibrate, interleaved

SHAPES = [(200, 18432, 3), (200, 84, 3), (256, 4096, 16), (64, 25088, 5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--target", type=float, default=0.05, help="seconds per timing")
    parser.add_argument("--json", help="write every timing here")
    args = parser.parse_args()

    from metanorm import _native
    from metanorm.nn import functional as MF

    if not _native.available():
        raise SystemExit("metanorm_native is not built: make native")
    from metanorm_native import _C

    torch.set_num_threads(args.threads)
    print(f"ISA {_C.ISA}, OpenMP {_C.OPENMP}, {torch.get_num_threads()} threads")
    results = []
    gen = torch.Generator().manual_seed(0)
    for m, d, k in SHAPES:
        for dtype in (torch.float32, torch.float64):
            F = torch.randn(m, d, generator=gen, dtype=dtype)
            A = torch.randn(m, k, generator=gen, dtype=dtype)
            B = torch.randn(m, k, generator=gen, dtype=dtype) / m

            def op(F=F, A=A, B=B) -> None:
                _C.low_rank_residual(F, A, B)

            def products(F=F, A=A, B=B) -> None:
                torch.addmm(F, A, B.T @ F, alpha=-1)

            variants = {"op": op, "torch": products}
            results.append(_report("low_rank_residual", (m, d, k), dtype, variants, args))
    for k, d in [(3, 18432), (3, 84), (16, 4096), (5, 25088)]:
        beta = torch.randn(k, d, generator=gen)
        running = torch.zeros(k, d)
        counters = [torch.tensor(10), torch.tensor(1000), torch.tensor(0)]

        def update(beta=beta, running=running, counters=counters) -> None:
            _native.running_update_fast(running, beta, 100, 0.1, *counters)

        def pytorch(beta=beta, running=running, counters=counters) -> None:
            MF.update_running_beta(
                running,
                beta,
                100,
                0.1,
                num_batches_tracked=counters[0],
                num_samples_tracked=counters[1],
                num_batches_skipped=counters[2],
            )

        def torch_path(fn: Callable[[], None] = pytorch) -> None:
            previous = _native.set_enabled(False)
            fn()
            _native.set_enabled(previous)

        variants = {"op": update, "torch": torch_path}
        results.append(_report("running_update", (k, d), torch.float32, variants, args))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


def _report(
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    variants: dict[str, Callable[[], None]],
    args: argparse.Namespace,
) -> dict[str, object]:
    times = interleaved(variants, args.rounds, calibrate(variants, args.target))
    ratio = statistics.median(t / o for t, o in zip(times["torch"], times["op"], strict=True))
    dt = str(dtype).removeprefix("torch.")
    print(
        f"{name:18s} {shape!s:18s} {dt:8s} op {min(times['op']) * 1e3:8.3f} ms  "
        f"torch {min(times['torch']) * 1e3:8.3f} ms  torch/op {ratio:5.2f}"
    )
    return {"case": name, "shape": shape, "dtype": dt, "times_s": times, "torch_over_op": ratio}


if __name__ == "__main__":
    main()
