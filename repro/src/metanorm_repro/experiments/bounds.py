r"""Reference accuracies of the paper's synthetic task, and the bound under marginal independence.

The synthetic generator (:mod:`metanorm_repro.datasets.synthetic`): ``y ∈ {0, 1}`` equiprobable; the
main effect ``mf`` and the confounder ``cf`` are independent given ``y``, each U(1, 4) for
``y = 0`` and U(3, 6) for ``y = 1``. Three reference accuracies (classes are balanced, so
accuracy and balanced accuracy coincide):

- ``BAYES_ACCURACY_MF_CF`` = 17/18 ≈ 0.944: the Bayes classifier using ``mf`` and ``cf``;
- ``BAYES_ACCURACY_MF`` = 5/6 ≈ 0.833: the best classifier whose prediction is independent
  of ``cf`` *given the label* (it uses ``mf`` only), what label-conditional independence allows;
- :data:`MARGINAL_INDEPENDENCE_BOUND` = 11/18 ≈ 0.611: the best accuracy of any (randomised)
  classifier whose prediction is *marginally* independent of ``cf``, i.e. ``P(ŷ = 1 | cf)`` does
  not depend on ``cf``. A method that makes the features marginally independent of the
  confounder cannot beat it. :func:`marginal_independence_bound` computes it by a linear program.

**The linear program.** A randomised classifier is ``q(mf, cf) = P(ŷ = 1 | mf, cf)`` (the pixel
noise is independent of ``y`` given ``(mf, cf)``, so the image adds nothing). Both conditional
densities are constant on the pieces ``[1, 3)``, ``[3, 4]``, ``(4, 6]`` of each axis. On each of
the 3×3 cells the classifier can be replaced by its average over the cell without changing the
accuracy (linear in ``q``, with constant densities on the cell) or breaking the constraint (if
``P(ŷ = 1 | cf = c)`` equals a constant ``k`` for every ``c``, its average over a ``cf`` piece is
``k`` too, and that average is what the averaged classifier gives on the piece). So the optimum
is attained by a piecewise-constant ``q``: 9 variables in [0, 1] plus ``k``, the accuracy
``½ Σ_ij [P(ij | y=1) q_ij + P(ij | y=0)(1 − q_ij)]`` to maximise, and one equality per ``cf``
piece, ``Σ_y P(y | cf ∈ j) Σ_i P(mf ∈ i | y) q_ij = k``. ``refine > 1`` cuts every piece into
``refine`` equal parts (a finer grid, same optimum; the tests check it).

**The closed form.** Given ``cf ∈ [1, 3)`` the label is 0, given ``cf ∈ (4, 6]`` it is 1, each
piece having probability ⅓: together they contribute ``⅓(1 − k) + ⅓k = ⅓`` whatever ``k``. Given
``cf ∈ [3, 4]`` (probability ⅓, labels equiprobable), the best is ``q = 0`` for ``mf < 3``, 1 for
``mf > 4``, and any constant in between, which separates the labels with accuracy 5/6 there and
leaves ``P(ŷ = 1 | cf ∈ [3, 4])`` free in [⅓, ⅔]: ``k`` can match. Total ``⅓ + ⅓·5/6 = 11/18``.

Examples::

    >>> round(MARGINAL_INDEPENDENCE_BOUND, 4)
    0.6111
    >>> print(reference_markdown().splitlines()[0])
    Reference accuracies (exact, from the generator's law):
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from metanorm_repro.datasets.synthetic import BAYES_ACCURACY_MF, BAYES_ACCURACY_MF_CF, RANGES

__all__ = [
    "BAYES_ACCURACY_MF",
    "BAYES_ACCURACY_MF_CF",
    "MARGINAL_INDEPENDENCE_BOUND",
    "PIECE_EDGES",
    "SYNTHETIC_REFERENCE_ACCURACIES",
    "IndependenceBound",
    "accuracy_of",
    "cell_probabilities",
    "cf_constraint_matrix",
    "classify",
    "marginal_independence_bound",
    "reference_markdown",
]

#: The best accuracy when the prediction is marginally independent of ``cf`` (closed form, 11/18).
MARGINAL_INDEPENDENCE_BOUND = 11 / 18
#: Edges of the pieces on which both conditional densities (of ``mf``, and of ``cf``) are constant.
PIECE_EDGES: tuple[float, ...] = (1.0, 3.0, 4.0, 6.0)
#: The reference accuracies of the synthetic task as ``[(accuracy, label), ...]``: the lines of
#: the bAcc-against-dcor² plot of the synthetic experiments.
SYNTHETIC_REFERENCE_ACCURACIES: list[tuple[float, str]] = [
    (BAYES_ACCURACY_MF_CF, "Bayes with cf"),
    (BAYES_ACCURACY_MF, "Bayes without cf"),
    (MARGINAL_INDEPENDENCE_BOUND, "marginal-independence bound"),
]


@dataclass(frozen=True)
class IndependenceBound:
    """The solution of the linear program of :func:`marginal_independence_bound`.

    Attributes:
        value: the optimal accuracy.
        q: ``(n, n)`` array, ``q[i, j] = P(ŷ = 1)`` on the cell ``mf ∈ piece i``, ``cf ∈ piece j``.
        k: the common value of ``P(ŷ = 1 | cf)``.
        edges: the ``n + 1`` edges of the pieces (the same on both axes).
    """

    value: float
    q: np.ndarray
    k: float
    edges: np.ndarray


def _edges(refine: int) -> np.ndarray:
    if isinstance(refine, bool) or not isinstance(refine, int | np.integer) or refine < 1:
        raise ValueError(f"expected refine to be an int >= 1, got {refine!r}")
    parts = [np.linspace(a, b, int(refine) + 1)[:-1] for a, b in itertools.pairwise(PIECE_EDGES)]
    return np.concatenate([*parts, [PIECE_EDGES[-1]]])


def _piece_probabilities(edges: np.ndarray) -> np.ndarray:
    """``(2, n)``: ``P(variable ∈ piece i | y)`` for the uniform law of each label."""
    out = np.zeros((2, len(edges) - 1))
    for y, (lo, hi) in RANGES.items():
        overlap = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None)
        out[y] = overlap / (hi - lo)
    return out


def cell_probabilities(refine: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-label cell probabilities of the generator's law.

    Args:
        refine: parts each of the three pieces is cut into. Default: 1.

    Returns:
        ``(P, edges)``: ``P`` of shape ``(2, n, n)`` with ``P[y, i, j] = P(mf ∈ i, cf ∈ j | y)``
        (``mf`` and ``cf`` independent given ``y``), and the ``n + 1`` edges.

    Examples::

        >>> P, edges = cell_probabilities()
        >>> edges.tolist(), P.sum(axis=(1, 2)).tolist()
        ([1.0, 3.0, 4.0, 6.0], [1.0, 1.0])
    """
    edges = _edges(refine)
    p = _piece_probabilities(edges)
    return p[:, :, None] * p[:, None, :], edges


