# This study keeps the benchmark's code as measured (docs/running_beta.md); its layer subclass
# reads the layers' optional buffers without narrowing them.
# mypy: disable-error-code="union-attr, arg-type, operator, override, misc"
"""Running-β policies of MetadataNorm after a SHORT training, on the paper's synthetic task.

Question: does the evaluation β come out biased after a short training, and what should a
training batch with m ≤ K (K design columns) do? Measured on the synthetic experiment
(``metanorm_repro.datasets.synthetic``; design ``[y, cf, 1]`` in raw units, ``y`` kept, as
``metanorm_repro.experiments.synthetic`` codes it), ``PaperCNN("mdn-conv" | "mdn-linear")``,
Adam with the experiment's cosine schedule from 1e-3 over 5 epochs, BCE-with-logits. After epochs
1 and 5 the model is evaluated in eval mode on the test split with each policy's running β:

- ``a-old``: 0.1.0.dev0: plain EMA from zero, f = 0.1; a batch with m ≤ K uses (and folds in) its
  own batch estimate;
- ``b-old``: the debiased EMA (f = max(0.1, m/S)) but the old m ≤ K handling (short settings);
- ``b``: the new default: debiased EMA 0.1, a batch with m ≤ K uses the running β, no update;
- ``c``: ``momentum=None``: the size-weighted cumulative average over every batch seen;
- ``d``: the new default plus :func:`metanorm.nn.utils.refit_running_beta` after every epoch;
- extra, in the shared runs only: ``b-0.3`` (debiased EMA, momentum 0.3) and ``adam-0.1`` (an
  EMA from zero divided by its weight mass, Adam's bias correction);
- ``oracle`` (columns on the right of every row): the same weights, every MDN layer's β refitted
  on the full training set, layer by layer (what ``refit_running_beta`` gives).

Columns: test bAcc; bias-corrected dcor² between the fc1 features and cf within class 0 and
class 1; ``relerr``: ‖β_run − β_full‖_F / ‖β_full‖_F over the REMOVED rows (cf, intercept: the
only rows used at evaluation) of the last MDN layer (fc1), β_full being
:func:`metanorm.linalg.fit_beta` of the features that layer sees in eval mode on the whole
training set (earlier MDN layers using the same policy's β).

How the runs are shared: in training mode an MDN layer uses its batch estimate whenever m > K, so
the running β does not influence training and every policy's running β can be tracked in ONE
training run (the library layer with the default drives it; forward hooks fold the same batch
estimates into the other policies' buffers with :func:`metanorm.nn.functional.update_running_beta`).
There ``d`` is the oracle by construction. Only in a setting with a batch of m ≤ K does the policy
change training; such a setting trains one model per policy.

Settings (batch size, training set size): ``200`` (2000 = 10 × 200), ``128`` (15 × 128 + 80),
``32`` (62 × 32 + 16), ``short3`` (1923 = 15 × 128 + 3: a last batch of 3 = K samples),
``short5`` (1925: a last batch of 5 > K, to see the noise of a tiny batch that is still used).
The short settings train on a random subset of the 2000 training images (the design is built
on that subset).

Usage (the study ``running-beta``; ``benchmarks/running_beta.py`` runs :func:`main`)::

    metanorm reproduce running-beta --option 'models=["mdn-conv"]'       # ~8-10 min, 1 thread
    metanorm reproduce running-beta --option 'models=["mdn-linear"]' --seeds 2
    .venv/bin/python benchmarks/running_beta.py --model mdn-linear --out /tmp/lin.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from metanorm import metrics
from metanorm.design import DesignBuilder
from metanorm.linalg import batch_statistics, beta_from_statistics, fit_beta
from metanorm.nn import MetadataNorm
from metanorm.nn import functional as MF
from metanorm.nn.utils import refit_running_beta
from metanorm_repro.datasets.synthetic import make_synthetic_splits
from metanorm_repro.experiments.engine import train_one_epoch
from metanorm_repro.models import PaperCNN

SETTINGS: dict[str, tuple[int, int]] = {
    "200": (200, 2000),
    "128": (128, 2000),
    "32": (32, 2000),
    "short3": (128, 1923),
    "short5": (128, 1925),
}
ORDER = ["a-old", "b-old", "b", "c", "d", "b-0.3", "adam-0.1"]
EVAL_BATCH = 500
LR, EPOCHS = 1e-3, 5


class PolicyMDN(MetadataNorm):
    """MetadataNorm with a switchable running-β policy (this benchmark only).

    ``debias=False`` folds estimates in with f = momentum (0.1.0.dev0's plain EMA);
    ``small="batch"`` makes a training batch with m ≤ K use (and fold in) its own estimate, as
    0.1.0.dev0 did. ``debias=True, small="running"`` is the library's layer unchanged.
    """

    def __init__(self, *args: Any, debias: bool = True, small: str = "running", **kw: Any):
        super().__init__(*args, **kw)
        self.debias, self.small = debias, small

    def forward(self, input: Tensor, metadata: Tensor) -> Tensor:
        """The library layer's forward, with this policy's running-β update in training."""
        m = input.shape[0]
        tiny = m <= self.num_metadata
        if not self.training or (tiny and self.small == "running") or (not tiny and self.debias):
            return super().forward(input, metadata)
        features = input.reshape(m, -1)
        rows = metadata.reshape(m, -1).to(features.dtype)
        out, beta, count = MF.batch_residual(
            features, rows, self.gram_inverse, self.n_samples, self.remove_mask
        )
        counter = self.num_samples_tracked if (self.debias or self.momentum is None) else None
        MF.update_running_beta(
            self.running_beta,
            beta,
            count,
            self.momentum,
            num_batches_tracked=self.num_batches_tracked,
            num_samples_tracked=counter,
            num_batches_skipped=self.num_batches_skipped,
        )
        return out.reshape(input.shape)


def mdn_layers(model: nn.Module) -> list[MetadataNorm]:
    """The MDN layers of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, MetadataNorm)]


