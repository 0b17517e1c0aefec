"""``metanorm demo``: a one-minute look at the layer on confounded features."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from metanorm.design import make_design
from metanorm.nn import MetadataNorm


def register(sub: Any) -> None:
    """Adds the ``demo`` subcommand."""
    p = sub.add_parser(
        "demo",
        help="show MetadataNorm removing a confounder from features",
        description="Builds features that depend on a label y and on a confounder c correlated "
        "with y, passes them through MetadataNorm (y kept, c removed) batch by batch, and prints "
        "the within-class correlation of the features with c and with y before and after.",
    )
    p.add_argument("--n", type=int, default=2000, metavar="N", help="samples (default: 2000)")
    p.add_argument("--batch-size", type=int, default=128, metavar="M", help="default: 128")
    p.add_argument("--seed", type=int, default=0, help="default: 0")
    p.set_defaults(func=run)


def _within_class_corr(f: torch.Tensor, v: torch.Tensor, y: torch.Tensor) -> float:
    vals = []
    for c in (0, 1):
        sel = y == c
        a = f[sel] - f[sel].mean()
        b = v[sel] - v[sel].mean()
        vals.append(float((a @ b) / (a.norm() * b.norm())))
    return sum(vals) / len(vals)


def run(args: argparse.Namespace) -> int:
    """Runs the demo; returns 0."""
    if args.n < 10 or args.batch_size < 1:
        raise ValueError(
            f"expected --n >= 10 and --batch-size >= 1, got {args.n}, {args.batch_size}"
        )
    g = torch.Generator().manual_seed(args.seed)
    y = torch.randint(0, 2, (args.n,), generator=g)
    c = torch.rand(args.n, generator=g) * 3 + 1 + 2 * y  # U(1,4) for y=0, U(3,6) for y=1
    f = 1.5 * y + 0.8 * c + 0.3 * torch.randn(args.n, generator=g)
    design = make_design({"y": y.numpy(), "c": c.numpy()}, keep=["y"])
    rows = design.tensor()
    layer = MetadataNorm(1, design, momentum=None)
    outs = [
        layer(f[i : i + args.batch_size, None], rows[i : i + args.batch_size])
        for i in range(0, args.n, args.batch_size)
    ]
    train_out = torch.cat(outs).squeeze(1).detach()
    layer.eval()
    eval_out = layer(f[:, None], rows).squeeze(1).detach()
    print(f"design columns {design.columns}, kept {[design.columns[k] for k in design.keep]}")
    print(f"{'':28s}{'corr with c | y':>18s}{'corr with y':>14s}")
    for name, v in (
        ("features", f),
        ("MDN, training batches", train_out),
        ("MDN, eval (running beta)", eval_out),
    ):
        corr_y = float(torch.corrcoef(torch.stack([v, y.float()]))[0, 1])
        print(f"{name:28s}{_within_class_corr(v, c, y):18.3f}{corr_y:14.3f}")
    return 0
