"""The GLM algebra: Σ⁻¹, batch statistics, full-data β, against closed forms."""

import numpy as np
import pytest
import torch

from metanorm import linalg
from metanorm.design import make_design


def test_inverse_gram_is_float64_inverse(rng):
    x = rng.normal(size=(50, 4)).astype(np.float32)
    k = linalg.inverse_gram(x)
    assert k.dtype == torch.float64
    xd = x.astype(np.float64)
    np.testing.assert_allclose(k.numpy(), np.linalg.inv(xd.T @ xd), rtol=1e-10)


def test_inverse_gram_names_collinear_columns(rng):
    n = 40
    site = rng.choice(["a", "b"], n)
    d = make_design({"site": site, "dup": (site == "b").astype(float), "age": rng.normal(size=n)})
    with pytest.raises(
        ValueError, match=r"columns 'site=b', 'dup', 'intercept' are \(nearly\) collinear"
    ):
        linalg.inverse_gram(d)
    with pytest.raises(ValueError, match="'x' is all zeros"):
        linalg.inverse_gram(np.c_[np.zeros(5), np.ones(5)], columns=["x", "one"])
    with pytest.raises(ValueError, match=r"N = 2 rows for K = 3 columns"):
        linalg.inverse_gram(rng.normal(size=(2, 3)))
    k = linalg.inverse_gram(d, ridge=0.5)
    np.testing.assert_allclose(
        k.numpy(), np.linalg.inv(d.matrix.T @ d.matrix + 0.5 * np.eye(4)), rtol=1e-10
    )
    with pytest.raises(ValueError, match="non-negative"):
        linalg.inverse_gram(d, ridge=-1)


def test_statistics_summed_over_shards_give_one_big_batch(rng):
    x = rng.normal(size=(90, 3))
    f = rng.normal(size=(90, 5))
    xt, ft = torch.tensor(x), torch.tensor(f)
    gram_inverse = linalg.inverse_gram(x)
    whole = linalg.beta_from_statistics(
        gram_inverse, linalg.batch_statistics(xt[:60], ft[:60]), 60, 90
    )
    shards = [linalg.batch_statistics(xt[i : i + 20], ft[i : i + 20]) for i in (0, 20, 40)]
    summed = linalg.beta_from_statistics(gram_inverse, sum(shards), 60, 90)
    torch.testing.assert_close(summed, whole, atol=1e-12, rtol=0)
    # and a full pass is the least-squares β
    full = linalg.beta_from_statistics(gram_inverse, linalg.batch_statistics(xt, ft), 90, 90)
    np.testing.assert_allclose(full.numpy(), np.linalg.lstsq(x, f, rcond=None)[0], atol=1e-12)
    np.testing.assert_allclose(linalg.fit_beta(x, f).numpy(), full.numpy(), atol=1e-12)


def test_fit_beta_errors(rng):
    with pytest.raises(ValueError, match="expected features with 10 rows"):
        linalg.fit_beta(rng.normal(size=(10, 2)), rng.normal(size=(9, 3)))
    with pytest.raises(ValueError, match="expected features to be finite"):
        linalg.fit_beta(rng.normal(size=(10, 2)), np.full((10, 3), np.nan))
    with pytest.raises(TypeError, match="numeric"):
        linalg.fit_beta(rng.normal(size=(10, 2)), np.array([["a"] * 3] * 10))


@pytest.mark.parametrize("k", [1, 2, 4, 5])
@pytest.mark.parametrize("shape", [(200, 84), (64, 2048)])  # below and above the large-output cut
def test_subtract_product_equals_the_matrix_product(k, shape):
    # the CPU's few-column form (K <= 4, >= 65,536 output values: K addcmul passes) and addmm
    # give x - a b to float32 rounding, with the same gradients
    from metanorm.linalg import subtract_product

    g = torch.Generator().manual_seed(k)
    m, d = shape
    x = torch.randn(m, d, generator=g, requires_grad=True)
    a = torch.randn(m, k, generator=g, requires_grad=True)
    b = torch.randn(k, d, generator=g, requires_grad=True)
    out = subtract_product(x, a, b)
    want = (x.double() - a.double() @ b.double()).float()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    grad = torch.randn(m, d, generator=g)
    got = torch.autograd.grad(out, (x, a, b), grad)
    ref = torch.autograd.grad(torch.addmm(x, a, b, alpha=-1), (x, a, b), grad)
    for u, v in zip(got, ref, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)
