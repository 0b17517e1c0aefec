"""Time of one training step of MetadataNorm (forward + backward) beside its references.

Usage::

    python benchmarks/bench_layer.py [--threads 2] [--rounds 15] [--target 0.05]
                                     [--no-compile] [--shapes ...] [--json PATH]
    python benchmarks/bench_layer.py --cnn [--threads 1] [--batch 200]   # the paper's CNN

Every variant runs the same float32 step on the same tensors: ``out = f(x); out.backward(g)``
with ``x`` an (m, D) leaf that requires grad and ``g`` a fixed random upstream gradient (never
``.sum()``, whose gradient is a broadcast constant). ``x.grad`` is set to None before each step,
as ``optimizer.zero_grad()`` does, so autograd stores the layer's input gradient rather than
adding it to an old one. Variants:

  mdn       ``MetadataNorm(D, design, keep=[0])`` in training mode, eager, with everything a
            training step does (input checks, the running-β update)
  compiled  the same layer under ``torch.compile`` (default inductor backend, ``dynamic=False``:
            the shapes are static, one graph per shape, compiled before timing)
  bn        ``nn.BatchNorm1d(D)`` in training mode, eager
  copy      ``x.clone()``: forward reads x and writes the output, backward passes g through and
            autograd copies it into ``x.grad``; two reads and two writes of m·D floats, the
            memory traffic any layer that reads its input and writes a new output in each
            direction cannot go below
  plain     the paper's formula in plain float32 autograd, β = (N/m)·Σ⁻¹·XᵀF, out = F − X_R·β
            (X_R: the design rows with the kept column zeroed); autograd derives the backward
  mdn_bf16, bn_bf16  (``--bf16``) MDN and BatchNorm on bfloat16 input under ``torch.autocast``
  floor     the floor of this design in PyTorch: a bare autograd Function with the two thin
            products per direction (β = Bᵀ F, F − A β; G − B (Aᵀ G)) and one in-place
            ``lerp_`` of a running β, no checks and no counters
  before    (``--before SRC``) ``mdn`` from another checkout's ``SRC/metanorm`` (an earlier
            commit), imported as ``metanorm_before``, for before/after figures from one run
            (with ``--cnn``: ``mdn-conv-before``, the same CNN with that checkout's MDN layers)

Also printed per shape: the interquartile range of each variant's timings, and the number of
operator calls (``aten::`` events of :mod:`torch.profiler`, top level and nested) of one eager
training step of ``mdn``. ``--cnn`` times instead one training step (forward, BCE loss,
backward, SGD step) of the paper's CNN (``metanorm_repro.models.PaperCNN``, batch ``--batch`` of
1×32×32 images) with MDN-Conv (MDN after conv1, conv2 and fc1, per-position β) against the
Baseline (no norm layer) and BatchNorm in the same slots.

The variants are timed in turn, round after round (the order rotates each round), so each
round's ratios compare timings taken seconds apart on this noisy machine. A timing is the mean
over ``repeats`` calls (chosen so that a timing lasts about ``--target`` seconds). Reported: the
best and the median of the rounds' timings, and the median over rounds of the per-round ratios.
The design (N = 10·m rows: K − 1 standard normal columns and an intercept; column 0 kept) and
all tensors come from a fixed seed, as in ``compare_layer.py``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

#: (m, D, K): a conv feature map of a CNN (200×18432), the synthetic experiment's 84 features,
#: a wide design (K = 16), a VGG-sized map with a small batch.
SHAPES = [(200, 18432, 3), (200, 84, 3), (256, 4096, 16), (64, 25088, 5)]
LARGE = [(200, 18432, 3), (256, 4096, 16), (64, 25088, 5)]


def make_inputs(m: int, d: int, k: int, seed: int = 0) -> dict[str, Tensor]:
    """The design (N = 10·m, K), the batch rows, x (m, D) and the upstream gradient g (m, D)."""
    gen = torch.Generator().manual_seed(seed)
    n = 10 * m
    design = torch.cat([torch.randn(n, k - 1, generator=gen), torch.ones(n, 1)], dim=1)
    rows = design[:m].contiguous()
    x = torch.randn(m, d, generator=gen)
    g = torch.randn(m, d, generator=gen)
    return {"design": design, "rows": rows, "x": x, "g": g}


def step_fn(
    layer: Callable[..., Tensor], x: Tensor, g: Tensor, *args: Tensor
) -> Callable[[], None]:
    """One training step of ``layer``: forward, ``backward(g)``, with ``x.grad`` cleared."""

    def step() -> None:
        x.grad = None
        layer(x, *args).backward(g)

    return step


#: where the shapes run (``--device``); CUDA timings synchronise before and after
DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], None], repeats: int) -> float:
    """Mean seconds per call over ``repeats`` calls."""
    _sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync()
    return (time.perf_counter() - start) / repeats


def calibrate(fns: dict[str, Callable[[], None]], target: float) -> int:
    """Calls per timing so that the slowest variant's timing lasts about ``target`` seconds."""
    slowest = max(min(time_calls(fn, 2) for _ in range(2)) for fn in fns.values())
    return max(2, min(500, round(target / max(slowest, 1e-7))))