def accuracy_of(q: np.ndarray, P: np.ndarray) -> float:
    """Exact accuracy of the cellwise classifier ``q`` (``P(ŷ = 1)`` per cell), equal priors."""
    q = np.asarray(q, dtype=np.float64)
    return float(0.5 * ((P[1] * q).sum() + (P[0] * (1.0 - q)).sum()))


def cf_constraint_matrix(P: np.ndarray) -> np.ndarray:
    """``A`` with ``(A @ q.ravel())[j] = P(ŷ = 1 | cf ∈ piece j)`` for a cellwise ``q``.

    ``P(ŷ = 1 | cf ∈ j) = Σ_i P(mf ∈ i, cf ∈ j) q_ij / P(cf ∈ j)`` with the label marginalised.
    """
    joint = 0.5 * (P[0] + P[1])  # P(mf ∈ i, cf ∈ j)
    pcf = joint.sum(axis=0)  # P(cf ∈ j), > 0 for every piece
    n = joint.shape[0]
    A = np.zeros((n, n * n))
    for j in range(n):
        row = np.zeros((n, n))
        row[:, j] = joint[:, j] / pcf[j]
        A[j] = row.ravel()
    return A


def marginal_independence_bound(refine: int = 1) -> IndependenceBound:
    """The best accuracy of a classifier whose prediction is marginally independent of ``cf``.

    Solves the linear program of the module docstring with :func:`scipy.optimize.linprog`
    (scipy is imported here; it ships with scikit-learn).

    Args:
        refine: parts each of the three density pieces is cut into (a finer grid of cells; the
            optimum does not change). Default: 1 (3×3 cells).

    Returns:
        An :class:`IndependenceBound`: the optimal accuracy (11/18 ≈ 0.611) and a classifier that
        attains it.

    Examples::

        >>> sol = marginal_independence_bound()
        >>> round(sol.value, 6) == round(11 / 18, 6), sol.q.shape
        (True, (3, 3))
    """
    try:
        from scipy.optimize import linprog
    except ImportError as exc:  # pragma: no cover - scipy comes with scikit-learn
        raise ImportError("marginal_independence_bound needs scipy (pip install scipy)") from exc
    P, edges = cell_probabilities(refine)
    n = P.shape[1]
    nv = n * n
    # variables: q (n·n) then k; minimise −accuracy (its constant ½ΣP0 dropped)
    c = np.concatenate([-0.5 * (P[1] - P[0]).ravel(), [0.0]])
    A = cf_constraint_matrix(P)
    A_eq = np.hstack([A, -np.ones((n, 1))])
    b_eq = np.zeros(n)
    res = linprog(c, A_eq=A_eq, b_eq=b_eq, bounds=[(0.0, 1.0)] * (nv + 1), method="highs")
    if not res.success:  # pragma: no cover - the program is feasible and bounded
        raise RuntimeError(f"the linear program failed: {res.message}")
    q = np.clip(res.x[:nv].reshape(n, n), 0.0, 1.0)
    return IndependenceBound(value=accuracy_of(q, P), q=q, k=float(res.x[nv]), edges=edges)


