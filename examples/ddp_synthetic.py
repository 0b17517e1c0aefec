"""Data-parallel training of the paper's synthetic task (MDN-Conv) with torchrun.

Launch one process per device (here: two CPU processes)::

    torchrun --standalone --nproc-per-node 2 examples/ddp_synthetic.py --out runs/ddp

or run it as a plain script for one process (the same training on the whole batch)::

    python examples/ddp_synthetic.py --out runs/one

What it shows, in order:

1. the same data and design on every process (the synthetic generator of
   :mod:`metanorm_repro.datasets.synthetic`, design ``[y, cf, 1]`` with ``y`` kept);
2. ``PaperCNN`` with the method ``"mdn-conv"`` from the norms registry (MDN after conv1, conv2
   and fc1), built from the WHOLE training design on every process;
3. ``SyncMetadataNorm.convert_sync_metadata_norm`` (and, on GPUs, ``SyncBatchNorm`` for a
   ``--norm batchnorm`` run; torch's SyncBatchNorm does not run on the CPU) before
   ``DistributedDataParallel``: every MDN layer estimates β from the union of the processes'
   batches, as one process would from the whole batch;
4. a ``DistributedSampler`` (``set_epoch`` every epoch) splitting each global batch of
   ``--batch-size`` rows between the processes;
5. evaluation on every process over its shard of the test set, through the unwrapped model
   (no DDP collectives), with the synced metrics of :mod:`metanorm.metrics` (their ``compute()``
   is a collective returning the value over all shards);
6. a run folder written by rank 0 only, each file atomically (a temporary file, then
   ``os.replace``): ``config.json``, ``metrics.json``, ``model.pt`` (the state dict of the model
   with plain ``MetadataNorm`` layers, loadable without torch.distributed).

``--batch-size`` is the GLOBAL batch: with W processes each takes ``batch-size / W`` rows a step,
and the run matches a one-process run with the same ``--batch-size`` up to rounding (same
sampler order, same β, DDP's gradient average equals the whole-batch mean loss's gradient).
Choose a training set size that divides by W: otherwise ``DistributedSampler`` repeats a few
samples to even out the shards.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from metanorm.design import DesignBuilder
from metanorm.metrics import BalancedAccuracy, GroupAccuracy, GroupedDistanceCorrelationSqr
from metanorm.nn import SyncMetadataNorm, revert_sync_metadata_norm
from metanorm_repro.datasets.synthetic import make_synthetic_splits
from metanorm_repro.models import create_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run folder (rank 0 creates it)")
    p.add_argument("--norm", default="mdn-conv", help="normalization method (norms registry)")
    p.add_argument("--n-per-class", type=int, default=500, help="training images per label")
    p.add_argument("--n-eval-per-class", type=int, default=250, help="test images per label")
    p.add_argument("--batch-size", type=int, default=200, help="GLOBAL batch (all processes)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0, help="process-group timeout (s)")
    return p.parse_args(argv)


def setup(timeout_s: float) -> tuple[int, int, torch.device]:
    """Joins the process group when started by torchrun; returns ``(rank, world, device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else None
    if device is not None:
        torch.cuda.set_device(device)
    if world == 1:
        return 0, 1, device or torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size(), device or torch.device("cpu")


def make_data(args: argparse.Namespace) -> dict[str, Any]:
    train, _, test = make_synthetic_splits(
        args.n_per_class, seed=args.seed, n_per_class_eval=args.n_eval_per_class
    )
    # the design [y, cf, 1], y kept; raw units, as the synthetic experiment
    builder = DesignBuilder(keep=["y"], standardize=False)
    design = builder.fit_transform({"y": train.labels.numpy(), "cf": train.metadata["cf"]})
    test_rows = builder.transform({"y": test.labels.numpy(), "cf": test.metadata["cf"]}).tensor()
    return {
        "design": design,
        "train": TensorDataset(train.images, train.labels, design.tensor()),
        "test": TensorDataset(
            test.images,
            test.labels,
            test_rows,
            torch.as_tensor(test.metadata["cf"], dtype=torch.float64),
        ),
    }


def train_epoch(model, loader, optimizer, device) -> tuple[float, int]:
    model.train()
    total, count = 0.0, 0
    for images, labels, rows in loader:
        images, labels, rows = images.to(device), labels.to(device), rows.to(device)
        logits, _ = model(images, rows)
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * labels.shape[0]
        count += labels.shape[0]
    return total, count


@torch.no_grad()
def evaluate(model, dataset, rank, world, device) -> dict[str, Any]:
    """Metrics over the whole test set; each process evaluates its shard (sizes may differ)."""
    model.eval()
    shard = Subset(dataset, range(rank, len(dataset), world))
    bacc, by_bin = BalancedAccuracy(), GroupAccuracy()
    bias = GroupedDistanceCorrelationSqr(unbiased=True)
    for images, labels, rows, cf in DataLoader(shard, batch_size=256):
        logits, features = model(images.to(device), rows.to(device))
        pred = (logits[:, 0] > 0).long().cpu()
        bacc.update(labels, pred)
        by_bin.update(labels, pred, np.clip(np.floor(cf.numpy()), 1, 5).astype(int))
        bias.update(features, cf, labels)
    # compute() gathers from every process (a collective: all ranks call it)
    return {
        "test_bacc": bacc.compute(),
        "test_acc_by_cf_bin": {str(k): v for k, v in by_bin.compute().items()},
        "test_dcor2_by_class": {str(k): v for k, v in bias.compute().items()},
    }


def digest(model: nn.Module) -> dict[str, list[float]]:
    """Sum and sum of squares (float64) of every parameter and buffer: to compare processes."""
    return {
        k: [float(v.double().sum()), float(v.double().square().sum())]
        for k, v in model.state_dict().items()
        if v.is_floating_point()
    }


def write_atomic(path: str, data: bytes) -> None:
    """Writes ``data`` to a temporary file beside ``path``, then renames it into place."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world, device = setup(args.timeout)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of {world} processes")
    data = make_data(args)

    torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP broadcasts rank 0's)
    model: nn.Module = create_model("paper-cnn", norm=args.norm, design=data["design"]).to(device)
    if world > 1:
        model = SyncMetadataNorm.convert_sync_metadata_norm(model)
        if device.type == "cuda":  # torch's SyncBatchNorm runs on GPUs only (DDP refuses it on CPU)
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp: nn.Module = DistributedDataParallel(model)
    else:
        ddp = model
    optim = torch.optim.Adam if args.optimizer == "adam" else torch.optim.SGD
    optimizer = optim(ddp.parameters(), lr=args.lr)

    sampler = DistributedSampler(
        data["train"], num_replicas=world, rank=rank, shuffle=True, seed=args.seed
    )
    loader = DataLoader(data["train"], batch_size=args.batch_size // world, sampler=sampler)
    history = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every process
        start = time.perf_counter()
        total, count = train_epoch(ddp, loader, optimizer, device)
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(sums)
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(sums[0] / sums[1]),
                "time_s": time.perf_counter() - start,
            }
        )
        if rank == 0:
            print(f"epoch {epoch}: train loss {history[-1]['train_loss']:.4f}", flush=True)

    results = evaluate(model, data["test"], rank, world, device)
    digests = [digest(model)]
    if world > 1:
        digests = [None] * world
        dist.all_gather_object(digests, digest(model))
    difference = max(
        abs(d[k][i] - digests[0][k][i]) / max(1.0, abs(digests[0][k][i]))
        for d in digests
        for k in digests[0]
        for i in range(2)
    )

    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        config = {**vars(args), "world_size": world, "per_process_batch": args.batch_size // world}
        write_json(os.path.join(args.out, "config.json"), config)
        plain = revert_sync_metadata_norm(model)  # plain MetadataNorm layers in the checkpoint
        buffer = io.BytesIO()
        torch.save({k: v.cpu() for k, v in plain.state_dict().items()}, buffer)
        write_atomic(os.path.join(args.out, "model.pt"), buffer.getvalue())
        metrics = {**results, "history": history, "max_rank_difference": difference}
        write_json(os.path.join(args.out, "metrics.json"), metrics)
        print(f"test bAcc {results['test_bacc']:.3f}; ranks agree to {difference:.1e}", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
