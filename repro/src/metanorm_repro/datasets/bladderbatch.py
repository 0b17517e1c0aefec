"""bladderbatch: 57 bladder-tissue gene-expression arrays from 5 processing batches.

The standard ComBat example (Dyrskjøt et al. 2004, via Bioconductor's ``bladderbatch`` package,
Artistic-2.0): 22,283 probe sets (RMA-normalised log2 expression) on 57 Affymetrix arrays
processed in 5 batches that are strongly confounded with the tissue status:

====== ======== ======== ========
batch  Cancer   Normal   Biopsy
====== ======== ======== ========
1      11
2      14       4
3               4
4                        5
5      15                4
====== ======== ======== ========

The data ship inside a Debian package; no R is needed to read them. Install (best effort, into
``${METANORM_DATA:-.data}/bladderbatch``) with ``bash scripts/install-data.sh`` or by hand::

    apt-get download r-bioc-bladderbatch
    dpkg -x r-bioc-bladderbatch_*.deb /tmp/bb
    mkdir -p .data/bladderbatch
    cp /tmp/bb/usr/lib/R/site-library/bladderbatch/data/bladderdata.rda .data/bladderbatch/
    pip install "metanorm-repro[bladderbatch]"      # rdata, to read the .rda file
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["BladderBatch", "find_bladderbatch", "load_bladderbatch"]

FILENAME = "bladderdata.rda"
_R_LIBRARY_FILE = Path("usr/lib/R/site-library/bladderbatch/data") / FILENAME
INSTALL_HINT = (
    "install it with `bash scripts/install-data.sh` (from a metanorm checkout), or by hand: "
    "`apt-get download r-bioc-bladderbatch && dpkg -x r-bioc-bladderbatch_*.deb DIR` and copy "
    f"DIR/{_R_LIBRARY_FILE} to $METANORM_DATA/bladderbatch/ (default .data/bladderbatch/), or "
    "pass path= to the file"
)


@dataclass(frozen=True)
class BladderBatch:
    """The bladderbatch arrays and their annotations.

    Attributes:
        expression: float64 array ``(57, 22283)``: arrays (samples) × probe sets, log2 scale.
        genes: the 22,283 probe-set ids.
        samples: the 57 array ids (``GSM71019.CEL``...).
        batch: int array ``(57,)``, processing batch 1–5.
        status: str array ``(57,)``: ``"Cancer"``, ``"Normal"`` or ``"Biopsy"``.
        outcome: str array ``(57,)``: the finer diagnosis (``"mTCC"``, ``"sTCC+CIS"``...).
        path: the file read.
    """

    expression: np.ndarray
    genes: np.ndarray
    samples: np.ndarray
    batch: np.ndarray
    status: np.ndarray
    outcome: np.ndarray
    path: Path

    def metadata(self) -> Any:
        """The annotations as a pandas DataFrame indexed by array id (batch, status, outcome)."""
        import pandas as pd

        return pd.DataFrame(
            {"batch": self.batch, "status": self.status, "outcome": self.outcome},
            index=pd.Index(self.samples, name="array"),
        )


def _candidates() -> list[Path]:
    out: list[Path] = []
    env = os.environ.get("METANORM_DATA")
    if env:
        out.append(Path(env).expanduser() / "bladderbatch" / FILENAME)
    out.append(Path(".data") / "bladderbatch" / FILENAME)
    repo = Path(__file__).resolve().parents[3]  # a source checkout (editable install)
    if (repo / "pyproject.toml").is_file():
        out.append(repo / ".data" / "bladderbatch" / FILENAME)
    out.append(Path("/") / _R_LIBRARY_FILE)  # `apt-get install r-bioc-bladderbatch`
    return out


def find_bladderbatch(path: str | os.PathLike[str] | None = None) -> Path:
    """Locates ``bladderdata.rda``.

    Args:
        path: the ``.rda`` file, a folder holding it, or a folder where the Debian package was
            extracted. Default: ``$METANORM_DATA/bladderbatch``, then ``.data/bladderbatch`` (in
            the working directory and in the source checkout), then the system R library.

    Returns:
        The path of the file.

    Raises:
        FileNotFoundError: when it is not found; the message names the install command.
    """
    if path is not None:
        if not isinstance(path, str | os.PathLike):
            raise TypeError(f"expected path to be a str or os.PathLike, got {path!r}")
        p = Path(path).expanduser()
        for c in (p, p / FILENAME, p / "bladderbatch" / FILENAME, p / _R_LIBRARY_FILE):
            if c.is_file():
                return c
        raise FileNotFoundError(f"bladderbatch data not found at {p}: {INSTALL_HINT}")
    tried = _candidates()
    for c in tried:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"bladderbatch data not found (looked in {', '.join(map(str, tried))}): {INSTALL_HINT}"
    )


def load_bladderbatch(path: str | os.PathLike[str] | None = None) -> BladderBatch:
    """Loads bladderbatch (57 arrays × 22,283 probe sets, 5 batches, cancer status).

    Args:
        path: where the data are; see :func:`.find_bladderbatch`.

    Returns:
        A :class:`BladderBatch`.

    Raises:
        FileNotFoundError: when the data are not installed (the message says how to install).
        ImportError: when ``rdata`` (the ``bladderbatch`` extra) is missing.
        ValueError: when the file does not hold the expected ExpressionSet.

    Examples::

        >>> from metanorm_repro.datasets import load_bladderbatch
        >>> bb = load_bladderbatch()                             # doctest: +SKIP
        >>> bb.expression.shape, sorted(set(bb.batch.tolist()))  # doctest: +SKIP
        ((57, 22283), [1, 2, 3, 4, 5])
    """
    file = find_bladderbatch(path)
    try:
        import rdata
    except ImportError as exc:
        raise ImportError(
            "reading bladderbatch needs the rdata package: "
            "pip install 'metanorm-repro[bladderbatch]'"
        ) from exc
    with warnings.catch_warnings():  # unknown R classes (ExpressionSet...) come back as objects
        warnings.simplefilter("ignore")
        try:
            eset = rdata.read_rda(str(file))["bladderEset"]
            exprs = eset.assayData["exprs"]
            pheno = eset.phenoData.data
        except (KeyError, AttributeError, TypeError) as exc:
            raise ValueError(
                f"{file} does not hold the bladderbatch ExpressionSet 'bladderEset' with exprs "
                f"and phenoData ({type(exc).__name__}: {exc})"
            ) from exc
    expression = np.asarray(exprs.values, dtype=np.float64).T  # R stores genes × arrays
    samples = np.asarray(exprs.coords[exprs.dims[1]].values).astype(str)
    genes = np.asarray(exprs.coords[exprs.dims[0]].values).astype(str)
    pheno = pheno.loc[list(samples)]
    out = BladderBatch(
        expression=expression,
        genes=genes,
        samples=samples,
        batch=pheno["batch"].to_numpy().astype(np.int64),
        status=pheno["cancer"].astype(str).to_numpy(),
        outcome=pheno["outcome"].astype(str).to_numpy(),
        path=file,
    )
    if out.expression.shape != (len(samples), len(genes)) or not np.isfinite(expression).all():
        raise ValueError(f"{file}: unexpected expression matrix {out.expression.shape}")
    return out
