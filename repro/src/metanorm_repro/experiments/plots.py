"""PNG plots of a sweep (matplotlib, imported lazily, Agg backend; the ``plots`` extra).

- ``dcor2_per_epoch.png``: per-class validation dcor² per epoch, one line per method (solid:
  first class, dashed: second), one panel per batch size;
- ``val_bacc_per_epoch.png``: validation balanced accuracy per epoch, same layout;
- ``features_pca.png``: the test set's features projected on their first two principal
  components, one column per method, one row per class, coloured by the confounder;
- ``bacc_vs_dcor2.png`` (a sweep of several methods): test bAcc against the test dcor² (the mean
  over the classes), one point per method × batch size with error bars (± one std over the
  seeds, on both axes), and the experiment's reference accuracies
  (:data:`REFERENCE_ACCURACIES`) as horizontal lines: which methods remove the confounder, at
  what cost in accuracy;
- ``probe.png`` (and ``probe.json``): the bias probe of the Baseline and MDN models, module by
  module (:mod:`metanorm_repro.experiments.probe_report`).

Every file is written atomically (:mod:`metanorm_repro.experiments._io`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metanorm_repro.experiments import _io
from metanorm_repro.experiments.bounds import SYNTHETIC_REFERENCE_ACCURACIES
from metanorm_repro.experiments.registry import Experiment
from metanorm_repro.models.methods import method_display_name

__all__ = [
    "REFERENCE_ACCURACIES",
    "first_runs",
    "plot_all",
    "plot_bacc_vs_dcor2",
    "plot_feature_pca",
    "plot_per_epoch",
    "project_2d",
    "pyplot",
]

#: Reference accuracies drawn as horizontal lines in ``bacc_vs_dcor2.png``, by experiment name:
#: ``[(accuracy, label), ...]``. The synthetic experiments': the Bayes accuracies with and
#: without the confounder and the marginal-independence bound
#: (:data:`~metanorm_repro.experiments.bounds.SYNTHETIC_REFERENCE_ACCURACIES`).
REFERENCE_ACCURACIES: dict[str, list[tuple[float, str]]] = {
    "synthetic": SYNTHETIC_REFERENCE_ACCURACIES,
    "synthetic-compare": SYNTHETIC_REFERENCE_ACCURACIES,
}


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or a clear error without it."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "matplotlib is needed for the plots: pip install 'metanorm[plots]'"
        ) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _io.write_bytes(path, buf.getvalue())


def _mean_histories(
    results: Sequence[dict[str, Any]],
) -> dict[int, dict[str, dict[str, np.ndarray]]]:
    """``{batch_size: {method: {column: per-epoch mean over seeds}}}``."""
    acc: dict[int, dict[str, list[list[dict[str, Any]]]]] = {}
    for r in results:
        f = r["final"]
        acc.setdefault(int(f["batch_size"]), {}).setdefault(f["method"], []).append(r["history"])
    out: dict[int, dict[str, dict[str, np.ndarray]]] = {}
    for bs, by_method in acc.items():
        out[bs] = {}
        for method, hists in by_method.items():
            n = min(len(h) for h in hists)
            cols = [k for k in hists[0][0] if isinstance(hists[0][0][k], int | float)]
            out[bs][method] = {
                c: np.mean([[h[e][c] for e in range(n)] for h in hists], axis=0) for c in cols
            }
    return out


def plot_per_epoch(
    results: Sequence[dict[str, Any]],
    path: str | Path,
    prefix: str,
    ylabel: str,
    methods: Sequence[str],
) -> None:
    """One panel per batch size; a line per method and per column starting with ``prefix``."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    hist = _mean_histories(results)
    sizes = sorted(hist, reverse=True)
    fig, axes = plt.subplots(
        1, len(sizes), figsize=(5 * len(sizes), 3.8), squeeze=False, sharey=True
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, bs in zip(axes[0], sizes, strict=True):
        for i, method in enumerate(m for m in methods if m in hist[bs]):
            h = hist[bs][method]
            cols = [c for c in h if c.startswith(prefix)]
            for j, c in enumerate(cols):
                suffix = c[len(prefix) :].lstrip("_")
                label = method_display_name(method) + (
                    f" (class {suffix})" if len(cols) > 1 else ""
                )
                ax.plot(
                    h["epoch"],
                    h[c],
                    styles[j % len(styles)],
                    color=colors[i % len(colors)],
                    label=label,
                    lw=1.5,
                )
        ax.set_title(f"batch size {bs}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    _save(fig, Path(path))
    plt.close(fig)


def project_2d(features: np.ndarray) -> np.ndarray:
    """Rows of ``features`` on their first two principal components (SVD of the centred data)."""
    import torch

    x = torch.as_tensor(np.asarray(features), dtype=torch.float64)
    if x.dim() != 2 or x.shape[0] < 2:
        raise ValueError(f"expected features of shape (n >= 2, D), got {tuple(x.shape)}")
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    proj = x @ vh[:2].T
    if proj.shape[1] < 2:
        proj = torch.cat([proj, torch.zeros(len(proj), 2 - proj.shape[1], dtype=proj.dtype)], 1)
    return proj.numpy()


def plot_feature_pca(
    run_dirs: Sequence[tuple[str, Path]], path: str | Path, confounder: str
) -> None:
    """Test features in 2-D, one column per ``(method, run folder)``, one row per class."""
    plt = pyplot()
    data = []
    for method, d in run_dirs:
        with np.load(Path(d) / "test_features.npz", allow_pickle=False) as z:
            data.append((method, project_2d(z["features"]), z["labels"], z["confounder"]))
    classes = np.unique(np.concatenate([d[2] for d in data]))
    fig, axes = plt.subplots(
        len(classes), len(data), figsize=(3.2 * len(data), 3.0 * len(classes)), squeeze=False
    )
    numeric = all(np.issubdtype(d[3].dtype, np.number) for d in data)
    if numeric:
        lo = min(float(d[3].min()) for d in data)
        hi = max(float(d[3].max()) for d in data)
    sc = None
    for j, (method, proj, labels, conf) in enumerate(data):
        for i, c in enumerate(classes):
            ax = axes[i][j]
            sel = labels == c
            if numeric:
                sc = ax.scatter(
                    proj[sel, 0], proj[sel, 1], c=conf[sel], s=4, cmap="viridis", vmin=lo, vmax=hi
                )
            else:
                codes = np.unique(conf, return_inverse=True)[1]
                ax.scatter(proj[sel, 0], proj[sel, 1], c=codes[sel], s=4, cmap="tab10")
            ax.set_title(f"{method_display_name(method)}, class {c}", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    if sc is not None:
        fig.colorbar(sc, ax=axes, shrink=0.8, label=confounder)
    _save(fig, Path(path))
    plt.close(fig)


def plot_bacc_vs_dcor2(
    rows: Sequence[dict[str, Any]],
    path: str | Path,
    *,
    methods: Sequence[str] | None = None,
    confounder: str = "the confounder",
    reference: Sequence[tuple[float, str]] = (),
) -> Path:
    """Test bAcc against the mean per-class test dcor², one point per method × batch size.

    Args:
        rows: summary rows (:func:`metanorm_repro.experiments.summarize`, ``results.json``'s
            ``"rows"``): ``method``, ``batch_size``, ``test_bacc`` and, when present,
            ``test_bacc_std``, ``test_mean_dcor2`` (+ ``_std``; else the mean of the
            ``test_dcor2_<class>`` columns, without an error bar).
        path: the PNG to write (atomically).
        methods: the order of the methods (their colours). Default: the rows' order.
        confounder: the confounder's name, for the axis label.
        reference: ``[(accuracy, label)]`` drawn as horizontal lines.

    Returns:
        ``path``.
    """
    plt = pyplot()
    if not rows:
        raise ValueError("expected at least one summary row, got none")
    order = list(dict.fromkeys([*(methods or ()), *(r["method"] for r in rows)]))
    order = [m for m in order if any(r["method"] == m for r in rows)]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    sizes = sorted({int(r["batch_size"]) for r in rows}, reverse=True)
    markers = "os^vDP*X"
    fig, ax = plt.subplots(figsize=(8.0, 5.5))
    for acc, label in reference:
        ax.axhline(acc, color="grey", lw=0.8, ls="--", zorder=0)
        ax.annotate(
            f"{label} ({acc:.3f})",
            (1.0, acc),
            xycoords=("axes fraction", "data"),
            xytext=(-3, 2),
            textcoords="offset points",
            ha="right",
            fontsize=7,
            color="grey",
        )
    for i, method in enumerate(order):
        for j, bs in enumerate(sizes):
            sel = [r for r in rows if r["method"] == method and int(r["batch_size"]) == bs]
            if not sel:
                continue
            r = sel[0]
            x, xerr = _mean_dcor2(r)
            y, yerr = float(r["test_bacc"]), float(r.get("test_bacc_std") or 0.0)
            ax.errorbar(
                [x],
                [y],
                xerr=[xerr],
                yerr=[yerr],
                fmt=markers[j % len(markers)],
                color=colors[i % len(colors)],
                capsize=2,
                ms=7,
                alpha=0.85,
                label=method_display_name(method) if j == 0 else None,
            )
    # the marker legend: one entry per batch size
    for j, bs in enumerate(sizes):
        ax.plot([], [], markers[j % len(markers)], color="black", label=f"batch {bs}")
    n_seeds = max(int(r.get("seeds", 1)) for r in rows)
    bars = f"; bars: ± std over {n_seeds} seeds" if n_seeds > 1 else ""
    ax.set_xlabel(f"test dcor²(features, {confounder}), mean over the classes")
    ax.set_ylabel("test balanced accuracy")
    ax.set_title(f"Accuracy against dependence on {confounder}{bars}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    out = Path(path)
    _save(fig, out)
    plt.close(fig)
    return out


def _mean_dcor2(row: dict[str, Any]) -> tuple[float, float]:
    """``(mean, std)`` of the row's mean per-class test dcor² (std 0 when not given)."""
    if row.get("test_mean_dcor2") is not None:
        return float(row["test_mean_dcor2"]), float(row.get("test_mean_dcor2_std") or 0.0)
    vals = [
        float(v)
        for k, v in row.items()
        if k.startswith("test_dcor2_") and not k.endswith("_std") and v is not None
    ]
    return (float(np.mean(vals)) if vals else float("nan")), 0.0


def plot_all(
    out_dir: str | Path,
    results: Sequence[dict[str, Any]],
    experiment: Experiment,
    rows: Sequence[dict[str, Any]] | None = None,
) -> list[str]:
    """Writes the plots into ``out_dir``; returns their file names.

    ``bacc_vs_dcor2.png`` is drawn when ``rows`` (the sweep's summary rows) are given and hold
    more than one method.
    """
    out = Path(out_dir)
    methods = list(experiment.methods) + sorted(
        {r["final"]["method"] for r in results} - set(experiment.methods)
    )
    plot_per_epoch(
        results,
        out / "dcor2_per_epoch.png",
        "val_dcor2",
        f"val dcor²(fc1, {experiment.confounder})",
        methods,
    )
    plot_per_epoch(
        results,
        out / "val_bacc_per_epoch.png",
        "val_balanced_accuracy",
        "val balanced accuracy",
        methods,
    )
    first = first_runs(results)
    chosen = {r["final"]["method"]: Path(r["out_dir"]) for r in first}
    order = [m for m in methods if m in chosen]
    plot_feature_pca(
        [(m, chosen[m]) for m in order], out / "features_pca.png", experiment.confounder
    )
    files = ["dcor2_per_epoch.png", "val_bacc_per_epoch.png", "features_pca.png"]
    if rows and len({r["method"] for r in rows}) > 1:
        plot_bacc_vs_dcor2(
            rows,
            out / "bacc_vs_dcor2.png",
            methods=methods,
            confounder=experiment.confounder,
            reference=REFERENCE_ACCURACIES.get(experiment.name, ()),
        )
        files.append("bacc_vs_dcor2.png")
    from metanorm_repro.experiments.probe_report import probe_runs

    files += [f for f in probe_runs(out, first, experiment) if f.endswith(".png")]
    return files


def first_runs(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of the first seed at the largest batch size (one per method), as drawn."""
    bs = max(int(r["final"]["batch_size"]) for r in results)
    seed = min(int(r["final"]["seed"]) for r in results)
    return [
        r for r in results if (int(r["final"]["batch_size"]), int(r["final"]["seed"])) == (bs, seed)
    ]
