"""One short check of metanorm on a CUDA device (under 3 minutes on one GPU).

Checks, each against float64 results computed on the CPU:

1. the layer in training (output, input gradient, running β) and evaluation, float32 on CUDA;
2. the layer's training forward makes no host sync (``torch.cuda.set_sync_debug_mode("error")``);
3. ``torch.compile(fullgraph=True)`` (inductor) in training and evaluation, against eager;
4. training and evaluation under ``torch.autocast("cuda")`` with float16 and bfloat16;
5. a CUDA graph capture of a training step of the layer;
6. dcor² (biased and bias-corrected) on CUDA against the CPU.

Run: ``python benchmarks/check_cuda.py`` (``--device cpu`` runs the same checks on the CPU, without
the sync and graph checks, to try the script where there is no GPU). Prints one PASS/FAIL line per
check and exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch

from metanorm import metrics
from metanorm.nn import MetadataNorm, MetadataSequential

RESULTS: list[tuple[str, bool, str]] = []
CHECKS: list[Callable[[], str]] = []


def check(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
    """Registers ``fn`` as a check that prints PASS (its return value) or FAIL (its exception)."""

    def wrap(fn: Callable[[], str]) -> Callable[[], str]:
        def run() -> str:
            start = time.perf_counter()
            try:
                detail = fn()
                ok = True
            except Exception as exc:  # report and go on with the other checks
                detail, ok = f"{type(exc).__name__}: {exc}"[:400], False
            RESULTS.append((name, ok, f"{detail} ({time.perf_counter() - start:.1f} s)"))
            print(f"{'PASS' if ok else 'FAIL'}  {name}: {RESULTS[-1][2]}", flush=True)
            return detail

        CHECKS.append(run)
        return run

    return wrap


def problem(n: int = 512, d: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n, 1), generator=g).double()
    cf = torch.rand(n, 1, generator=g, dtype=torch.float64) * 3 + 2 * y
    site = torch.randint(0, 3, (n,), generator=g)
    design = torch.cat(
        [y, cf, (site == 1).double()[:, None], (site == 2).double()[:, None], torch.ones(n, 1)], 1
    )
    feats = torch.randn(n, d, generator=g, dtype=torch.float64) + design @ torch.randn(
        5, d, generator=g, dtype=torch.float64
    )
    return design, feats


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="default: cuda")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu to try the script", file=sys.stderr)
        return 2
    cuda = dev.type == "cuda"
    print(f"torch {torch.__version__}, device {dev}", end="")
    print(f" ({torch.cuda.get_device_name(dev)})" if cuda else "")
    design, feats = problem()
    batch = 128

    @check("train/eval float32 vs float64 CPU")
    def _train_eval() -> str:
        ref = MetadataNorm(feats.shape[1], design, keep=[0], dtype=torch.float64)
        gpu = MetadataNorm(feats.shape[1], design, keep=[0]).to(dev)
        worst = 0.0
        for i in range(0, len(feats), batch):
            f64 = feats[i : i + batch].clone().requires_grad_()
            f32 = feats[i : i + batch].float().to(dev).requires_grad_()
            g = torch.randn_like(f64)
            o64, o32 = (
                ref(f64, design[i : i + batch]),
                gpu(f32, design[i : i + batch].float().to(dev)),
            )
            o64.backward(g)
            o32.backward(g.float().to(dev))
            worst = max(worst, rel(o32, o64), rel(f32.grad, f64.grad))
        worst = max(worst, rel(gpu.running_beta, ref.running_beta))
        ref.eval()
        gpu.eval()
        worst = max(
            worst, rel(gpu(feats.float().to(dev), design.float().to(dev)), ref(feats, design))
        )
        assert worst < 1e-5, f"max relative error {worst:.2e} >= 1e-5"
        return f"max relative error {worst:.2e}"

    @check("no host sync in the training forward")
    def _no_sync() -> str:
        if not cuda:
            return "skipped on CPU"
        layer = MetadataNorm(feats.shape[1], design, keep=[0]).to(dev)
        f, x = feats[:batch].float().to(dev), design[:batch].float().to(dev)
        layer(f, x)  # warm-up (allocations, lazy inits)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(f, x)
            layer.eval()
            layer(f, x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return "training and evaluation forward ran with sync debug mode 'error'"

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        d = feats.shape[1]
        return MetadataSequential(
            torch.nn.Linear(d, 64),
            MetadataNorm(64, design, keep=[0]),
            torch.nn.ReLU(),
            torch.nn.Linear(64, 8),
            MetadataNorm(8, design, keep=[0], momentum=None),
        ).to(dev)

    @check("torch.compile(fullgraph=True) vs eager, train and eval")
    def _compile() -> str:
        eager, comp = model(), model()
        compiled = torch.compile(comp, fullgraph=True)
        f, x = feats.float().to(dev), design.float().to(dev)
        worst = 0.0
        for i in range(0, len(f), 100):  # 512 = 5 × 100 + 12: a short last batch
            oe, oc = eager(f[i : i + 100], x[i : i + 100]), compiled(f[i : i + 100], x[i : i + 100])
            g = torch.randn_like(oe)
            oe.backward(g)
            oc.backward(g)
            worst = max(worst, rel(oc, oe), rel(comp[0].weight.grad, eager[0].weight.grad))
        eager.eval()
        comp.eval()
        worst = max(worst, rel(compiled(f, x), eager(f, x)))
        assert worst < 1e-5, f"max relative difference {worst:.2e} >= 1e-5"
        return f"max relative difference {worst:.2e}"

    for amp in (torch.float16, torch.bfloat16):

        @check(f"autocast {str(amp).split('.')[-1]} train and eval")
        def _autocast(amp: torch.dtype = amp) -> str:
            net = model()
            f, x = feats.float().to(dev), design.float().to(dev)
            for i in range(0, len(f), batch):
                with torch.autocast(dev.type, dtype=amp):
                    out = net(f[i : i + batch], x[i : i + batch])
                assert out.dtype == amp, f"output dtype {out.dtype}, expected {amp}"
                out.float().square().mean().backward()
            assert all(bool(torch.isfinite(p.grad).all()) for p in net.parameters())
            mdn = net[1]
            assert int(mdn.num_batches_skipped) == 0 and int(mdn.num_batches_tracked) == 4
            net.eval()
            with torch.autocast(dev.type, dtype=amp):
                hidden = net[0](f)
                out = mdn(hidden, x)
            want = hidden.double().cpu() - design[:, 1:] @ mdn.running_beta[1:].double().cpu()
            err = rel(out, want)
            assert err < (1e-2 if amp == torch.bfloat16 else 2e-3), f"relative error {err:.2e}"
            return f"eval relative error {err:.2e} against float64"

    @check("CUDA graph capture of a training step")
    def _graph() -> str:
        if not cuda:
            return "skipped on CPU"
        layer = MetadataNorm(feats.shape[1], design, keep=[0]).to(dev)
        f = feats[:batch].float().to(dev).requires_grad_()
        x = design[:batch].float().to(dev)
        g = torch.randn_like(f)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                layer(f, x).backward(g)
        torch.cuda.current_stream().wait_stream(stream)
        layer.reset_running_stats()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer(f, x)
            out.backward(g)
        f.grad = None
        layer.reset_running_stats()
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        assert int(layer.num_batches_tracked) == 3, "replays must update the running β"
        beta = (
            (len(design) / batch)
            * torch.linalg.inv(design.T @ design)
            @ (design[:batch].T @ feats[:batch])
        )
        want = feats[:batch] - design[:batch, 1:] @ beta[1:]
        err = rel(out, want)
        assert err < 1e-5, f"relative error {err:.2e}"
        return f"3 replays, output relative error {err:.2e}"

    @check("dcor² on the device vs CPU")
    def _dcor() -> str:
        g = torch.Generator().manual_seed(1)
        a = torch.randn(3000, 16, generator=g, dtype=torch.float64)
        b = a[:, :2] ** 2 + torch.randn(3000, 2, generator=g, dtype=torch.float64)
        worst = 0.0
        for unbiased in (False, True):
            cpu = torch.as_tensor(metrics.distance_correlation_sqr(a, b, unbiased=unbiased))
            dv = torch.as_tensor(
                metrics.distance_correlation_sqr(
                    a.float().to(dev), b.float().to(dev), unbiased=unbiased
                )
            )
            worst = max(worst, abs(float(dv) - float(cpu)))
        assert worst < 1e-5, f"max absolute difference {worst:.2e}"
        return f"max absolute difference {worst:.2e}"

    for run in CHECKS:
        run()
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"{len(RESULTS) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