def build_model(
    kind: str, design: Any, seed: int, momentum: float | None, **policy: Any
) -> nn.Module:
    """``PaperCNN(kind)`` with :class:`PolicyMDN` layers of the given policy."""
    torch.manual_seed(seed)
    model = PaperCNN(kind, design, momentum=momentum)
    for name, child in list(model.named_children()):
        if isinstance(child, MetadataNorm):
            new = PolicyMDN(child.num_features, design, momentum=momentum, **policy)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
    return model


class Shadows:
    """Other policies' running β, fed the driver layers' batch estimates (m > K runs only).

    ``specs``: ``{policy: (momentum, mode)}``, mode ``"plain"`` (f = μ), ``"debiased"``
    (the library's f = max(μ, m/S); μ None: cumulative) or ``"adam"`` (an EMA from zero divided
    by its weight mass 1 − (1 − μ)^t, Adam's bias correction: recent batches keep the larger
    weights).
    """

    def __init__(self, model: nn.Module, specs: dict[str, tuple[float | None, str]]):
        self.specs, self.active = specs, True
        self.layers = mdn_layers(model)
        self.state: dict[str, list[list[Tensor]]] = {
            p: [
                [
                    torch.zeros_like(lay.running_beta),
                    torch.zeros((), dtype=torch.long),
                    torch.zeros((), dtype=torch.float64),
                ]
                for lay in self.layers
            ]
            for p in specs
        }
        for i, layer in enumerate(self.layers):
            layer.register_forward_hook(self._hook(i))

    def _hook(self, i: int) -> Any:
        def hook(layer: MetadataNorm, inputs: tuple[Tensor, Tensor], output: Tensor) -> None:
            if not (self.active and layer.training):
                return
            x, rows = inputs
            m = x.shape[0]
            if m <= layer.num_metadata:
                raise RuntimeError("a shared run cannot have a batch with m <= K")
            with torch.no_grad():
                xtf = batch_statistics(rows.double(), x.reshape(m, -1).double())
                beta = beta_from_statistics(layer.gram_inverse, xtf, m, layer.n_samples).float()
                count = torch.tensor(float(m), dtype=torch.float64)
                for p, (momentum, mode) in self.specs.items():
                    buf, seen, mass = self.state[p][i]
                    counter = seen if mode == "debiased" else None
                    MF.update_running_beta(buf, beta, count, momentum, num_samples_tracked=counter)
                    if mode == "adam":
                        mass.mul_(1 - momentum).add_(momentum)

        return hook

    def betas(self, p: str) -> list[Tensor]:
        """Policy ``p``'s running β of each layer."""
        if self.specs[p][1] == "adam":
            return [(b / mass).to(b.dtype) for b, _, mass in self.state[p]]
        return [b for b, _, _ in self.state[p]]