def interleaved(
    fns: dict[str, Callable[[], None]], rounds: int, repeats: int
) -> dict[str, list[float]]:
    """Per-round timings of every variant, the order rotating each round."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(time_calls(fns[name], repeats))
    return times


def summarise(
    times: dict[str, list[float]], ratios: dict[str, tuple[str, str]]
) -> dict[str, object]:
    """Best and median times, and for each ratio the median of the per-round ratios and the
    ratio of the best times."""
    out: dict[str, object] = {
        "best_ms": {n: min(t) * 1e3 for n, t in times.items()},
        "median_ms": {n: statistics.median(t) * 1e3 for n, t in times.items()},
        "ratio_median": {},
        "ratio_best": {},
    }
    for label, (top, ref) in ratios.items():
        if top in times and ref in times:
            per_round = [a / b for a, b in zip(times[top], times[ref], strict=True)]
            out["ratio_median"][label] = statistics.median(per_round)  # type: ignore[index]
            out["ratio_best"][label] = min(times[top]) / min(times[ref])  # type: ignore[index]
    return out


class _Floor(torch.autograd.Function):
    """F ↦ F − A·(BᵀF), backward G ↦ G − B·(AᵀG): the two thin products per direction."""

    @staticmethod
    def forward(ctx, f: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        beta = b.T @ f
        ctx.save_for_backward(a, b)
        ctx.mark_non_differentiable(beta)
        return torch.addmm(f, a, beta, alpha=-1), beta

    @staticmethod
    def backward(ctx, g: Tensor, _: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        a, b = ctx.saved_tensors
        return torch.addmm(g, b, a.T @ g, alpha=-1), None, None


def floor_layer(design: Tensor, rows: Tensor, d: int, keep: int = 0) -> Callable[[Tensor], Tensor]:
    """The floor variant: the Function above and one ``lerp_`` of a running β."""
    d64 = design.to(torch.float64)
    weight = torch.linalg.inv(d64.T @ d64) * (design.shape[0] / rows.shape[0])
    b = (rows.to(torch.float64) @ weight).float()
    a = rows.clone()
    a[:, keep] = 0
    running = torch.zeros(rows.shape[1], d, device=rows.device)

    def layer(f: Tensor) -> Tensor:
        out, beta = _Floor.apply(f, a, b)
        running.lerp_(beta, 0.1)
        return out

    return layer


def count_ops(fn: Callable[[], None]) -> int:
    """``aten::`` operator calls (top level and nested) of one call of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]


def plain_formula(design: Tensor, rows: Tensor, keep: int = 0) -> Callable[[Tensor], Tensor]:
    """The paper's equations in plain float32 autograd: β = (N/m)·Σ⁻¹·XᵀF, F − X_R·β."""
    d64 = design.to(torch.float64)
    gram_inverse = torch.linalg.inv(d64.T @ d64).float()
    weight = gram_inverse * (design.shape[0] / rows.shape[0])
    removed = rows.clone()
    removed[:, keep] = 0

    def layer(f: Tensor) -> Tensor:
        beta = weight @ (rows.T @ f)
        return f - removed @ beta

    return layer


#: the package imported from ``--before`` (None: no before variant)
BEFORE: object = None


