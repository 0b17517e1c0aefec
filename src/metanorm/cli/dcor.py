"""``metanorm dcor``: how much metadata a set of features still encodes (squared dCor)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from metanorm.metrics import (
    distance_correlation_sqr,
    distance_correlation_test,
    grouped_distance_correlation_sqr,
)

_SUFFIXES = (".npy", ".pt", ".pth", ".csv")


def register(sub: Any) -> None:
    """Adds the ``dcor`` subcommand."""
    p = sub.add_parser(
        "dcor",
        help="squared distance correlation between features and metadata",
        description="Prints the squared distance correlation between FEATURES (one row per "
        "sample) and METADATA (same rows), overall or within each group of --groups. Files are "
        ".npy, .pt (a saved tensor) or .csv (comma-separated; a first line of column names is "
        "skipped; METADATA and LABELS may be text).",
    )
    p.add_argument("features", type=Path, metavar="FEATURES", help="(n, p) features file")
    p.add_argument("metadata", type=Path, metavar="METADATA", help="(n, q) metadata file")
    p.add_argument(
        "--groups",
        type=Path,
        metavar="LABELS",
        help="one label per row (e.g. the class): report dCor² within each group",
    )
    p.add_argument(
        "--unbiased",
        action="store_true",
        help="bias-corrected estimator (the paper's; can be slightly negative; needs n > 3); "
        "default: the biased V-statistic (unbiased=False, as the dcor package)",
    )
    p.add_argument(
        "--categorical",
        action="store_true",
        help="one-hot code METADATA's numeric columns (site or scanner codes); text columns "
        "are always one-hot coded",
    )
    p.add_argument(
        "--permutations",
        type=int,
        default=0,
        metavar="B",
        help="also give a permutation p-value with B permutations (default: 0, none)",
    )
    p.add_argument(
        "--method",
        choices=("exact", "projection"),
        default="exact",
        help="exact (default; O(n²)) or random projections (O(K n log n), with a standard error)",
    )
    p.add_argument(
        "--projections",
        type=int,
        default=None,
        metavar="K",
        help="directions for --method projection (default: 100)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the permutations and projections (default: 0)"
    )
    p.add_argument(
        "--block-size", type=int, default=None, metavar="ROWS", help="rows per distance tile"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def _read_csv(path: Path, labels: bool) -> np.ndarray:
    with path.open(newline="") as fh:
        lines = [line.strip() for line in fh if line.strip()]
    if not lines:
        raise ValueError(f"{path}: expected rows of values, got an empty file")

    def numeric(line: str) -> bool:
        try:
            [float(v) for v in line.split(",")]
        except ValueError:
            return False
        return True

    # a header: a first line that is not numeric, above numbers (or, in a labels file, a line
    # whose text does not occur again below it)
    if not numeric(lines[0]) and (
        len(lines) == 1 or numeric(lines[1]) or (labels and lines[0] not in lines[1:])
    ):
        lines = lines[1:]
    if not lines:
        raise ValueError(f"{path}: expected rows of values below the header line, got none")
    rows = [[v.strip() for v in line.split(",")] for line in lines]
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"{path}: expected the same number of columns on every row, got {widths}")
    if labels:
        arr = np.array(rows, dtype=str)
        try:
            return arr.astype(np.float64)
        except ValueError:
            return arr
    try:
        return np.array(rows, dtype=np.float64)
    except ValueError as exc:
        raise ValueError(f"{path}: expected numbers only ({exc})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_array(path: Path, *, labels: bool = False) -> np.ndarray:
    """Reads ``.npy``, ``.pt``/``.pth`` (a saved tensor or array) or ``.csv`` into an array.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: for an unknown suffix, an unreadable file, content that is not a 1-D or 2-D
            table of finite numbers (text allowed with ``labels``), or no rows; the message
            names the file.
    """
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    suffix = path.suffix.lower()
    data: Any
    if suffix == ".npy":
        try:
            data = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(
                f"{path}: expected a NumPy .npy array file ({_first_line(exc)})"
            ) from None
    elif suffix in (".pt", ".pth"):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises RuntimeError, pickle errors, EOFError, ...
            raise ValueError(
                f"{path}: expected a tensor saved with torch.save ({type(exc).__name__}: "
                f"{_first_line(exc)})"
            ) from None
        if not isinstance(data, torch.Tensor | np.ndarray):
            raise ValueError(f"{path}: expected a saved tensor, got {type(data).__name__}")
    elif suffix == ".csv":
        data = _read_csv(path, labels)
    else:
        raise ValueError(f"{path}: expected a {', '.join(_SUFFIXES)} file, got {suffix or 'none'}")
    if isinstance(data, torch.Tensor):
        data = data.detach().cpu().numpy()
    if data.ndim == 0:
        raise ValueError(f"{path}: expected one row per sample, got a scalar")
    if data.ndim > 2:
        raise ValueError(f"{path}: expected a 1-D or 2-D table, got shape {data.shape}")
    if not labels:
        if data.dtype.kind not in "biuf":
            raise ValueError(f"{path}: expected numbers, got an array of dtype {data.dtype}")
        bad = int(np.size(data) - np.isfinite(data).sum())
        if bad:
            raise ValueError(f"{path}: expected finite numbers, got {bad} NaN or infinite value(s)")
    if data.shape[0] == 0:
        raise ValueError(f"{path}: expected at least one row, got none")
    return data


def _load_metadata(path: Path) -> np.ndarray:
    """Numbers, or (in a .csv file) text such as site names, which the metric one-hot codes."""
    try:
        return load_array(path)
    except ValueError as exc:
        if path.suffix.lower() != ".csv":
            raise
        text = load_array(path, labels=True)
        if text.dtype.kind not in "US":
            raise exc from None
        return text


def run(args: argparse.Namespace) -> int:
    """Computes and prints the value(s); returns 0."""
    feats = load_array(args.features)
    meta = _load_metadata(args.metadata)
    n = feats.shape[0]
    if meta.shape[0] != n:
        raise ValueError(
            f"expected FEATURES and METADATA to have the same number of rows, got {n} "
            f"({args.features}) and {meta.shape[0]} ({args.metadata})"
        )
    if args.permutations < 0:
        raise ValueError(f"expected --permutations >= 0, got {args.permutations}")
    estimator = "unbiased" if args.unbiased else "biased"
    categorical = True if args.categorical else None
    kw: dict[str, Any] = {
        "unbiased": args.unbiased,
        "block_size": args.block_size,
        "categorical": categorical,
    }
    if args.method == "projection" and args.permutations:
        raise ValueError("expected --permutations 0 with --method projection (exact only)")
    est_kw: dict[str, Any] = {"method": args.method}
    if args.method == "projection":
        est_kw.update(num_projections=args.projections, seed=args.seed)
    text_meta = meta.dtype.kind in "US"
    result: dict[str, Any] = {
        "estimator": estimator,
        "method": args.method,
        "unbiased": bool(args.unbiased),
        "metadata": "one-hot" if args.categorical or text_meta else "numeric",
        "n": int(n),
    }
    if args.groups is not None:
        groups = load_array(args.groups, labels=True)
        if groups.shape[0] != n:
            raise ValueError(
                f"expected LABELS to have {n} rows like FEATURES, got {groups.shape[0]} "
                f"({args.groups})"
            )
        values = grouped_distance_correlation_sqr(feats, meta, groups, **kw, **est_kw)
        result["groups"] = {str(k): float(v) for k, v in values.items()}
        if args.method == "projection":
            result["standard_errors"] = {
                str(k): getattr(v, "standard_error", float("nan")) for k, v in values.items()
            }
        if args.permutations:
            g = np.asarray(groups).reshape(n, -1)[:, 0]
            result["pvalues"] = {
                str(k): float("nan")
                if v != v  # a group too small for the estimator: NaN, as its value
                else distance_correlation_test(
                    feats[g == k],
                    meta[g == k],
                    num_permutations=args.permutations,
                    random_state=args.seed,
                    **kw,
                ).pvalue
                for k, v in values.items()
            }
    else:
        if args.permutations:
            test = distance_correlation_test(
                feats, meta, num_permutations=args.permutations, random_state=args.seed, **kw
            )
            result["dcor2"], result["pvalue"] = test.statistic, test.pvalue
        else:
            value = distance_correlation_sqr(feats, meta, **kw, **est_kw)
            result["dcor2"] = float(value)
            if args.method == "projection":
                result["standard_error"] = getattr(value, "standard_error", float("nan"))
    if args.permutations:
        result["permutations"], result["seed"] = args.permutations, args.seed
    if args.json:
        json.dump(result, sys.stdout)
        sys.stdout.write("\n")
        return 0
    name = (
        "bias-corrected (unbiased=True)" if args.unbiased else "biased V-statistic (unbiased=False)"
    )
    print(f"squared distance correlation, {name} estimator, n = {n}, metadata {result['metadata']}")
    if "groups" in result:
        width = max(len(k) for k in result["groups"])
        for k, v in result["groups"].items():
            extra = f"   p = {result['pvalues'][k]:.4g}" if "pvalues" in result else ""
            print(f"  group {k:<{width}s}  {v: .6f}{extra}")
    else:
        extra = f"   p = {result['pvalue']:.4g}" if "pvalue" in result else ""
        if "standard_error" in result:
            extra += f" ± {result['standard_error']:.6f} (SE, {args.method})"
        print(f"  dcor2 = {result['dcor2']:.6f}{extra}")
    if args.permutations:
        print(f"  (permutation p-value: {args.permutations} permutations, seed {args.seed})")
    return 0