SHADOWS: dict[str, tuple[float | None, str]] = {
    "a-old": (0.1, "plain"),
    "c": (None, "debiased"),
    "b-0.3": (0.3, "debiased"),
    "adam-0.1": (0.1, "adam"),
}


@contextlib.contextmanager
def using_betas(model: nn.Module, betas: list[Tensor] | None) -> Iterator[None]:
    """Temporarily puts ``betas`` into the MDN layers' running β (None: leave them)."""
    layers = mdn_layers(model)
    saved = [lay.running_beta.clone() for lay in layers]
    try:
        if betas is not None:
            for lay, b in zip(layers, betas, strict=True):
                lay.running_beta.copy_(b)
        yield
    finally:
        for lay, s in zip(layers, saved, strict=True):
            lay.running_beta.copy_(s)


def refitted_betas(model: nn.Module, loader: DataLoader) -> list[Tensor]:
    """The oracle: each layer's β refitted on the training set; the model's buffers restored."""
    layers = mdn_layers(model)
    saved = [{k: v.clone() for k, v in lay.state_dict().items()} for lay in layers]
    refit_running_beta(model, loader)
    out = [lay.running_beta.clone() for lay in layers]
    for lay, s in zip(layers, saved, strict=True):
        lay.load_state_dict(s)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, data: dict[str, Any], betas: list[Tensor] | None) -> dict:
    """Test bAcc, per-class dcor², and the last MDN layer's relative β error."""
    model.eval()
    last = mdn_layers(model)[-1]
    with using_betas(model, betas):
        logits, feats = [], []
        for x, _, rows in data["test_loader"]:
            lg, f = model(x, rows)
            logits.append(lg[:, 0])
            feats.append(f)
        y = data["test_y"]
        pred = (torch.cat(logits) > 0).long().numpy()
        dc = metrics.grouped_distance_correlation_sqr(
            torch.cat(feats), data["test_cf"], y, unbiased=True
        )
        seen: list[Tensor] = []
        handle = last.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].flatten(1)))
        try:
            for x, _, rows in data["refit_loader"]:
                model(x, rows)
        finally:
            handle.remove()
        full = fit_beta(data["design"], torch.cat(seen))
        mask = last.remove_mask
        run = last.running_beta.double()
        rel = float((run - full)[mask].norm() / full[mask].norm())
    return {
        "bacc": metrics.balanced_accuracy(y, pred),
        "dcor0": float(dc[0]),
        "dcor1": float(dc[1]),
        "relerr": rel,
    }


def make_data(setting: str, seed: int) -> dict[str, Any]:
    """The synthetic splits, design and loaders of one setting and seed."""
    batch, n_train = SETTINGS[setting]
    train, _, test = make_synthetic_splits(1000, seed=seed)
    idx = np.sort(np.random.default_rng(seed + 17).permutation(len(train))[:n_train])
    y_tr = train.labels.numpy()[idx]
    cf_tr = np.asarray(train.metadata["cf"])[idx]
    builder = DesignBuilder(keep=["y"], standardize=False)  # raw units, as the experiment
    design = builder.fit_transform({"y": y_tr, "cf": cf_tr})
    rows_tr = design.tensor()
    rows_te = builder.transform({"y": test.labels.numpy(), "cf": test.metadata["cf"]}).tensor()
    ds_tr = TensorDataset(train.images[idx], torch.as_tensor(y_tr), rows_tr)
    last = n_train % batch
    return {
        "design": design,
        "batch": batch,
        "n_train": n_train,
        "last_batch": last if last else batch,
        "train_ds": ds_tr,
        "refit_loader": DataLoader(ds_tr, batch_size=EVAL_BATCH),
        "test_loader": DataLoader(
            TensorDataset(test.images, test.labels, rows_te), batch_size=EVAL_BATCH
        ),
        "test_y": test.labels.numpy(),
        "test_cf": torch.as_tensor(np.asarray(test.metadata["cf"]))[:, None],
    }


