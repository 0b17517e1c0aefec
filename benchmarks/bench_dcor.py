"""Speed and memory of metanorm's blocked dCor² against the ``dcor`` package.

Not a test. Every measurement runs in a fresh subprocess that reports its own peak resident
memory (``ru_maxrss``); "net" subtracts a baseline subprocess that imports the same libraries and
builds the same data but computes nothing. Sections:

  a  n = 4000, d = 64 features vs a 1-column y, both estimators, ours and dcor's (speed ratio)
  b  n = 50,000, d = 84 vs a 1-column y (completes; peak memory, time)
  c  n = 1k, 2k, 4k, 8k, 16k at d = 64: the time grows as n²·d
  d  the permutation test at n = 10,000, d = 84: a binary and a continuous 1-column y
  f  method="projection" at large n (default 10⁶, d = 512, 1-column y, dependent and
     independent): time, estimate and jackknife SE, beside the exact estimator on random
     subsamples sized to take about the same time (SD over 3 subsamples)
  e  exact dCor² against its floor, measured in the same process: torch.mm over the tiles the
     estimator computes plus one square root over them (n = 20k, 50k; d = 84, 512; 1 and 2
     threads; a 1-column y)

Usage::

    .venv/bin/python benchmarks/bench_dcor.py               # all sections (~10 min here)
    .venv/bin/python benchmarks/bench_dcor.py --sections a c --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def make_data(n: int, d: int, y_kind: str, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x[:, 0] + x[:, 1] ** 2 + rng.normal(size=n)
    if y_kind == "binary":
        y = (y > np.median(y)).astype(np.float64)
    return x, y


def worker(spec: dict) -> dict:
    """Runs one measurement in this process."""
    import numpy as np  # noqa: F401

    if spec["impl"] in ("ours", "baseline_ours", "test", "floor", "projection"):
        import torch

        torch.set_num_threads(spec["threads"])
        import metanorm.metrics as mm
    if spec["impl"] in ("dcor", "baseline_dcor"):
        import dcor
    x, y = make_data(spec["n"], spec["d"], spec.get("y", "continuous"))
    value: float | None = None
    pvalue: float | None = None
    t0 = time.perf_counter()
    if spec["impl"] == "ours":
        times = []  # best of `repeat` runs (the machine is shared; dcor itself runs once)
        for _ in range(spec.get("repeat", 1)):
            t0 = time.perf_counter()
            value = mm.distance_correlation_sqr(x, y, unbiased=spec["unbiased"])
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter() - min(times)
    elif spec["impl"] == "dcor":
        f = dcor.u_distance_correlation_sqr if spec["unbiased"] else dcor.distance_correlation_sqr
        value = float(f(x, y))
    elif spec["impl"] == "projection":
        return projection_worker(spec)
    elif spec["impl"] == "floor":
        return floor_worker(spec, x, y)
    elif spec["impl"] == "test":
        res = mm.distance_correlation_test(
            x, y, num_permutations=spec["permutations"], random_state=0, unbiased=True
        )
        value, pvalue = res.statistic, res.pvalue
    elapsed = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"time": elapsed, "value": value, "pvalue": pvalue, "peak_mib": peak_kib / 1024}


def floor_worker(spec: dict, x, y) -> dict:
    """Times the estimator and its floor alternately in this process (best of ``repeat``)."""
    import torch

    import metanorm.metrics as mm
    from metanorm.metrics._exact import square_tiles
    from metanorm.metrics.dcor import square_block

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    n = xt.shape[0]
    block = square_block(n, None, mm.DEFAULT_MAX_MEMORY)
    tiles = square_tiles(n, block)
    xa = xt.abs()  # non-negative products, so the square root takes the ordinary path

    def floor() -> None:
        for r, c in tiles:
            torch.mm(xa[r], xa[c].T).sqrt_()

    floors, ours, value = [], [], 0.0
    for _ in range(spec.get("repeat", 2)):
        t0 = time.perf_counter()
        floor()
        floors.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        value = mm.distance_correlation_sqr(xt, yt, unbiased=True)
        ours.append(time.perf_counter() - t0)
    return {
        "time": min(ours),
        "floor": min(floors),
        "value": value,
        "block": block,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def projection_worker(spec: dict) -> dict:
    """Projection estimate at large n beside exact ones on subsamples of about the same time."""
    import numpy as np
    import torch

    import metanorm.metrics as mm
    from metanorm.metrics._projection import projection_terms

    n, d = spec["n"], spec["d"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    y = noise if spec["y"] == "independent" else x[:, 0] + x[:, 1] ** 2 + noise
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    # what method="projection" runs (the control variates on), keeping the terms so that the
    # plain average of the same projections can be reported beside it
    terms, _ = projection_terms(x, y[:, None], unbiased=True, num_projections=spec["k"], seed=0)
    value, se = terms.result()
    t_proj, c_proj = time.perf_counter() - t0, time.process_time() - c0
    plain, plain_se = terms.jackknife()
    # exact on a subsample: its time grows as m², so pick m from a timed pilot
    m0 = 4000
    t0 = time.perf_counter()
    mm.distance_correlation_sqr(x[:m0], y[:m0], unbiased=True)
    t_pilot = time.perf_counter() - t0
    m = int(min(n, m0 * (t_proj / t_pilot) ** 0.5))
    rng = np.random.default_rng(1)
    values, times = [], []
    for _ in range(3):
        rows = torch.from_numpy(rng.choice(n, size=m, replace=False))
        t0 = time.perf_counter()
        values.append(float(mm.distance_correlation_sqr(x[rows], y[rows], unbiased=True)))
        times.append(time.perf_counter() - t0)
    return {
        "time": t_proj,
        "cpu": c_proj,
        "load": [load, os.getloadavg()[0]],
        "value": value,
        "se": se,
        "plain": plain,
        "plain_se": plain_se,
        "m": m,
        "sub_time": float(np.mean(times)),
        "sub_mean": float(np.mean(values)),
        "sub_sd": float(np.std(values, ddof=1)),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def section_f(n: int, d: int, k: int, threads: int) -> None:
    print(f"\n(f) projection, n = {n}, d = {d}, 1-column y, {k} projections, threads = {threads}")
    for kind in ("dependent", "independent"):
        spec = {"impl": "projection", "n": n, "d": d, "k": k, "y": kind, "threads": threads}
        r = measure(spec)
        if "error" in r:
            print(f"  {kind}: failed: {r['error']}")
            continue
        print(
            f"  {kind:11s} projection {r['time']:6.1f} s ({r['cpu']:.0f} s CPU; load "
            f"{r['load'][0]:.1f} -> {r['load'][1]:.1f}): {r['value']:.5f} ± {r['se']:.1e} (SE; "
            f"plain average {r['plain']:.5f} ± {r['plain_se']:.1e})"
            f" | exact on {r['m']} random rows, {r['sub_time']:5.1f} s each: mean "
            f"{r['sub_mean']:.5f}, SD {r['sub_sd']:.1e} over 3 subsamples | peak "
            f"{r['peak_mib']:.0f} MiB",
            flush=True,
        )


def measure(spec: dict) -> dict:
    """Runs ``worker(spec)`` in a fresh interpreter and returns its report."""
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt_mem(r: dict, base: dict) -> str:
    return f"peak {r['peak_mib']:7.0f} MiB raw, {r['peak_mib'] - base['peak_mib']:7.0f} MiB net"


def section_a(thread_counts: list[int]) -> None:
    n, d = 4000, 64
    print(f"\n(a) n = {n}, d = {d} vs a 1-column y; metanorm with torch threads = {thread_counts}")
    base_o = measure({"impl": "baseline_ours", "n": n, "d": d, "threads": thread_counts[0]})
    base_d = measure({"impl": "baseline_dcor", "n": n, "d": d, "threads": 1})
    print(
        f"  baseline (imports + data): metanorm {base_o['peak_mib']:.0f} MiB, "
        f"dcor {base_d['peak_mib']:.0f} MiB"
    )
    for unbiased in (False, True):
        name = "unbiased" if unbiased else "biased"
        spec = {"n": n, "d": d, "unbiased": unbiased}
        ref = measure({**spec, "impl": "dcor", "threads": 1})
        if "error" in ref:
            print(f"  {name:8s} dcor          failed: {ref['error']}")
        else:
            print(f"  {name:8s} dcor          {ref['time']:7.2f} s  {fmt_mem(ref, base_d)}")
        for threads in thread_counts:
            ours = measure({**spec, "impl": "ours", "threads": threads, "repeat": 3})
            line = (
                f"  {name:8s} metanorm ({threads}t) {ours['time']:7.2f} s  {fmt_mem(ours, base_o)}"
            )
            if "error" not in ref:
                rel = abs(ours["value"] - ref["value"]) / abs(ref["value"])
                ratio = ref["time"] / ours["time"]
                bar = "meets" if ratio >= 20 and ours["peak_mib"] <= 1024 else "MISSES"
                line += f"  speed-up {ratio:6.1f}x ({bar} >=20x, <=1 GB), rel. diff {rel:.1e}"
            print(line)


def section_b(threads: int) -> None:
    n, d = 50_000, 84
    print(f"\n(b) n = {n}, d = {d} vs a 1-column y (unbiased), torch threads = {threads}")
    base = measure({"impl": "baseline_ours", "n": n, "d": d, "threads": threads})
    r = measure({"impl": "ours", "n": n, "d": d, "unbiased": True, "threads": threads})
    if "error" in r:
        print(f"  failed: {r['error']}")
        return
    print(f"  {r['time']:.1f} s, dcor2 = {r['value']:.6g}, {fmt_mem(r, base)}")


def section_c(threads: int) -> None:
    d = 64
    print(f"\n(c) scaling at d = {d} (unbiased), torch threads = {threads}")
    print(f"  {'n':>6s} {'time (s)':>9s} {'ns per pair·dim':>16s} {'peak MiB':>9s}  (best of 2)")
    for n in (1000, 2000, 4000, 8000, 16000):
        r = measure(
            {"impl": "ours", "n": n, "d": d, "unbiased": True, "threads": threads, "repeat": 2}
        )
        per = r["time"] / (n * n / 2 * d) * 1e9
        print(f"  {n:6d} {r['time']:9.2f} {per:16.3f} {r['peak_mib']:9.0f}")


def section_d(threads: int, binary_perms: int, continuous_perms: int) -> None:
    n, d = 10_000, 84
    print(f"\n(d) permutation test, n = {n}, d = {d} (unbiased), torch threads = {threads}")
    plain = measure({"impl": "ours", "n": n, "d": d, "unbiased": True, "threads": threads})
    print(f"  dcor2 alone: {plain['time']:.1f} s")
    for y, perms in (("binary", binary_perms), ("continuous", continuous_perms)):
        if perms <= 0:
            continue
        r = measure(
            {"impl": "test", "n": n, "d": d, "y": y, "permutations": perms, "threads": threads}
        )
        if "error" in r:
            print(f"  {y}: failed: {r['error']}")
            continue
        per = (r["time"] - plain["time"]) / perms
        print(
            f"  {y:10s} y, {perms:4d} permutations: {r['time']:6.1f} s "
            f"(~{per:.2f} s per permutation), p = {r['pvalue']:.3g}, "
            f"peak {r['peak_mib']:.0f} MiB"
        )


def section_e(sizes: list[tuple[int, int]], thread_counts: list[int]) -> None:
    print("\n(e) exact dCor² (unbiased) against its floor, same process, best of 2 each")
    print(f"  {'n':>6s} {'d':>4s} {'threads':>7s} {'ours (s)':>9s} {'floor (s)':>9s} {'ratio':>6s}")
    for n, d in sizes:
        for threads in thread_counts:
            r = measure({"impl": "floor", "n": n, "d": d, "threads": threads, "repeat": 2})
            if "error" in r:
                print(f"  {n:6d} {d:4d} {threads:7d} failed: {r['error']}")
                continue
            ratio = r["time"] / r["floor"]
            bar = "meets" if ratio <= 2 else "MISSES"
            print(
                f"  {n:6d} {d:4d} {threads:7d} {r['time']:9.2f} {r['floor']:9.2f} {ratio:6.2f}"
                f"  ({bar} <= 2x; tile side {r['block']})",
                flush=True,
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument(
        "--sections", nargs="+", default=["a", "b", "c", "d", "e", "f"], choices="abcdef"
    )
    p.add_argument("--projection-n", type=int, default=1_000_000)
    p.add_argument("--projection-d", type=int, default=512)
    p.add_argument("--projections", type=int, default=48)
    p.add_argument(
        "--floor-sizes",
        nargs="+",
        default=["20000x84", "20000x512", "50000x84", "50000x512"],
        help="n x d pairs of section e",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--binary-permutations", type=int, default=199)
    p.add_argument("--continuous-permutations", type=int, default=49)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    import torch

    threads = args.threads or torch.get_num_threads()
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    if "a" in args.sections:
        section_a(sorted({1, threads}) if args.threads is None else [threads])
    if "b" in args.sections:
        section_b(threads)
    if "c" in args.sections:
        section_c(threads)
    if "d" in args.sections:
        section_d(threads, args.binary_permutations, args.continuous_permutations)
    if "f" in args.sections:
        section_f(args.projection_n, args.projection_d, args.projections, threads)
    if "e" in args.sections:
        sizes = [tuple(int(v) for v in s.split("x")) for s in args.floor_sizes]
        section_e(sizes, sorted({1, threads}) if args.threads is None else [threads])


if __name__ == "__main__":
    main()