def classify(
    q: np.ndarray, edges: np.ndarray, mf: Any, cf: Any, rng: np.random.Generator
) -> np.ndarray:
    """Draws the predictions of the cellwise randomised classifier ``q`` for samples.

    Args:
        q: ``(n, n)`` ``P(ŷ = 1)`` per cell (as :attr:`IndependenceBound.q`).
        edges: the ``n + 1`` cell edges.
        mf: ``(m,)`` main effects.
        cf: ``(m,)`` confounders.
        rng: numpy generator for the randomisation.

    Returns:
        int64 array ``(m,)`` of 0/1 predictions.
    """
    mf, cf = np.asarray(mf, dtype=np.float64), np.asarray(cf, dtype=np.float64)
    if mf.shape != cf.shape or mf.ndim != 1:
        raise ValueError(f"expected mf and cf of one shape (m,), got {mf.shape} and {cf.shape}")
    n = len(edges) - 1
    i = np.clip(np.searchsorted(edges, mf, side="right") - 1, 0, n - 1)
    j = np.clip(np.searchsorted(edges, cf, side="right") - 1, 0, n - 1)
    return (rng.random(mf.shape) < q[i, j]).astype(np.int64)


def reference_markdown() -> str:
    """The three reference accuracies as markdown lines for a synthetic report."""
    return "\n".join(
        [
            "Reference accuracies (exact, from the generator's law):",
            "",
            f"- {BAYES_ACCURACY_MF_CF:.3f}: Bayes, using mf and cf (a confounded model);",
            f"- {BAYES_ACCURACY_MF:.3f}: Bayes without cf, the best a prediction independent of "
            "cf *given the label* allows (the confounder-free target);",
            f"- {MARGINAL_INDEPENDENCE_BOUND:.3f}: the best accuracy of a prediction *marginally* "
            "independent of cf (a linear program over the generator's law, "
            "`metanorm_repro.experiments.bounds`); features made marginally independent of "
            "cf cannot beat it.",
        ]
    )