def train(  # noqa: D103 - cosine lr over the epochs, then the harness's epoch
    model: nn.Module,
    data: dict[str, Any],
    seed: int,
    eval_epochs: list[int],
    on_eval: Any,
    refit_each_epoch: bool = False,
    shadows: Shadows | None = None,
) -> None:
    loader = DataLoader(
        data["train_ds"],
        batch_size=data["batch"],
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for epoch in range(EPOCHS):
        for g in opt.param_groups:
            g["lr"] = LR * (1 + math.cos(math.pi * epoch / EPOCHS)) / 2
        train_one_epoch(model, loader, opt)  # BCE on the one logit, as every experiment
        if shadows is not None:
            shadows.active = False
        if refit_each_epoch:
            refit_running_beta(model, data["refit_loader"])
        if epoch + 1 in eval_epochs:
            on_eval(epoch + 1)
        if shadows is not None:
            shadows.active = True


def run_setting(
    kind: str, setting: str, seed: int, eval_epochs: list[int], progress: bool = True
) -> list[dict]:
    """Every policy of one model, setting and seed: one row per policy and evaluated epoch."""
    data = make_data(setting, seed)
    results: list[dict] = []
    tiny = data["last_batch"] <= data["design"].shape[1]

    def record(
        policy: str, epoch: int, model: nn.Module, betas: list[Tensor] | None, oracle: dict
    ) -> None:
        r = evaluate(model, data, betas)
        results.append(
            {
                "model": kind,
                "setting": setting,
                "seed": seed,
                "epoch": epoch,
                "policy": policy,
                **r,
                **{f"oracle_{k}": v for k, v in oracle.items() if k != "relerr"},
            }
        )
        if not progress:
            return
        print(
            f"  {kind} {setting:>6} seed {seed} ep {epoch} {policy:7s} bAcc {r['bacc']:.3f} "
            f"dcor² {r['dcor0']:.3f}/{r['dcor1']:.3f} relerr {r['relerr']:.3f} | oracle "
            f"{oracle['bacc']:.3f} {oracle['dcor0']:.3f}/{oracle['dcor1']:.3f}",
            flush=True,
        )

    if not tiny:  # one run, every policy tracked
        model = build_model(kind, data["design"], seed, 0.1)
        shadows = Shadows(model, SHADOWS)

        def on_eval(epoch: int) -> None:
            oracle_b = refitted_betas(model, data["refit_loader"])
            oracle = evaluate(model, data, oracle_b)
            record("a-old", epoch, model, shadows.betas("a-old"), oracle)
            record("b", epoch, model, None, oracle)
            record("c", epoch, model, shadows.betas("c"), oracle)
            record("d", epoch, model, oracle_b, oracle)
            for extra in ("b-0.3", "adam-0.1"):
                record(extra, epoch, model, shadows.betas(extra), oracle)

        train(model, data, seed, eval_epochs, on_eval, shadows=shadows)
        return results
    runs = {  # policy: (momentum, debias, small-batch handling, refit each epoch)
        "a-old": (0.1, False, "batch", False),
        "b-old": (0.1, True, "batch", False),
        "b": (0.1, True, "running", False),
        "c": (None, True, "running", False),
        "d": (0.1, True, "running", True),
    }
    for policy, (momentum, debias, small, refit) in runs.items():
        model = build_model(kind, data["design"], seed, momentum, debias=debias, small=small)

        def on_eval(
            epoch: int, policy: str = policy, model: nn.Module = model, refit: bool = refit
        ) -> None:
            if refit:
                oracle = evaluate(model, data, None)
            else:
                oracle = evaluate(model, data, refitted_betas(model, data["refit_loader"]))
            record(policy, epoch, model, None, oracle)

        train(model, data, seed, eval_epochs, on_eval, refit_each_epoch=refit)
    return results


def table(results: list[dict]) -> str:
    """The markdown table of the rows: mean over the seeds (each seed's value in brackets)."""
    lines = [
        "| model | setting | epoch | policy | test bAcc | dcor² c0 / c1 | relerr β (fc1) "
        "| oracle bAcc | oracle dcor² c0 / c1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted(
        {(r["model"], r["setting"], r["epoch"], r["policy"]) for r in results},
        key=lambda k: (k[0], list(SETTINGS).index(k[1]), k[2], ORDER.index(k[3])),
    )
    for key in keys:
        rs = [r for r in results if (r["model"], r["setting"], r["epoch"], r["policy"]) == key]

        def mean(name: str, rs: list[dict] = rs) -> str:
            vals = [r[name] for r in rs]
            s = f"{np.mean(vals):.3f}"
            return s if len(vals) == 1 else s + f" ({' '.join(f'{v:.3f}' for v in vals)})"

        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {mean('bacc')} | "
            f"{mean('dcor0')} / {mean('dcor1')} | {mean('relerr')} | {mean('oracle_bacc')} | "
            f"{mean('oracle_dcor0')} / {mean('oracle_dcor1')} |"
        )
    return "\n".join(lines)


