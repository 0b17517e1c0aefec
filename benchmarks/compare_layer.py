"""This checkout's MetadataNorm against another checkout's (an earlier commit), side by side in
one run.

Usage::

    python benchmarks/compare_layer.py --baseline-src /tmp/mdn_old/src [--threads 2]
                                       [--rounds 21] [--target 0.05] [--json PATH]

Two worker processes, one per checkout (``PYTHONPATH`` = this checkout's ``src`` or
``--baseline-src``), build the same layer ``MetadataNorm(D, design, keep=[0])`` on the same
tensors (``bench_layer.make_inputs``: fixed seed, same torch) and time the same float32
training step, ``x.grad = None; layer(x, rows).backward(g)`` with a fixed random upstream
gradient g, eager. The coordinator asks them in turn, so only one process runs at a time; the
order of the variants rotates each round. Variants:

  new           this checkout's layer
  old           the baseline's layer as it is (a baseline without ``metanorm.glm``)
  old-kernel    the baseline's layer on its compiled CPU kernel (only if the baseline's
                ``metanorm.glm.has_cpu_kernel()`` is True)
  old-fallback  the baseline's layer on its PyTorch fallback (``glm.set_cpu_kernel(False)``)

Before timing, the workers' outputs and input gradients are compared (weighted float64 sums),
so the variants are known to compute the same thing. Reported per shape: best and median times
and, for each variant against ``old-kernel`` (else ``old-fallback``, else ``old``), the median
of the per-round ratios and the ratio of the best times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_SRC = HERE.parent / "src"


# --------------------------------------------------------------------------------------------
# worker
# --------------------------------------------------------------------------------------------


def _worker_setup(req: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Builds the layer and tensors of one shape; returns the timed steps and the checks."""
    import bench_layer
    import torch

    import metanorm
    from metanorm import nn as mnn

    torch.set_num_threads(req["threads"])
    m, d, k = req["shape"]
    t = bench_layer.make_inputs(m, d, k)
    x, rows, g = t["x"].requires_grad_(), t["rows"], t["g"]
    layer = mnn.MetadataNorm(d, t["design"], keep=[0])

    try:
        from metanorm import glm  # the kernel-era layout
    except ImportError:
        glm = None
    if req["role"] == "new" or glm is None:

        def prepare(flag: bool) -> None:
            pass

        flags = {req["role"]: True}
    else:

        def prepare(kernel: bool) -> None:
            glm.set_cpu_kernel(kernel)

        # has_cpu_kernel() tells whether the kernel is built and enabled: enable it first (an
        # earlier shape's fallback step left it off)
        built = getattr(glm, "_C", None) is not None
        if built:
            glm.set_cpu_kernel(True)
        flags = {"old-kernel": True} if built and glm.has_cpu_kernel() else {}
        flags["old-fallback"] = False

    def make(flag: bool):
        def step() -> None:
            prepare(flag)  # a module attribute or a global flag: a few ns
            x.grad = None
            layer(x, rows).backward(g)

        return step

    steps = {name: make(flag) for name, flag in flags.items()}
    weights = torch.randn(m, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    checks = {}
    for name, flag in flags.items():
        prepare(flag)
        x.grad = None
        out = layer(x, rows)
        out.backward(g)
        checks[name] = [
            float((out.detach().double() * weights).sum()),
            float((x.grad.double() * weights).sum()),
            float(out.detach().double().abs().sum()),
        ]
    for fn in steps.values():  # warm-up
        bench_layer.time_calls(fn, 3)
    return steps, {"variants": list(steps), "checks": checks, "file": metanorm.__file__}


def _worker() -> None:
    import bench_layer

    steps: dict[str, Any] = {}
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        if req["op"] == "setup":
            steps, reply = _worker_setup(req)
        elif req["op"] == "time":
            fn, repeats = steps[req["variant"]], req["repeats"]
            fn()  # untimed: the caches and thread pool warm up after the other process ran
            if req.get("clock") == "cpu":  # this process's CPU time: not its waits for a core
                start = time.process_time()
                for _ in range(repeats):
                    fn()
                reply = {"t": (time.process_time() - start) / repeats}
            else:
                reply = {"t": bench_layer.time_calls(fn, repeats)}
        else:
            reply = {"error": f"unknown op {req['op']!r}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


# --------------------------------------------------------------------------------------------
# coordinator
# --------------------------------------------------------------------------------------------


class Worker:
    """A worker process on one checkout's ``src``."""

    def __init__(self, src: Path, role: str) -> None:
        env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{HERE}")
        self.role = role
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def ask(self, **req: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.role} worker died (see its stderr above)")
        return json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, BrokenPipeError, json.JSONDecodeError):
            self.ask(op="quit")
        self.proc.wait(timeout=30)


def compare_shape(
    workers: list[Worker], shape: tuple[int, int, int], args: argparse.Namespace
) -> dict[str, Any]:
    import statistics

    owner: dict[str, Worker] = {}
    checks: dict[str, list[float]] = {}
    files = {}
    for w in workers:
        rep = w.ask(op="setup", shape=list(shape), threads=args.threads, role=w.role)
        files[w.role] = rep["file"]
        for v in rep["variants"]:
            owner[v] = w
        checks.update(rep["checks"])
    names = list(owner)
    ref = checks[names[0]]
    check_diff = {
        v: max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(c, ref, strict=True))
        for v, c in checks.items()
    }
    slowest = max(
        min(owner[v].ask(op="time", variant=v, repeats=2)["t"] for _ in range(2)) for v in names
    )
    repeats = max(2, min(500, round(args.target / max(slowest, 1e-7))))
    times: dict[str, list[float]] = {v: [] for v in names}
    for r in range(args.rounds):
        for v in names[r % len(names) :] + names[: r % len(names)]:
            times[v].append(
                owner[v].ask(op="time", variant=v, repeats=repeats, clock=args.clock)["t"]
            )
    base = next(v for v in ("old-kernel", "old-fallback", "old") if v in times)
    ratio_median, ratio_best = {}, {}
    for v in names:
        if v == base:
            continue
        ratio_median[v] = statistics.median(
            a / b for a, b in zip(times[v], times[base], strict=True)
        )
        ratio_best[v] = min(times[v]) / min(times[base])
    return {
        "shape": list(shape),
        "repeats": repeats,
        "rounds": args.rounds,
        "baseline": base,
        "best_ms": {v: min(t) * 1e3 for v, t in times.items()},
        "median_ms": {v: statistics.median(t) * 1e3 for v, t in times.items()},
        "ratio_median": ratio_median,
        "ratio_best": ratio_best,
        "check_rel_diff": check_diff,
        "files": files,
        "times_ms": {v: [x * 1e3 for x in t] for v, t in times.items()},
    }