def load_before(src: str) -> object:
    """``SRC/metanorm`` copied to a temporary folder and imported as ``metanorm_before``."""
    import importlib
    import pathlib
    import re
    import shutil
    import sys
    import tempfile

    root = pathlib.Path(tempfile.mkdtemp())
    shutil.copytree(
        pathlib.Path(src) / "metanorm",
        root / "metanorm_before",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for path in (root / "metanorm_before").rglob("*.py"):
        path.write_text(re.sub(r"\bmetanorm\b", "metanorm_before", path.read_text()))
    sys.path.insert(0, str(root))
    return importlib.import_module("metanorm_before")


def bench_shape(
    m: int, d: int, k: int, rounds: int, target: float, compile_: bool, bf16: bool = False
) -> dict[str, object]:
    from metanorm.nn import MetadataNorm

    t = {name: v.to(DEVICE) for name, v in make_inputs(m, d, k).items()}
    x = t["x"].requires_grad_()
    rows, g = t["rows"], t["g"]
    mdn = MetadataNorm(d, t["design"], keep=[0]).to(DEVICE)
    bn = nn.BatchNorm1d(d).to(DEVICE)
    plain = plain_formula(t["design"], rows)
    fns: dict[str, Callable[[], None]] = {"mdn": step_fn(mdn, x, g, rows)}
    compile_s = None
    if compile_:
        compiled = torch.compile(MetadataNorm(d, t["design"], keep=[0]).to(DEVICE), dynamic=False)
        start = time.perf_counter()
        for _ in range(3):  # compiles forward and backward graphs
            step_fn(compiled, x, g, rows)()
        compile_s = time.perf_counter() - start
        fns["compiled"] = step_fn(compiled, x, g, rows)
        # the compiled layer gives the eager layer's result
        x.grad = None
        ref = mdn(x, rows)
        out = compiled(x, rows)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    fns["bn"] = step_fn(bn, x, g)
    fns["copy"] = step_fn(torch.clone, x, g)
    fns["plain"] = step_fn(plain, x, g)
    fns["floor"] = step_fn(floor_layer(t["design"], rows, d), x, g)
    if BEFORE is not None:
        before = BEFORE.nn.MetadataNorm(d, t["design"], keep=[0]).to(DEVICE)  # type: ignore[attr-defined]
        fns["before"] = step_fn(before, x, g, rows)
    if bf16:  # bfloat16 input under autocast (MDN computes in float32 inside)
        xb = x.detach().bfloat16().requires_grad_()
        gb = g.bfloat16()

        def autocast(fn: Callable[[], None]) -> Callable[[], None]:
            def step() -> None:
                with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                    fn()

            return step

        fns["mdn_bf16"] = autocast(step_fn(mdn, xb, gb, rows))
        fns["bn_bf16"] = autocast(step_fn(bn, xb, gb))
    ops = {name: count_ops(fns[name]) for name in ("mdn", "before", "floor", "bn") if name in fns}
    for fn in fns.values():  # warm-up
        time_calls(fn, 3)
    repeats = calibrate(fns, target)
    times = interleaved(fns, rounds, repeats)
    ratios = {
        "mdn/bn": ("mdn", "bn"),
        "mdn/copy": ("mdn", "copy"),
        "mdn/plain": ("mdn", "plain"),
        "mdn/floor": ("mdn", "floor"),
        "mdn/before": ("mdn", "before"),
        "before/bn": ("before", "bn"),
        "before/floor": ("before", "floor"),
        "floor/bn": ("floor", "bn"),
        "compiled/floor": ("compiled", "floor"),
        "compiled/mdn": ("compiled", "mdn"),
        "mdn_bf16/bn_bf16": ("mdn_bf16", "bn_bf16"),
        "compiled/bn": ("compiled", "bn"),
        "compiled/copy": ("compiled", "copy"),
    }
    res = summarise(times, ratios)
    res.update(shape=[m, d, k], repeats=repeats, rounds=rounds, compile_s=compile_s, ops=ops)
    res["iqr_ms"] = {n: iqr(ts) * 1e3 for n, ts in times.items()}
    res["times_ms"] = {n: [v * 1e3 for v in ts] for n, ts in times.items()}
    return res


def swap_before(model: nn.Module) -> None:
    """Replaces each ``MetadataNorm`` of ``model`` by the ``--before`` checkout's, same state."""
    from metanorm.nn import MetadataNorm

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is MetadataNorm:
                old = BEFORE.nn.MetadataNorm(  # type: ignore[attr-defined]
                    child.num_features, num_metadata=child.num_metadata
                )
                with warnings.catch_warnings():  # a fresh layer's zero β: "never trained"
                    warnings.simplefilter("ignore")
                    old.load_state_dict(child.state_dict())
                setattr(parent, child_name, old.train(child.training))


def bench_cnn(args: argparse.Namespace) -> None:
    """One SGD training step of PaperCNN: MDN-Conv against the Baseline and BatchNorm."""
    from metanorm_repro.models.cnn import PaperCNN

    gen = torch.Generator().manual_seed(0)
    n, m = 2000, args.batch
    y = torch.randint(0, 2, (n, 1), generator=gen).float()
    design = torch.cat([y, torch.rand(n, 1, generator=gen) * 3 + 1 + 2 * y, torch.ones(n, 1)], 1)
    rows = design[:m]
    x = torch.randn(m, 1, 32, 32, generator=gen)
    target = rows[:, 0].clone()
    fns: dict[str, Callable[[], None]] = {}
    ops = {}
    variants = [("baseline", "none"), ("mdn-conv", "mdn-conv"), ("batchnorm", "batchnorm")]
    if BEFORE is not None:
        variants.append(("mdn-conv-before", "mdn-conv"))
    for name, norm in variants:
        torch.manual_seed(0)
        model = PaperCNN(norm, design, keep=[0]) if norm == "mdn-conv" else PaperCNN(norm)
        if name.endswith("-before"):
            swap_before(model)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            logits, _ = model(x, rows)
            loss = nn.functional.binary_cross_entropy_with_logits(logits.squeeze(1), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fns[name] = step
        ops[name] = count_ops(step)
    for fn in fns.values():
        time_calls(fn, 2)
    repeats = calibrate(fns, args.target)
    times = interleaved(fns, args.rounds, repeats)
    res = summarise(
        times,
        {
            "mdn-conv/baseline": ("mdn-conv", "baseline"),
            "batchnorm/baseline": ("batchnorm", "baseline"),
            "mdn-conv-before/baseline": ("mdn-conv-before", "baseline"),
            "mdn-conv/mdn-conv-before": ("mdn-conv", "mdn-conv-before"),
        },
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, PaperCNN training step, "
        f"batch {m}, best / median (IQR) of {args.rounds} interleaved rounds, {repeats} steps each"
    )
    for name, ts in times.items():
        best, med = min(ts) * 1e3, statistics.median(ts) * 1e3
        print(
            f"  {name:<10} {best:8.2f} / {med:8.2f} (IQR {iqr(ts) * 1e3:.2f}) ms, "
            f"{ops[name]} aten ops"
        )
    for label, value in res["ratio_median"].items():  # type: ignore[union-attr]
        print(f"  {label}: {value:.3f} (best {res['ratio_best'][label]:.3f})")  # type: ignore[index]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    p.add_argument("--target", type=float, default=0.05, help="seconds per timing (default 0.05)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--shapes", default=None, help="e.g. '200,18432,3;64,25088,5'")
    p.add_argument("--json", default=None, help="write the figures to this path")
    p.add_argument("--cnn", action="store_true", help="time the paper's CNN step instead")
    p.add_argument("--batch", type=int, default=200, help="--cnn: batch size (default 200)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--bf16", action="store_true", help="also time bfloat16 under autocast")
    p.add_argument("--before", default=None, help="another checkout's src/ to time beside")
    args = p.parse_args()
    global DEVICE, BEFORE
    DEVICE = torch.device(args.device)
    if args.before:
        BEFORE = load_before(args.before)
    torch.set_num_threads(args.threads)
    if args.cnn:
        bench_cnn(args)
        return
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    print(
        f"torch {torch.__version__}, {DEVICE}, {torch.get_num_threads()} threads, float32, "
        f"forward + backward(g); best / median of {args.rounds} interleaved rounds; ratios: "
        "median of per-round ratios (ratio of best times in brackets)"
    )
    results = []
    for m, d, k in shapes:
        res = bench_shape(m, d, k, args.rounds, args.target, not args.no_compile, args.bf16)
        results.append(res)
        best, med = res["best_ms"], res["median_ms"]
        rm, rb = res["ratio_median"], res["ratio_best"]
        print(
            f"\n(m, D, K) = {(m, d, k)}: {res['repeats']} calls per timing"
            + (f", compile {res['compile_s']:.0f} s" if res["compile_s"] else "")
        )
        spread = res["iqr_ms"]
        print(
            "  "
            + "  ".join(f"{n} {best[n]:.3f} / {med[n]:.3f} (IQR {spread[n]:.3f}) ms" for n in best)
        )
        print(f"  aten ops per step: {res['ops']}")
        print("  " + "  ".join(f"{r} {rm[r]:.2f} ({rb[r]:.2f})" for r in rm))
    print(
        f"\n{'(m, D, K)':>17} {'MDN ms':>15} {'compiled ms':>15} {'BN ms':>15} "
        f"{'floor ms':>15} {'MDN/BN':>7} {'MDN/floor':>9} {'floor/BN':>8} "
        f"{'comp/BN':>7} {'comp/floor':>10}"
    )
    for res in results:
        best, med, rm = res["best_ms"], res["median_ms"], res["ratio_median"]
        cells = []
        for n in ("mdn", "compiled", "bn", "floor"):
            cells.append(f"{best[n]:7.3f}/{med[n]:<7.3f}" if n in best else f"{'-':>15}")
        rat = [
            f"{rm.get(r, float('nan')):.2f}"
            for r in ("mdn/bn", "mdn/floor", "floor/bn", "compiled/bn", "compiled/floor")
        ]
        print(
            f"{tuple(res['shape'])!s:>17} " + " ".join(cells) + f" {rat[0]:>7} {rat[1]:>9} "
            f"{rat[2]:>8} {rat[3]:>7} {rat[4]:>10}"
        )
    print("(times: best/median ms per step)")
    if args.json:
        meta = {
            "torch": torch.__version__,
            "threads": args.threads,
            "dtype": "float32",
            "machine": platform.processor() or platform.machine(),
            "compile": "inductor, dynamic=False" if not args.no_compile else None,
        }
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
