"""Step time of 2-process DDP training of the synthetic CNN: SyncMetadataNorm vs the others.

Usage::

    python benchmarks/bench_ddp.py [--world-size 2] [--batch 100] [--rounds 5] [--steps 4]
                                   [--threads 1] [--image-size 32] [--json PATH]

Each of ``--world-size`` processes (gloo, CPU, ``--threads`` intra-op threads each) builds the
paper's CNN (``metanorm_repro.models.PaperCNN``: conv 1→16 5×5, conv 16→32 5×5, fc 84, fc 1) with
the norm slots of each variant, wraps it in ``DistributedDataParallel`` and times full training
steps (forward, BCE loss, backward with DDP's gradient all-reduce, Adam step) on ``--batch``
images per process of the synthetic experiment's shape (1×32×32; random values and a random
design [y, cf, 1] with the label column kept, N = 2000: step time does not depend on the
values). Variants:

  sync-mdn   MDN-Conv (MDN after conv1, conv2 and fc1) converted with
             ``SyncMetadataNorm.convert_sync_metadata_norm``: β̂ of the union batch
  mdn        the same MDN-Conv model, plain ``MetadataNorm`` (each process estimates β̂ from its
             own batch)
  batchnorm  BatchNorm in the same slots, each process on its own batch
  sync-bn    the same, converted with ``nn.SyncBatchNorm.convert_sync_batchnorm`` (skipped:
             DDP refuses SyncBatchNorm on CPU modules, "SyncBatchNorm layers only work with GPU
             modules"; kept for a CUDA/NCCL port of this script)

The variants are timed in turn, round after round (the order rotates each round), so each
round's ratios compare timings seconds apart on a noisy machine. A timing is the mean of
``--steps`` steps after one untimed warm-up step per round, the maximum over the processes (a
step ends when the slowest process ends it). Reported: the median over rounds of each variant's
step time and of its ratio to ``mdn``. The bytes that the MDN layers all-reduce per step are
counted by wrapping the collective (and checked against K·(2D) + 1 values per layer); the bytes
of DDP's gradient all-reduce are the parameters' (same for every variant).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from metanorm.nn import MetadataNorm, SyncMetadataNorm
from metanorm.nn import sync as sync_module
from metanorm_repro.models.cnn import PaperCNN

VARIANTS = ("sync-mdn", "mdn", "batchnorm", "sync-bn")
# no buffer broadcast in the forward pass (the synced running β agrees without one); newer torch
# renames broadcast_buffers to forward_sync_buffers
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    else {"broadcast_buffers": False}
)
K = 3


def _design(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n, 1), generator=g).float()
    return torch.cat([y, torch.rand(n, 1, generator=g) * 3 + 1 + 2 * y, torch.ones(n, 1)], 1)


def _model(variant: str, design: torch.Tensor, image_size: int) -> nn.Module:
    torch.manual_seed(0)
    if variant in ("sync-mdn", "mdn", "mdn-torch"):
        model: nn.Module = PaperCNN("mdn-conv", design, image_size=image_size, keep=[0])
        if variant == "sync-mdn":
            model = SyncMetadataNorm.convert_sync_metadata_norm(model)
    else:
        model = PaperCNN("batchnorm", image_size=image_size)
        if variant == "sync-bn":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


class _Counter:
    """Counts the bytes that the MDN layers all-reduce (wraps ``sync._all_reduce_sum``)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0
        self._inner = sync_module._all_reduce_sum

    def __call__(self, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        self.bytes += tensor.numel() * tensor.element_size()
        self.calls += 1
        return self._inner(tensor, group)


def _worker(rank: int, world: int, args: argparse.Namespace, rdv: str, out: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    design = _design(2000)
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(args.batch, 1, args.image_size, args.image_size, generator=g)
    rows = design[torch.randint(0, len(design), (args.batch,), generator=g)]
    y = rows[:, 0].clone()
    counter = _Counter()
    sync_module._all_reduce_sum = counter  # type: ignore[assignment]

    runs: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for variant in VARIANTS:
        model = _model(variant, design, args.image_size)
        try:
            ddp = DDP(model, **_NO_BUFFER_SYNC)
        except (RuntimeError, ValueError) as exc:  # "SyncBatchNorm layers only work with GPU"
            skipped[variant] = str(exc).splitlines()[0][:200]
            continue
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-4)
        runs[variant] = (model, ddp, opt)

    def step(variant: str) -> None:
        _, ddp, opt = runs[variant]
        logits, _ = ddp(x, rows)
        loss = nn.functional.binary_cross_entropy_with_logits(logits.squeeze(1), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for variant in runs:
        step(variant)
    dist.barrier()

    # bytes all-reduced by the MDN layers in one step, per layer
    counter.bytes = counter.calls = 0
    step("sync-mdn")
    per_step = {"bytes": counter.bytes, "calls": counter.calls}
    mdn_layers = [
        (name, m.num_features)
        for name, m in runs["sync-mdn"][0].named_modules()
        if isinstance(m, MetadataNorm)
    ]
    params = sum(p.numel() * p.element_size() for p in runs["mdn"][0].parameters())

    times: dict[str, list[float]] = {v: [] for v in runs}
    order = list(runs)
    for r in range(args.rounds):
        for variant in order[r % len(order) :] + order[: r % len(order)]:
            step(variant)  # warm-up
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                step(variant)
            elapsed = torch.tensor([(time.perf_counter() - start) / args.steps])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[variant].append(float(elapsed))
    if rank == 0:
        torch.save(
            {
                "times": times,
                "skipped": skipped,
                "mdn_bytes_per_step": per_step,
                "mdn_layers": mdn_layers,
                "param_bytes": params,
            },
            out,
        )
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--batch", type=int, default=100, help="images per process and step")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.pt")
        mp.spawn(
            _worker,
            args=(args.world_size, args, os.path.join(tmp, "rdv"), out),
            nprocs=args.world_size,
        )
        res = torch.load(out, weights_only=False)

    times = res["times"]
    base = times["mdn"]
    print(
        f"DDP, gloo, CPU: {args.world_size} processes × {args.threads} thread(s), "
        f"{args.batch} images/process of 1×{args.image_size}×{args.image_size}, "
        f"{args.rounds} rounds × {args.steps} steps; torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"{'variant':<10} {'step ms (median)':>17} {'best':>8} {'÷ mdn (median)':>15}")
    summary: dict[str, Any] = {}
    for variant, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base, strict=True))
        summary[variant] = {"median_ms": 1e3 * statistics.median(ts), "ratio_to_mdn": ratio}
        print(
            f"{variant:<10} {1e3 * statistics.median(ts):>17.1f} {1e3 * min(ts):>8.1f} "
            f"{ratio:>15.3f}"
        )
    for variant, why in res["skipped"].items():
        print(f"{variant:<10} skipped: {why}")
    per = res["mdn_bytes_per_step"]
    print(
        f"\nSyncMetadataNorm all-reduces per step: {per['bytes']} bytes in {per['calls']} "
        f"collectives (float32); per layer (K = {K}: K·D + 1 forward, K·D backward):"
    )
    expected = 0
    for name, d in res["mdn_layers"]:
        layer_bytes = 4 * (2 * K * d + 1)
        expected += layer_bytes
        print(f"  {name:<6} D = {d:>6}: {layer_bytes:>8} bytes ({layer_bytes / 1024:.1f} KiB)")
    print(f"DDP's gradient all-reduce per step (every variant): {res['param_bytes']} bytes")
    if expected != per["bytes"]:
        print(f"warning: counted {per['bytes']} bytes, expected {expected}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "summary": summary, **res}, fh, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