def main() -> None:
    if "--worker" in sys.argv:
        _worker()
        return
    sys.path.insert(0, str(HERE))
    import bench_layer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--baseline-src", required=True, help="the other checkout's src folder")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--rounds", type=int, default=21, help="interleaved rounds (default 21)")
    p.add_argument("--target", type=float, default=0.05, help="seconds per timing (0.05)")
    p.add_argument("--shapes", default=None, help="e.g. '200,18432,3;64,25088,5'")
    p.add_argument("--json", default=None, help="write the figures to this path")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time (default); cpu: the worker's CPU time (time.process_time), "
        "which leaves out the time it waits for a core on a shared machine (use --threads 1)",
    )
    args = p.parse_args()
    shapes = bench_layer.SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    workers = [Worker(REPO_SRC, "new"), Worker(Path(args.baseline_src).resolve(), "old")]
    results = []
    start = time.perf_counter()
    try:
        for shape in shapes:
            res = compare_shape(workers, shape, args)
            results.append(res)
            print(
                f"\n(m, D, K) = {tuple(shape)}: {res['repeats']} calls per timing, "
                f"{res['rounds']} rounds; output/grad check, max rel. diff: "
                + ", ".join(f"{v} {d:.1e}" for v, d in res["check_rel_diff"].items())
            )
            for v in res["best_ms"]:
                best, med = res["best_ms"][v], res["median_ms"][v]
                line = f"  {v:13s} best {best:8.3f} ms  median {med:8.3f} ms"
                if v in res["ratio_median"]:
                    line += (
                        f"  /{res['baseline']}: median of rounds {res['ratio_median'][v]:.2f}"
                        f", best {res['ratio_best'][v]:.2f}"
                    )
                print(line, flush=True)
    finally:
        for w in workers:
            w.close()
    print(
        f"\nsources: {results[0]['files'] if results else {}}; {time.perf_counter() - start:.0f} s"
    )
    variants = [v for v in results[0]["ratio_median"]] if results else []
    print(
        f"\n{'(m, D, K)':>17} "
        + " ".join(f"{v + '/' + results[0]['baseline']:>32}" for v in variants)
    )
    for res in results:
        cells = [
            f"{res['ratio_median'][v]:.2f} (best {res['ratio_best'][v]:.2f})"
            if v in res["ratio_median"]
            else "-"
            for v in variants
        ]
        print(f"{tuple(res['shape'])!s:>17} " + " ".join(f"{c:>32}" for c in cells))
    if args.json:
        meta = {
            "threads": args.threads,
            "baseline_src": str(args.baseline_src),
            "rounds": args.rounds,
            "target_s": args.target,
        }
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
