"""The reference accuracies of the synthetic task: the LP bound against brute force and sampling."""

import itertools

import numpy as np
import pytest

from metanorm_repro.datasets.synthetic import RANGES
from metanorm_repro.experiments import bounds as B

pytest.importorskip("scipy", reason="the LP bound needs scipy (ships with scikit-learn)")


def _all_grid_classifiers(levels: tuple[float, ...], n_cells: int) -> np.ndarray:
    return np.array(list(itertools.product(levels, repeat=n_cells)))


def test_lp_value_is_eleven_eighteenths_and_satisfies_the_constraint():
    sol = B.marginal_independence_bound()
    assert sol.value == pytest.approx(11 / 18, abs=1e-9)
    assert sol.value == pytest.approx(B.MARGINAL_INDEPENDENCE_BOUND, abs=1e-9)
    P, _ = B.cell_probabilities()
    cond = B.cf_constraint_matrix(P) @ sol.q.ravel()
    np.testing.assert_allclose(cond, sol.k, atol=1e-9)  # P(ŷ=1 | cf piece) is one constant
    assert ((sol.q >= 0) & (sol.q <= 1)).all()


def test_lp_is_not_beaten_by_brute_force_over_a_grid_of_classifiers():
    P, _ = B.cell_probabilities()
    A = B.cf_constraint_matrix(P)
    Q = _all_grid_classifiers((0.0, 0.5, 1.0), 9)  # 3⁹ randomised classifiers
    acc = 0.5 * (Q @ P[1].ravel() + (1 - Q) @ P[0].ravel())
    cond = Q @ A.T
    feasible = np.ptp(cond, axis=1) < 1e-12
    assert feasible.sum() > 10
    best = acc[feasible].max()
    lp = B.marginal_independence_bound().value
    assert best <= lp + 1e-12
    assert best == pytest.approx(11 / 18, abs=1e-12)  # the grid holds an optimal classifier
    # without the constraint the same grid reaches the Bayes accuracy with cf, 17/18
    assert acc.max() == pytest.approx(B.BAYES_ACCURACY_MF_CF, abs=1e-12)
    # classifiers of mf alone (constant along cf) reach the Bayes accuracy without cf, 5/6
    mf_only = np.all(Q.reshape(-1, 3, 3) == Q.reshape(-1, 3, 3)[:, :, :1], axis=(1, 2))
    assert acc[mf_only].max() == pytest.approx(B.BAYES_ACCURACY_MF, abs=1e-12)


def test_brute_force_on_a_finer_grid_and_the_refined_lp_agree():
    # refine=2: 6×6 cells; random search over feasible-by-construction classifiers
    # never beats the LP, and the refined LP finds the same optimum
    sol2 = B.marginal_independence_bound(refine=2)
    assert sol2.value == pytest.approx(11 / 18, abs=1e-9)
    assert sol2.q.shape == (6, 6)
    P, _ = B.cell_probabilities(2)
    A = B.cf_constraint_matrix(P)
    rng = np.random.default_rng(0)
    Q = rng.random((20000, 36))
    # make P(ŷ=1 | cf piece j) equal to k for every j by scaling each cf column
    k = rng.random((20000, 1)) * 0.5 + 0.25
    cond = Q @ A.T
    Qm = Q.reshape(-1, 6, 6) * (k / cond)[:, None, :]
    ok = (Qm <= 1).all(axis=(1, 2))
    assert ok.sum() > 100
    Qm = Qm[ok].reshape(-1, 36)
    np.testing.assert_allclose(Qm @ A.T, np.broadcast_to(k[ok], (ok.sum(), 6)), atol=1e-9)
    acc = 0.5 * (Qm @ P[1].ravel() + (1 - Qm) @ P[0].ravel())
    assert acc.max() <= sol2.value + 1e-12


def test_monte_carlo_accuracy_and_independence_of_the_lp_classifier():
    sol = B.marginal_independence_bound()
    rng = np.random.default_rng(1)
    n = 200_000
    y = rng.integers(0, 2, n)
    lo = np.array([RANGES[0][0], RANGES[1][0]])[y]
    hi = np.array([RANGES[0][1], RANGES[1][1]])[y]
    mf, cf = rng.uniform(lo, hi), rng.uniform(lo, hi)
    pred = B.classify(sol.q, sol.edges, mf, cf, rng)
    assert (pred == y).mean() == pytest.approx(11 / 18, abs=0.005)  # sd ≈ 0.0011
    # P(ŷ=1 | cf) is flat across 10 equal cf bins (not only the LP's three pieces)
    bins = np.digitize(cf, np.linspace(1, 6, 11)[1:-1])
    rates = np.array([pred[bins == b].mean() for b in range(10)])
    np.testing.assert_allclose(rates, sol.k, atol=0.015)
    # while a confounded rule (threshold on cf) is far from flat: the check can fail
    conf = (cf > 3.5).astype(int)
    assert np.ptp([conf[bins == b].mean() for b in range(10)]) == 1.0


def test_bad_refine_raises():
    with pytest.raises(ValueError, match="refine"):
        B.cell_probabilities(0)
    with pytest.raises(ValueError, match="mf and cf"):
        B.classify(
            np.zeros((3, 3)), np.array(B.PIECE_EDGES), [1.0, 2.0], [1.0], np.random.default_rng()
        )


def test_reference_markdown_names_the_three_figures():
    text = B.reference_markdown()
    for v in ("0.944", "0.833", "0.611"):
        assert v in text


def test_synthetic_reports_show_the_three_reference_accuracies():
    from metanorm_repro.experiments.registry import get_experiment

    for name in ("synthetic", "synthetic-compare"):
        text = get_experiment(name).reference
        for value in ("0.944", "0.833", "0.611"):
            assert value in text, (name, value)
