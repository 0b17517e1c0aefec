"""The synthetic task (MDN-Conv) with Hugging Face Accelerate: convert, then ``prepare``.

The recipe: build the model, convert its MetadataNorm layers with
``SyncMetadataNorm.convert_sync_metadata_norm`` (and, on GPUs, BatchNorm with
``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: Accelerate does not convert either), THEN
``accelerator.prepare(model, optimizer, loader)``, which wraps the model in DDP and shards the
loader. Each process then takes ``--batch-size / W`` rows a step, and every MDN layer
estimates β from the union of the processes' batches.

Launch, two CPU processes (``Accelerator(cpu=True)`` under torchrun uses gloo)::

    torchrun --standalone --nproc-per-node 2 examples/accelerate_synthetic.py --out runs/acc

On GPUs: ``accelerate launch --num_processes 2 examples/accelerate_synthetic.py --out runs/acc
--device auto``. ``accelerate launch --cpu --num_processes 2`` does NOT start two processes
without MPI: with ``--cpu`` and no ``--mpirun_hostfile``, Accelerate 1.x runs the script once
(its simple launcher), as one process; use torchrun for several CPU processes.

The data, the design, the evaluation and the run folder are those of ``ddp_synthetic.py``
(imported from it): rank 0 writes ``config.json``, ``metrics.json`` and ``model.pt``, each
atomically.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from datetime import timedelta

import torch
import torch.nn.functional as F
from accelerate import Accelerator, InitProcessGroupKwargs
from ddp_synthetic import digest, evaluate, make_data, write_atomic, write_json
from torch import nn
from torch.utils.data import DataLoader

from metanorm.nn import SyncMetadataNorm, revert_sync_metadata_norm
from metanorm_repro.models import create_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run folder (the main process creates it)")
    p.add_argument("--norm", default="mdn-conv", help="normalization method (norms registry)")
    p.add_argument("--n-per-class", type=int, default=500)
    p.add_argument("--n-eval-per-class", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=200, help="GLOBAL batch (all processes)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "auto"], default="cpu")
    p.add_argument("--timeout", type=float, default=300.0, help="process-group timeout (s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    accelerator = Accelerator(
        cpu=args.device == "cpu",
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=args.timeout))],
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} must be a multiple of {world} processes")
    data = make_data(args)

    torch.manual_seed(args.seed)
    model: nn.Module = create_model("paper-cnn", norm=args.norm, design=data["design"])
    # convert BEFORE prepare (prepare wraps the model in DDP)
    model = SyncMetadataNorm.convert_sync_metadata_norm(model)
    if accelerator.device.type == "cuda" and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    optim = torch.optim.Adam if args.optimizer == "adam" else torch.optim.SGD
    optimizer = optim(model.parameters(), lr=args.lr)
    loader = DataLoader(
        data["train"],
        batch_size=args.batch_size // world,  # per process; prepare shards the batches
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    history = []
    for epoch in range(args.epochs):
        model.train()
        start = time.perf_counter()
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        for images, labels, rows in loader:  # already on accelerator.device
            logits, _ = model(images, rows)
            loss = F.binary_cross_entropy_with_logits(logits[:, 0], labels.float())
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            total[0] += loss.detach().double() * labels.shape[0]
            total[1] += labels.shape[0]
        total = accelerator.reduce(total, reduction="sum")
        history.append(
            {
                "epoch": epoch,
                "train_loss": float(total[0] / total[1]),
                "time_s": time.perf_counter() - start,
            }
        )
        accelerator.print(f"epoch {epoch}: train loss {history[-1]['train_loss']:.4f}")

    plain = accelerator.unwrap_model(model)
    results = evaluate(plain, data["test"], rank, world, accelerator.device)
    digests = [digest(plain)]
    if world > 1:
        digests = [None] * world
        torch.distributed.all_gather_object(digests, digest(plain))
    difference = max(
        abs(d[k][i] - digests[0][k][i]) / max(1.0, abs(digests[0][k][i]))
        for d in digests
        for k in digests[0]
        for i in range(2)
    )

    if accelerator.is_main_process:
        os.makedirs(args.out, exist_ok=True)
        config = {**vars(args), "world_size": world, "per_process_batch": args.batch_size // world}
        write_json(os.path.join(args.out, "config.json"), config)
        state = revert_sync_metadata_norm(plain).state_dict()
        buffer = io.BytesIO()
        torch.save({k: v.cpu() for k, v in state.items()}, buffer)
        write_atomic(os.path.join(args.out, "model.pt"), buffer.getvalue())
        metrics = {**results, "history": history, "max_rank_difference": difference}
        write_json(os.path.join(args.out, "metrics.json"), metrics)
        print(f"test bAcc {results['test_bacc']:.3f}; ranks agree to {difference:.1e}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
