"""The bias probe: how much metadata each module's output still carries, within each class.

:func:`probe` runs a model over a loader with forward hooks on the modules asked for and measures,
for each one, the within-class squared distance correlation between its output and the metadata
(:func:`metanorm.metrics.distance_correlation_sqr`) and the held-out R² of a linear (ridge) probe
predicting the metadata from the output within each class. :func:`plot_probe` draws one or more
results side by side (a Baseline and an MDN model, say).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from metanorm.metrics import distance_correlation_sqr
from metanorm.nn.container import takes_metadata
from metanorm.nn.scope import MetadataModel

__all__ = ["ProbeRecord", "ProbeResult", "plot_probe", "probe"]


@dataclass(frozen=True)
class ProbeRecord:
    """What :func:`probe` measured at one module.

    Attributes:
        module: the module's qualified name in the model (``""`` for the model itself).
        kind: the module's class name.
        dcor2: mean over classes of the within-class squared distance correlation between the
            module's output and the metadata (bias-corrected when the probe's ``unbiased``).
        probe_r2: the held-out partial R² of a ridge regression of the metadata on the output,
            the class regressed out of both sides (k-fold; 0 is no linear information beyond the
            class, 1 is all of it; it can be slightly negative).
        dcor2_by_class: ``{class: dcor²}``.
        probe_r2_by_class: ``{class: held-out R² of the same probe fitted within that class
            alone}``: it also sees metadata effects whose slope differs between classes.
        num_samples: the samples measured.
        num_features: the output's width as measured (after the random projection, if any).
        projected: whether the output was randomly projected to ``num_features`` columns.
    """

    module: str
    kind: str
    dcor2: float
    probe_r2: float
    dcor2_by_class: dict[str, float] = field(default_factory=dict)
    probe_r2_by_class: dict[str, float] = field(default_factory=dict)
    num_samples: int = 0
    num_features: int = 0
    projected: bool = False


@dataclass(frozen=True)
class ProbeResult:
    """The records of :func:`probe`, in the order the forward pass reached the modules.

    Attributes:
        records: one :class:`ProbeRecord` per module.
        label: a name for the model, used by :func:`plot_probe` (e.g. ``"MDN-Conv"``).
        settings: how the probe was run (samples, projection width, folds, ridge, seed).
    """

    records: tuple[ProbeRecord, ...]
    label: str = "model"
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __iter__(self) -> Iterator[ProbeRecord]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, module: str) -> ProbeRecord:
        for r in self.records:
            if r.module == module:
                return r
        raise KeyError(f"no record for module {module!r}; probed: {[r.module for r in self]}")

    def to_dicts(self) -> list[dict[str, Any]]:
        """One plain dict per record (JSON-ready)."""
        return [{"model": self.label, **asdict(r)} for r in self.records]

    def to_pandas(self) -> Any:
        """The records as a :class:`pandas.DataFrame` (one row per module; needs pandas)."""
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover - pandas is an optional extra
            raise ImportError(
                "ProbeResult.to_pandas needs pandas: pip install 'metanorm[pandas]'"
            ) from err
        return pd.DataFrame(self.to_dicts())


def _leaf_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if name and not any(m.children())]


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, list | tuple):
        for item in output:
            if isinstance(item, Tensor):
                return item
    return None


def _default_call(model: nn.Module, batch: Any) -> None:
    x, rows = batch[0], batch[-1]
    if isinstance(model, MetadataModel):
        model(x, metadata=rows)
    elif takes_metadata(model):
        model(x, rows)
    else:
        model(x)


def _unpack_default(batch: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(batch, list | tuple) or len(batch) < 3:
        raise TypeError(
            "expected each batch to be a tuple (inputs, labels, design_rows), got "
            f"{type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, list | tuple) else "")
            + "; pass targets=lambda batch: (labels, metadata) and call=lambda model, batch: ..."
        )
    return batch[1], batch[-1]


#: The ridge penalties the probe chooses from (by leave-one-out error on each training fold),
#: relative to the mean squared singular value of the standardised training features.
RIDGE_GRID = tuple(float(a) for a in np.logspace(-4, 4, 17))


def _thin_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``u, s, vh`` of ``a`` over its numerically nonzero singular values only.

    Through the eigenvectors of the smaller Gram matrix (``a aᵀ`` or ``aᵀ a``): one product and a
    small symmetric eigenproblem, much cheaper than an SVD of a wide conv map's output. Directions
    with ``s < 1e-6 · max(s)`` (such as the one the centring removed) are dropped.
    """
    n, d = a.shape
    gram = a @ a.T if d > n else a.T @ a
    evals, evecs = torch.linalg.eigh(gram)
    top = float(evals.max()) if evals.numel() else 0.0
    keep = evals > 1e-12 * top  # s > 1e-6 · max(s)
    evals, evecs = evals[keep], evecs[:, keep]
    s = evals.sqrt()
    if d > n:
        u = evecs
        vh = (a.T @ u / s).T
    else:
        vh = evecs.T
        u = a @ evecs / s
    return u, s, vh


