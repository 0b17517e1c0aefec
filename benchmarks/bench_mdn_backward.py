"""Time MetadataNorm forward+backward: hand-written backward vs plain autograd, side by side.

The plain-autograd path is forced by passing design rows that require a gradient (the layer then
lets autograd differentiate with respect to them too, as before the hand-written backward).
Usage: python benchmarks/bench_mdn_backward.py [threads]
"""

import sys
import time

import torch

from metanorm.glm import make_design
from metanorm.nn import MetadataNorm

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
g = torch.Generator().manual_seed(0)
N, M = 2000, 200
y = torch.randint(0, 2, (N,), generator=g)
cf = torch.rand(N, generator=g) * 3 + 1 + 2 * y
design = make_design({"y": y.numpy(), "cf": cf.numpy()}, keep=["y"])
rows = design.tensor()[:M]
rows_grad = rows.clone().requires_grad_(True)


def timeit(fn, reps=15):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


print(f"threads={torch.get_num_threads()}  batch={M}  median ms of forward+backward")
for d in (84, 16 * 28 * 28, 32 * 24 * 24):
    layer = MetadataNorm(d, design)
    x = torch.randn(M, d, generator=g, requires_grad=True)
    grad = torch.randn(M, d, generator=g)
    variants = {
        "hand-written": lambda layer=layer, x=x, grad=grad: layer(x, rows).backward(grad),
        "autograd": lambda layer=layer, x=x, grad=grad: layer(x, rows_grad).backward(grad),
        "relu (reference)": lambda x=x, grad=grad: torch.relu(x).backward(grad),
    }
    res: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(3):  # interleave so that load changes hit every variant
        for k, fn in variants.items():
            res[k].append(timeit(fn))
    print(f"D={d:6d}  " + "  ".join(f"{k} {min(v):7.2f}" for k, v in res.items()))