def run_running_beta(
    *,
    models: list[str] | tuple[str, ...] = ("mdn-conv",),
    settings: list[str] | tuple[str, ...] = tuple(SETTINGS),
    seeds: int = 1,
    seed: int = 0,
    eval_epochs: list[int] | tuple[int, ...] = (1, 5),
    epochs: int = EPOCHS,
    threads: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Every model × setting × seed (``seed, seed + 1, ...``); what the study reports.

    Returns:
        ``{"settings": {...}, "rows": [...], "wall_time_s": float}``: one row per model,
        setting, seed, evaluated epoch and policy (:func:`run_setting`).
    """
    config = {
        "models": list(models),
        "settings": list(settings),
        "seeds": list(range(seed, seed + seeds)),
        "eval_epochs": list(eval_epochs),
        "epochs": epochs,
        "threads": threads,
    }
    t0 = time.perf_counter()
    rows: list[dict] = []
    for unit in running_beta_units(config):
        rows += running_beta_unit(config, unit, progress)["rows"]
    return {"settings": config, "rows": rows, "wall_time_s": time.perf_counter() - t0}


def running_beta_units(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The run units of the study: every model × setting × seed (all policies in one unit).

    ``config`` is the ``"settings"`` of :func:`run_running_beta`'s result.

    Raises:
        ValueError: an unknown model or setting, or no seed.
    """
    models, settings, seeds = config["models"], config["settings"], config["seeds"]
    bad = [m for m in models if m not in ("mdn-conv", "mdn-linear")]
    bad += [s for s in settings if s not in SETTINGS]
    if bad or not models or not settings or not seeds:
        raise ValueError(
            f"expected models among ('mdn-conv', 'mdn-linear'), settings among {list(SETTINGS)} "
            f"and seeds >= 1, got {list(models)}, {list(settings)}, {len(seeds)}"
        )
    return [
        {"model": kind, "setting": setting, "seed": int(s)}
        for kind in models
        for setting in settings
        for s in seeds
    ]


def running_beta_unit(
    config: dict[str, Any], unit: dict[str, Any], progress: bool = True
) -> dict[str, Any]:
    """Every policy of one run unit (model, setting, seed): ``{"rows": run_setting(...)}``."""
    torch.set_num_threads(config["threads"])
    globals()["EPOCHS"] = config["epochs"]
    rows = run_setting(
        unit["model"], unit["setting"], int(unit["seed"]), list(config["eval_epochs"]), progress
    )
    return {"rows": rows}


def running_beta_report(result: dict[str, Any]) -> str:
    """The markdown report of :func:`run_running_beta`."""
    s = result["settings"]
    return (
        "# Running-β policies after a short training\n\n"
        f"Models {', '.join(s['models'])}; settings {', '.join(s['settings'])}; seeds "
        f"{', '.join(map(str, s['seeds']))}; {s['epochs']} epochs (cosine lr from {LR:g}), "
        f"evaluated after epochs {', '.join(map(str, s['eval_epochs']))}; {s['threads']} "
        "thread(s). Policies and columns: docs/running_beta.md.\n\n"
        + table(result["rows"])
        + f"\n\nWall time: {result['wall_time_s']:.0f} s.\n"
    )


def main() -> None:
    """``python benchmarks/running_beta.py``: the older command line of the study."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", default=["mdn-conv"], choices=["mdn-conv", "mdn-linear"])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--eval-epochs", nargs="+", type=int, default=[1, 5])
    p.add_argument("--epochs", type=int, default=EPOCHS, help="epochs (cosine lr over them)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="write the raw results as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    globals()["EPOCHS"] = args.epochs
    t0 = time.perf_counter()
    results: list[dict] = []
    for kind in args.model:
        for setting in args.settings:
            for seed in args.seeds:
                results += run_setting(kind, setting, seed, args.eval_epochs)
    print(table(results))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