def _ridge_loo_fit(a: Tensor, y: Tensor) -> Tensor:
    """Ridge coefficients of centred ``y`` on centred, standardised ``a`` (intercept fitted).

    The penalty is the one of ``RIDGE_GRID`` with the least exact leave-one-out error
    (stable where features outnumber samples, unlike generalised cross-validation).
    """
    u, s, vh = _thin_svd(a)
    uty = u.T @ y
    s2 = s * s
    scale = float(s2.mean()) if s2.numel() else 1.0
    u2 = u * u
    # the parts outside the span of u: written out, not as 1 - (a difference near 1), so that
    # 1 - leverage and the residual keep their precision where the fit nearly interpolates
    # the rows were centred: the intercept's leverage 1/n belongs to every row (without it the
    # centring makes each row a combination of the others, and where features outnumber rows
    # the leave-one-out error of a near-interpolating fit would look like zero)
    outside_y = y - u @ uty
    outside_lev = (1.0 - 1.0 / a.shape[0] - u2.sum(1)).clamp_min(0.0)
    best, best_alpha = math.inf, RIDGE_GRID[-1] * scale
    for rel in RIDGE_GRID:
        alpha = rel * scale
        kept = alpha / (s2 + alpha)  # 1 - the shrinkage of each direction
        residual = outside_y + u @ (kept[:, None] * uty)
        one_minus_leverage = outside_lev + u2 @ kept
        loo = float(((residual / one_minus_leverage[:, None]) ** 2).sum())
        if loo < best:
            best, best_alpha = loo, alpha
    return vh.T @ ((s / (s2 + best_alpha))[:, None] * uty)


def _centre_by_group(t: Tensor, groups: Tensor, train: Tensor) -> Tensor:
    """``t`` less, per group, the mean of the group's training rows."""
    out = t.clone()
    for g in torch.unique(groups):
        sel = groups == g
        ref = sel & train
        if bool(ref.any()):
            out[sel] -= t[ref].mean(0)
    return out


def _ridge_cv_r2(
    f: Tensor, y: Tensor, groups: Tensor, folds: int, generator: torch.Generator
) -> float:
    """Held-out R² of a ridge regression of ``y`` (n, p) on ``f`` (n, d), k-fold, pooled.

    Within each fold, both sides are centred per group (the class) with the training part's
    group means, so that the probe measures what the output says about the metadata beyond the
    class; each fold's penalty is chosen on its training part alone.
    """
    n = f.shape[0]
    k = min(folds, n)
    if k < 2:
        return math.nan
    order = torch.randperm(n, generator=generator)
    pred = torch.empty_like(y)
    target = torch.empty_like(y)
    for i in range(k):
        test = order[i::k]
        train = torch.ones(n, dtype=torch.bool)
        train[test] = False
        fc, yc = _centre_by_group(f, groups, train), _centre_by_group(y, groups, train)
        ft, yt = fc[train], yc[train]
        sd = ft.std(0, unbiased=False)
        # columns (nearly) constant on the training part carry nothing: standardising them would
        # blow their rounding noise up to unit scale
        scale = torch.where(sd > 1e-6 * sd.max().clamp_min(1e-300), 1.0 / sd, 0.0)
        coef = _ridge_loo_fit(ft * scale, yt)
        pred[test] = (fc[test] * scale) @ coef
        target[test] = yc[test]
    total = float((target**2).sum())
    if total == 0.0:
        return math.nan
    return 1.0 - float(((target - pred) ** 2).sum()) / total


