"""AnnData (single-cell): regress covariates out of ``adata.X`` while keeping the cell type.

:func:`regress_out` takes scanpy's ``sc.pp.regress_out(adata, keys, layer=None, copy=False)``
signature and adds ``keep``: columns of ``adata.obs`` (the cell type, a condition) that are
estimated jointly with the covariates but not removed, so that the covariates' effect is not
confused with theirs when the two are correlated. It runs
:class:`~metanorm.preprocessing.MetadataResidualizer` on the data matrix: categorical and
continuous keys mix freely (a batch and the library size in one design), categorical ``obs``
columns are one-hot coded, and nothing is converted to float64.

Install with ``pip install "metanorm[anndata]"`` (anndata and scikit-learn). See the guide
"Single-cell: regress out library size and batch while keeping the cell type".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

try:
    import anndata as ad
    import scipy.sparse as sp
except ImportError as exc:  # pragma: no cover - exercised only without anndata
    raise ImportError(
        "metanorm.integrations.anndata needs anndata; install it with "
        "pip install 'metanorm[anndata]'"
    ) from exc

from metanorm.preprocessing import MetadataResidualizer

__all__ = ["regress_out"]


def _names(value: str | Iterable[str], what: str) -> list[str]:
    names = [value] if isinstance(value, str) else list(value)
    for v in names:
        if not isinstance(v, str):
            raise TypeError(f"expected {what} to name columns of adata.obs, got {v!r}")
    return names


def regress_out(
    adata: Any,
    keys: str | Iterable[str],
    keep: str | Iterable[str] = (),
    layer: str | None = None,
    copy: bool = False,
) -> Any:
    r"""Regresses ``adata.obs[keys]`` out of the data matrix, keeping ``adata.obs[keep]``.

    Fits :math:`X = D\beta + R` by least squares, with the design :math:`D` = [keys, keep,
    intercept] (categorical columns one-hot coded with a dropped reference level, continuous
    ones standardised), and returns :math:`X - D_{keys}\beta_{keys} - \beta_{intercept}`: the
    keys' effect and the mean are removed, the kept columns' effect stays. Without ``keep`` this
    is what ``sc.pp.regress_out(adata, keys)`` computes (with categorical keys too, which scanpy
    handles one gene at a time and cannot mix with continuous ones).

    Args:
        adata: an ``anndata.AnnData``.
        keys: ``adata.obs`` columns to regress out, e.g. ``["n_counts", "percent_mito"]`` or
            ``"batch"``. Columns of ``category``, string or bool dtype are one-hot coded; a
            batch coded as integers must be made categorical first
            (``adata.obs["batch"] = adata.obs["batch"].astype("category")``).
        keep: ``adata.obs`` columns estimated but not removed, e.g. ``("cell_type",)``.
            Default: ``()``.
        layer: the layer to correct instead of ``adata.X``. Default: ``None``.
        copy: return a corrected copy instead of correcting ``adata`` in place. Default:
            ``False``.

    Returns:
        The corrected copy when ``copy``, else ``None``. The corrected matrix is dense (as
        scanpy's), of the input's float dtype (float32 for integer counts); a dense float input
        corrected in place is overwritten without another copy.

    Raises:
        TypeError: when ``adata`` is not an AnnData.
        ValueError: a key missing from ``adata.obs``, NaN in a key or in the matrix, a design
            that cannot be solved (the message names the columns).

    Examples::

        >>> import anndata as ad, numpy as np, pandas as pd
        >>> rng = np.random.default_rng(0)
        >>> obs = pd.DataFrame({"n_counts": rng.lognormal(8, 0.3, 60),
        ...                     "cell_type": pd.Categorical(rng.choice(["T", "B"], 60))},
        ...                    index=[f"c{i}" for i in range(60)])
        >>> adata = ad.AnnData(rng.normal(size=(60, 5)).astype(np.float32), obs=obs)
        >>> regress_out(adata, ["n_counts"], keep=["cell_type"])
        >>> adata.X.dtype, adata.X.shape
        (dtype('float32'), (60, 5))
    """
    if not isinstance(adata, ad.AnnData):
        raise TypeError(f"expected an anndata.AnnData, got {type(adata).__name__}")
    key_names = _names(keys, "keys")
    keep_names = _names(keep, "keep")
    if not key_names:
        raise ValueError("expected at least one key to regress out, got none")
    both = sorted(set(key_names) & set(keep_names))
    if both:
        raise ValueError(f"columns {both} are in both keys and keep: a column is either")
    missing = [c for c in key_names + keep_names if c not in adata.obs.columns]
    if missing:
        raise ValueError(
            f"keys {missing} not found in adata.obs; its columns are {list(adata.obs.columns)}"
        )
    if layer is not None and layer not in adata.layers:
        raise ValueError(f"layer {layer!r} not found; adata.layers has {list(adata.layers)}")
    if copy:
        adata = adata.copy()
    X = adata.layers[layer] if layer is not None else adata.X
    if X is None:
        raise ValueError("adata.X is None: pass layer= to correct a layer")
    if not sp.issparse(X):
        X = np.asarray(X)
    if X.dtype.kind not in "f":
        X = X.astype(np.float32)  # counts: float32, as scanpy
    res = MetadataResidualizer(columns=key_names, keep=keep_names, copy=False)
    out = res.fit_transform(X, metadata=adata.obs[key_names + keep_names].reset_index(drop=True))
    if layer is not None:
        adata.layers[layer] = out
    else:
        adata.X = out
    return adata if copy else None
