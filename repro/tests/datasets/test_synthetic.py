import numpy as np
import pytest
import torch

from metanorm.datasets import DataSplit
from metanorm_repro.datasets.synthetic import (
    BAYES_ACCURACY_MF,
    BAYES_ACCURACY_MF_CF,
    gaussian_blob,
    make_synthetic,
    make_synthetic_splits,
)


def test_blob_matches_normal_masses_over_five_sd():
    stats = pytest.importorskip("scipy.stats")
    k = gaussian_blob()
    assert k.shape == (16, 16)
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    edges = np.linspace(-5, 5, 17)  # 16 pixels of 0.625 sd each: sigma = 1.6 px
    k1 = np.diff(stats.norm.cdf(edges))
    np.testing.assert_allclose(k, np.outer(k1, k1) / np.outer(k1, k1).sum(), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(k, k.T)
    np.testing.assert_allclose(k, k[::-1, ::-1])
    assert np.unravel_index(k.argmax(), k.shape) in {(7, 7), (7, 8), (8, 7), (8, 8)}


def _quadrants(img):
    return img[:16, :16], img[:16, 16:], img[16:, :16], img[16:, 16:]  # TL, TR, BL, BR


def test_quadrant_structure_and_ranges():
    s = make_synthetic(50, random_state=3)
    assert isinstance(s, DataSplit)
    assert s.images.shape == (100, 1, 32, 32) and s.images.dtype == torch.float32
    assert s.labels.dtype == torch.int64 and s.labels.tolist() == [0] * 50 + [1] * 50
    mf, cf, y = s.metadata["mf"], s.metadata["cf"], s.labels.numpy()
    for v in (mf, cf):
        assert v.min() >= 1 and v[y == 0].max() <= 4
        assert v[y == 1].min() >= 3 and v.max() <= 6
    k = gaussian_blob()
    imgs = s.images[:, 0].double().numpy()
    # least-squares amplitude of the kernel in each quadrant recovers mf / cf up to the noise,
    # whose effect on the amplitude has sd 0.01 / ||k||
    amp = {
        q: np.array([(_quadrants(im)[j] * k).sum() / (k * k).sum() for im in imgs])
        for j, q in enumerate(("tl", "tr", "bl", "br"))
    }
    sd = 0.01 / np.sqrt((k * k).sum())
    for q, truth in (("tl", mf), ("br", mf), ("bl", cf), ("tr", np.zeros(100))):
        err = amp[q] - truth
        assert abs(err.mean()) < 4 * sd / 10, q
        assert err.std() == pytest.approx(sd, rel=0.25), q
    # what is left after removing the blobs is N(0, 0.01^2) noise, and TR is noise only
    resid = imgs.copy()
    resid[:, :16, :16] -= mf[:, None, None] * k
    resid[:, 16:, 16:] -= mf[:, None, None] * k
    resid[:, 16:, :16] -= cf[:, None, None] * k
    assert resid.std() == pytest.approx(0.01, rel=0.03)
    assert abs(resid.mean()) < 1e-3
    assert imgs[:, :16, 16:].std() == pytest.approx(0.01, rel=0.05)


def test_mf_and_cf_are_independent_within_class():
    s = make_synthetic(2000, random_state=0)
    y = s.labels.numpy()
    for c in (0, 1):
        r = np.corrcoef(s.metadata["mf"][y == c], s.metadata["cf"][y == c])[0, 1]
        assert abs(r) < 0.06


def test_seeds_reproducible_and_splits_independent():
    a, b = make_synthetic(30, random_state=7), make_synthetic(30, random_state=7)
    assert torch.equal(a.images, b.images)
    np.testing.assert_array_equal(a.metadata["cf"], b.metadata["cf"])
    assert not torch.equal(a.images, make_synthetic(30, random_state=8).images)
    tr, va, te = make_synthetic_splits(300, seed=1)
    assert (tr.name, va.name, te.name) == ("train", "val", "test")
    cols = [s.metadata[c] for s in (tr, va, te) for c in ("mf", "cf")]
    for i in range(len(cols)):
        for j in range(i + 1, len(cols)):
            assert not np.allclose(cols[i], cols[j])
    # the reference code's bug: validation cf reused the training mf; here they are unrelated
    # within class
    y = tr.labels.numpy()
    for c in (0, 1):
        r = np.corrcoef(tr.metadata["mf"][y == c], va.metadata["cf"][y == c])[0, 1]
        assert abs(r) < 0.2
    tr2, _, _ = make_synthetic_splits(300, seed=1)
    assert torch.equal(tr.images, tr2.images)
    assert not torch.equal(tr.images, make_synthetic_splits(300, seed=2)[0].images)
    assert len(make_synthetic_splits(10, seed=0, n_per_class_eval=4)[2]) == 8


def test_bayes_rates_with_and_without_confounder():
    lm = pytest.importorskip("sklearn.linear_model")
    tr = make_synthetic(2000, random_state=11)
    te = make_synthetic(2000, random_state=12)

    def acc(cols):
        x_tr = np.column_stack([tr.metadata[c] for c in cols])
        x_te = np.column_stack([te.metadata[c] for c in cols])
        clf = lm.LogisticRegression().fit(x_tr, tr.labels.numpy())
        return clf.score(x_te, te.labels.numpy())

    assert acc(["mf"]) == pytest.approx(BAYES_ACCURACY_MF, abs=0.015)
    assert acc(["mf", "cf"]) == pytest.approx(BAYES_ACCURACY_MF_CF, abs=0.015)
    assert pytest.approx(5 / 6) == BAYES_ACCURACY_MF
    assert pytest.approx(17 / 18) == BAYES_ACCURACY_MF_CF


@pytest.mark.parametrize(
    ("n", "rs", "exc"),
    [(0, 0, ValueError), (2.5, 0, TypeError), (True, 0, TypeError), (5, "seed", TypeError)],
)
def test_bad_arguments(n, rs, exc):
    with pytest.raises(exc, match="expected"):
        make_synthetic(n, random_state=rs)