@torch.no_grad()
def probe(
    model: nn.Module,
    loader: Iterable[Any],
    metadata: int | Sequence[int] | Callable[[Tensor], Tensor],
    *,
    modules: Sequence[str] | None = None,
    targets: Callable[[Any], tuple[Any, Any]] | None = None,
    call: Callable[[nn.Module, Any], Any] | None = None,
    max_samples: int = 2000,
    max_features: int = 256,
    folds: int = 5,
    unbiased: bool = True,
    seed: int = 0,
    label: str = "model",
    device: torch.device | str | None = None,
) -> ProbeResult:
    r"""Measures, module by module, how much of the metadata each output still carries.

    For every module named in ``modules`` (default: every leaf module, so MDN, BatchNorm and
    activation outputs are all included) a forward hook collects the module's output over the
    loader, in evaluation mode and without gradients. Then, **within each class** (the label of
    each sample), it computes

    - ``dcor2``: the squared distance correlation between the output and the metadata
      (bias-corrected by default, as the paper reports it), and
    - ``probe_r2``: the held-out partial R² (``folds``-fold cross-validation) of a ridge
      regression of the metadata on the standardised output, with the class regressed out of
      both sides (each fold's class means and penalty taken from its training part; the penalty
      by exact leave-one-out error over a grid); ``probe_r2_by_class`` holds the same probe
      fitted within each class alone.

    dcor² is averaged over the classes. Conditioning on the class matters: after an MDN layer
    that keeps the label, a plain (pooled) probe would still score high, since the label stays in
    the features and the metadata track the label; the partial probe does not. MDN removes the
    metadata's linear effect common to all classes, which is what ``probe_r2`` measures; an
    effect whose slope differs between classes (a nonlinear one, seen through two classes that
    cover different ranges of the metadata) remains, and shows in ``probe_r2_by_class``.

    Memory is bounded: the probe reads the first ``max_samples`` samples the loader yields
    (shuffle the loader, or subsample the data set, for a random subsample), and an output wider
    than ``max_features`` is multiplied by a fixed random Gaussian matrix to ``max_features``
    columns. A random projection keeps every pairwise distance to within a small relative error
    with high probability (Johnson–Lindenstrauss), and distance correlation is a function of the
    pairwise distances only, so dcor² is nearly unchanged; pooling a conv map per channel instead
    would lose metadata effects that change the spatial pattern but not the channel means. The
    linear probe on projected outputs sees a random subspace of the output, so its R² is a lower
    bound of the full output's.

    Args:
        model: the model; it is set to evaluation mode and restored on return.
        loader: batches of ``(inputs, labels, design_rows)`` by default (see ``targets`` and
            ``call`` for other structures).
        metadata: the design-row columns to test (an index or a list of indices), or a function
            ``rows -> (m, p) tensor``; categorical metadata as their one-hot design columns.
        modules: qualified module names (``model.named_modules()``) to probe. Default: every
            leaf module.
        targets: ``batch -> (labels, rows)``. Default: ``(batch[1], batch[-1])``.
        call: ``call(model, batch)`` runs the forward pass. Default: ``model(x, metadata=rows)``
            for a :class:`~metanorm.nn.MetadataModel`, ``model(x, rows)`` for a module that
            takes metadata (:func:`~metanorm.nn.takes_metadata`), else ``model(x)``.
        max_samples: samples to read at most. Default: 2000.
        max_features: outputs wider than this are randomly projected to this width.
            Default: 256.
        folds: cross-validation folds of the linear probe. Default: 5.
        unbiased: bias-corrected dcor² (``True``, the default) or the V-statistic.
        seed: seed of the projections and of the folds. Default: 0.
        label: the model's name in the result (for :func:`plot_probe`).
        device: moves the inputs and rows of the default ``call`` there. Default: leave them.

    Returns:
        A :class:`ProbeResult`: one :class:`ProbeRecord` per module the forward pass reached, in
        that order.

    Raises:
        ValueError: an unknown module name, a module the forward pass never reached with a
            tensor output, no batches, or a class with fewer than 4 samples for every class.
        TypeError: a batch that is not ``(inputs, labels, rows)`` without ``targets``/``call``.

    Examples::

        >>> import torch, metanorm as mn
        >>> g = torch.Generator().manual_seed(0)
        >>> y = torch.randint(0, 2, (200,), generator=g)
        >>> cf = torch.rand(200, generator=g) + y
        >>> design = mn.make_design({"y": y.numpy(), "cf": cf.numpy()}, keep=["y"])
        >>> x = 0.2 * torch.randn(200, 4, generator=g) + cf[:, None]
        >>> model = mn.MetadataSequential(torch.nn.Linear(4, 8), mn.MetadataNorm(8, design))
        >>> rows = design.tensor()
        >>> loader = [(x, y, rows)]
        >>> _ = mn.nn.utils.refit_running_beta(model, loader)  # the evaluation β
        >>> result = mn.probe(model, loader, metadata=1, label="MDN")
        >>> [r.module for r in result]
        ['0', '1']
        >>> result["0"].dcor2 > 0.5 > 0.05 > abs(result["1"].dcor2)
        True
    """
    if max_samples < 8:
        raise ValueError(f"expected max_samples >= 8, got {max_samples}")
    if max_features < 1:
        raise ValueError(f"expected max_features >= 1, got {max_features}")
    if folds < 2:
        raise ValueError(f"expected folds >= 2, got {folds}")
    named = dict(model.named_modules())
    names = _leaf_names(model) if modules is None else list(modules)
    unknown = [n for n in names if n not in named]
    if unknown:
        raise ValueError(
            f"expected module names of the model, got unknown {unknown}; "
            f"some known ones: {list(named)[1:12]}"
        )
    if not names:
        raise ValueError("no modules to probe: the model has no leaf modules and modules= is empty")
    if callable(metadata):
        pick: Callable[[Tensor], Tensor] = metadata
    else:
        cols = [metadata] if isinstance(metadata, int) else list(metadata)
        if not cols or not all(isinstance(c, int) and not isinstance(c, bool) for c in cols):
            raise TypeError(
                "expected metadata to be a column index, a list of column indices or a function "
                f"rows -> tensor, got {metadata!r}"
            )

        def pick(rows: Tensor) -> Tensor:
            return rows[:, cols]

    unpack = targets or _unpack_default

    def run(m: nn.Module, batch: Any) -> None:
        if call is not None:
            call(m, batch)
            return
        _unpack_default(batch)
        if device is not None:
            batch = (batch[0].to(device), *batch[1:-1], batch[-1].to(device))
        _default_call(m, batch)

    gen = torch.Generator().manual_seed(seed)
    outputs: dict[str, list[Tensor]] = {}
    order: list[str] = []
    projections: dict[str, Tensor] = {}
    taken = {"n": 0, "want": 0}
    calls: dict[str, int] = {}  # calls of each module in the current forward pass

    def hook_for(module_name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            t = _first_tensor(output)
            if t is None or t.dim() == 0:
                return
            # a module used several times in one forward pass (a shared activation or pooling
            # layer) is measured at each use: "name", "name#2", ...
            k = calls.get(module_name, 0)
            calls[module_name] = k + 1
            name = module_name if k == 0 else f"{module_name}#{k + 1}"
            outputs.setdefault(name, [])
            if name not in order:
                order.append(name)
            f = t.detach()[: taken["want"]].flatten(1).to(torch.float64)
            if f.shape[1] > max_features:
                if name not in projections:
                    p = torch.randn(f.shape[1], max_features, generator=gen, dtype=torch.float64)
                    projections[name] = p / math.sqrt(max_features)
                f = f @ projections[name].to(f.device)
            outputs[name].append(f.cpu())

        return hook

    was_training = {m: m.training for m in model.modules()}
    handles = [named[n].register_forward_hook(hook_for(n)) for n in names]
    labels_seen: list[Tensor] = []
    meta_seen: list[Tensor] = []
    try:
        model.eval()
        for batch in loader:
            if taken["n"] >= max_samples:
                break
            labels, rows = unpack(batch)
            labels = torch.as_tensor(labels)
            rows_t = torch.as_tensor(rows)
            want = min(int(labels.shape[0]), max_samples - taken["n"])
            taken["want"] = want
            calls.clear()
            run(model, batch)
            labels_seen.append(labels[:want].detach().cpu().reshape(want, -1)[:, 0])
            meta = pick(rows_t[:want].detach()).to(torch.float64).cpu()
            meta_seen.append(meta.reshape(want, -1))
            taken["n"] += want
    finally:
        for h in handles:
            h.remove()
        for m, flag in was_training.items():
            m.train(flag)
    if not labels_seen:
        raise ValueError("the loader yielded no batches")
    y = torch.cat(labels_seen)
    meta = torch.cat(meta_seen)
    missing = [n for n in names if n not in order]
    if modules is not None and missing:
        raise ValueError(
            f"the forward pass never reached {missing} with a tensor output; "
            "check the module names and the call"
        )
    classes = [c for c in torch.unique(y).tolist() if int((y == c).sum()) >= 4]
    if not classes:
        raise ValueError(
            f"expected at least 4 samples in some class, got class counts "
            f"{ {c: int((y == c).sum()) for c in torch.unique(y).tolist()} }"
        )
    records = []
    for name in order:
        f = torch.cat(outputs[name])
        if f.shape[0] != y.shape[0]:
            raise ValueError(
                f"module {name!r} gave {f.shape[0]} output rows for {y.shape[0]} samples "
                "(called a different number of times in different batches?); probe another "
                "module"
            )
        dc: dict[str, float] = {}
        r2: dict[str, float] = {}
        for c in classes:
            sel = y == c
            fc, mc = f[sel], meta[sel]
            key = str(int(c)) if float(c).is_integer() else str(c)
            if bool((mc == mc[:1]).all()):
                dc[key], r2[key] = math.nan, math.nan
                continue
            dc[key] = float(distance_correlation_sqr(fc, mc, unbiased=unbiased))
            one = torch.zeros(int(sel.sum()), dtype=torch.long)
            r2[key] = _ridge_cv_r2(fc, mc, one, folds, torch.Generator().manual_seed(seed))
        sel = torch.isin(y, torch.as_tensor(classes, dtype=y.dtype))
        partial = _ridge_cv_r2(
            f[sel], meta[sel], y[sel], folds, torch.Generator().manual_seed(seed)
        )
        records.append(
            ProbeRecord(
                module=name,
                kind=type(named[name.split("#")[0]]).__name__,
                dcor2=float(np.nanmean(list(dc.values()))) if dc else math.nan,
                probe_r2=partial,
                dcor2_by_class=dc,
                probe_r2_by_class=r2,
                num_samples=int(f.shape[0]),
                num_features=int(f.shape[1]),
                projected=name in projections,
            )
        )
    settings = {
        "num_samples": int(y.shape[0]),
        "max_samples": max_samples,
        "max_features": max_features,
        "folds": folds,
        "ridge_grid": list(RIDGE_GRID),
        "unbiased": unbiased,
        "seed": seed,
    }
    return ProbeResult(tuple(records), label=label, settings=settings)


def plot_probe(
    results: ProbeResult | Sequence[ProbeResult],
    path: str | os.PathLike[str] | None = None,
    *,
    modules: Sequence[str] | None = None,
) -> Any:
    """Draws :func:`probe` results: dcor² and probe R² per module, one line per model.

    Models with different module names (a Baseline and its converted MDN twin) share the x axis
    by position in the forward pass; the tick labels are the first model's module names.

    Args:
        results: one result or several (e.g. ``[baseline, mdn]``).
        path: save the figure there (PNG, atomically) and close it. Default: return it open.
        modules: only these modules (by name), in this order. Default: every probed module.

    Returns:
        The :class:`matplotlib.figure.Figure`, or ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ImportError: without matplotlib (``pip install 'metanorm[plots]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plot_probe needs matplotlib: pip install 'metanorm[plots]'") from err
    results = [results] if isinstance(results, ProbeResult) else list(results)
    if not results:
        raise ValueError("expected at least one ProbeResult, got none")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    ticks: list[str] = []
    for res in results:
        recs = list(res) if modules is None else [res[m] for m in modules]
        xs = list(range(len(recs)))
        if len(recs) > len(ticks):
            ticks = [f"{r.module}\n{r.kind}" for r in recs]
        axes[0].plot(xs, [r.dcor2 for r in recs], marker="o", label=res.label)
        axes[1].plot(xs, [r.probe_r2 for r in recs], marker="o", label=res.label)
    for ax, title in zip(
        axes, ("within-class dcor²", "within-class probe R² (held out)"), strict=True
    ):
        ax.set_title(title)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(ticks)))
        ax.set_xticklabels(ticks, rotation=60, ha="right", fontsize=7)
        ax.legend(fontsize=8)
    fig.tight_layout()
    if path is None:
        return fig
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
        plt.close(fig)
    return out
