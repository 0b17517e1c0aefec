"""Smoke check of the real-data stand-ins: does the data + model show the expected effect?

Trains each stand-in's CNN with BatchNorm (the baseline) and with MDN on the penultimate layer,
with a minimal loop of its own (the project's engine, ``metanorm reproduce``, is the real runner),
and prints, per test split: bAcc, accuracy per group (shade bin / site), and the per-class
bias-corrected dcor² between the penultimate features and the confounder.

Usage:
    .venv/bin/python scripts/smoke_real.py [--experiments shaded-fashion-mnist two-site-digits]
        [--epochs 15] [--seeds 0 1] [--batch-size 128] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from metanorm.datasets.experiments import RealExperiment, real_experiment
from metanorm.metrics import balanced_accuracy, distance_correlation_sqr


def train(exp: RealExperiment, norm: str, epochs: int, batch: int, lr: float, seed: int, **opt):
    torch.manual_seed(seed)
    model = exp.make_model(norm, **(opt if norm.startswith("mdn") else {}))
    tr = exp.splits["train"]
    rows = exp.design_rows("train")
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(tr), generator=gen)
        for start in range(0, len(tr), batch):
            idx = perm[start : start + batch]
            if idx.numel() < 2:  # BatchNorm cannot train on one sample
                continue
            logits, _ = model(tr.images[idx], rows[idx])
            loss = F.cross_entropy(logits, tr.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@torch.no_grad()
def evaluate(model, exp: RealExperiment, split: str) -> dict:
    model.eval()
    s = exp.splits[split]
    rows = exp.design_rows(split, labels=False)  # MDN ignores the kept label columns at eval
    logits, feats = [], []
    for start in range(0, len(s), 512):
        lg, ft = model(s.images[start : start + 512], rows[start : start + 512])
        logits.append(lg)
        feats.append(ft)
    pred = torch.cat(logits).argmax(1).numpy()
    f = torch.cat(feats).double().numpy()
    y = s.labels.numpy()
    meta = exp.metric_matrix(split)
    groups = exp.groups(split)
    out = {"bacc": balanced_accuracy(y, pred)}
    if groups is not None:
        out["group_acc"] = {
            str(g): float((pred[groups == g] == y[groups == g]).mean()) for g in np.unique(groups)
        }
    # per class; undefined (None) where the metadata are constant within the class
    out["dcor2"] = {
        int(c): distance_correlation_sqr(f[y == c], meta[y == c], unbiased=True)
        if np.ptp(meta[y == c], axis=0).max() > 0
        else None
        for c in np.unique(y)
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experiments", nargs="+", default=["shaded-fashion-mnist", "two-site-digits"])
    ap.add_argument("--norms", nargs="+", default=["batchnorm", "mdn"])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--shade-mode", help="shaded-*: patch (the default) or contrast")
    ap.add_argument(
        "--mdn-momentum", default="0.1", help="MDN running-beta momentum, or 'none' (cumulative)"
    )
    ap.add_argument("--noise", type=float, default=0.0, help="two-site-digits: pixel noise sd")
    ap.add_argument("--classes", type=int, nargs="+", help="two-site-digits: the digits")
    ap.add_argument("--json", help="also write the results here (must not exist)")
    args = ap.parse_args(argv)
    if args.json and os.path.exists(args.json):
        print(f"smoke_real: {args.json} exists; not overwriting", file=sys.stderr)
        return 2
    momentum = None if args.mdn_momentum.lower() == "none" else float(args.mdn_momentum)
    results: dict = {}
    for name in args.experiments:
        for seed in args.seeds:
            kw: dict = {}
            if name.startswith("shaded") and args.shade_mode:
                kw["shade_mode"] = args.shade_mode
            elif name == "two-site-digits":
                kw["noise"] = args.noise
                if args.classes:
                    kw["classes"] = tuple(args.classes)
            exp = real_experiment(name, seed=seed, **kw)
            sizes = {k: len(v) for k, v in exp.splits.items()}
            print(f"\n== {name} seed {seed} {kw} sizes {sizes}", flush=True)
            for norm in args.norms:
                t0 = time.perf_counter()
                model = train(
                    exp, norm, args.epochs, args.batch_size, args.lr, seed, momentum=momentum
                )
                res = {s: evaluate(model, exp, s) for s in ("val", *exp.eval_splits)}
                results.setdefault(name, {}).setdefault(norm, {})[seed] = res
                took = time.perf_counter() - t0
                for split, r in res.items():
                    ga = r.get("group_acc", {})
                    ga_s = " ".join(f"{g}:{a:.2f}" for g, a in ga.items())
                    dc = " / ".join("n/a" if v is None else f"{v:.3f}" for v in r["dcor2"].values())
                    print(
                        f"{norm:>9} {split:>13}  bAcc {r['bacc']:.3f}  dcor² per class {dc}"
                        f"  acc per {exp.group_column}: {ga_s}"
                    )
                print(f"{norm:>9} trained in {took:.0f} s", flush=True)
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        with tempfile.NamedTemporaryFile("w", dir=d, delete=False, suffix=".tmp") as fh:
            json.dump(results, fh, indent=2)
        os.replace(fh.name, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
