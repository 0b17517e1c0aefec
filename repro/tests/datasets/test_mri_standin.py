import numpy as np
import pytest
import torch

pytest.importorskip(
    "nilearn",
    reason="nilearn not installed (pip install 'metanorm-repro[nilearn]'): no MNI152 template",
)
from scipy import ndimage

from metanorm_repro.datasets import make_multisite_mri_standin
from metanorm_repro.datasets.mri_standin import load_gm_template

SHAPE = (16, 16, 16)
# every effect off: each volume is the template
OFF = {
    "age_effect": 0.0,
    "diagnosis_effect": 0.0,
    "individual_sd": 0.0,
    "site_scale": (1.0, 1.0),
    "site_bias": (0.0, 0.0),
    "site_blur": (0.0, 0.0),
    "site_noise": (0.0, 0.0),
    "association": (0.75, 0.25),
}


def _small(**kw):
    args = {"n_per_site": 8, "n_eval_per_site": 4, "volume_shape": SHAPE, "seed": 0} | kw
    return make_multisite_mri_standin(**args)


def test_shapes_metadata_and_determinism():
    s = _small()
    assert set(s) == {"train", "val", "test", "test_reversed"}
    assert [len(s[k]) for k in ("train", "val", "test", "test_reversed")] == [24, 12, 12, 12]
    tr = s["train"]
    assert tr.images.shape == (24, 1, *SHAPE) and tr.images.dtype == torch.float32
    assert tr.labels.dtype == torch.int64
    assert set(tr.metadata) == {"site", "age", "sex", "diagnosis", "subject"}
    assert sorted(set(tr.metadata["site"])) == ["siteA", "siteB", "siteC"]
    assert set(tr.metadata["sex"]) <= {"F", "M"}
    assert ((tr.metadata["age"] >= 55) & (tr.metadata["age"] <= 85)).all()
    np.testing.assert_array_equal(tr.metadata["diagnosis"], tr.labels.numpy())
    again = _small()
    for k in s:
        torch.testing.assert_close(s[k].images, again[k].images, rtol=0, atol=0)
        np.testing.assert_array_equal(s[k].metadata["age"], again[k].metadata["age"])
    other = _small(seed=1)
    assert not torch.equal(other["train"].images, tr.images)


def test_site_diagnosis_association():
    s = _small(n_per_site=20, n_eval_per_site=10)
    for split, want in (
        ("train", [0.8, 0.5, 0.2]),
        ("val", [0.8, 0.5, 0.2]),
        ("test", [0.5, 0.5, 0.5]),
        ("test_reversed", [0.2, 0.5, 0.8]),
    ):
        y, site = s[split].labels.numpy(), s[split].metadata["site"]
        got = [y[site == k].mean() for k in ("siteA", "siteB", "siteC")]
        np.testing.assert_allclose(got, want, atol=1e-12, err_msg=split)
    with pytest.raises(ValueError, match="even n_eval_per_site"):
        _small(n_eval_per_site=5)
    with pytest.raises(ValueError, match="site_noise"):
        _small(site_noise=(0.1, 0.2))


def test_template_matches_scipy_resampling():
    from nilearn import datasets

    raw = np.asarray(datasets.load_mni152_gm_template(resolution=2).get_fdata(), np.float64)
    zoom = [n / m for n, m in zip(SHAPE, raw.shape, strict=True)]
    want = ndimage.zoom(raw, zoom, order=1, grid_mode=True, mode="grid-constant")
    got = load_gm_template(SHAPE).double().numpy()
    assert got.shape == SHAPE
    # the brain's interior agrees; the borders differ in how the grids' edges are treated
    inner = (slice(2, -2),) * 3
    assert np.corrcoef(got[inner].ravel(), want[inner].ravel())[0, 1] > 0.99
    s = _small(**OFF)
    torch.testing.assert_close(s["train"].images[:, 0], load_gm_template(SHAPE).expand(16, *SHAPE))


def test_age_and_diagnosis_atrophy():
    template = load_gm_template(SHAPE).double()
    brain = template > 0.2
    s = _small(**(OFF | {"age_effect": 0.3}))["train"]
    ratio = s.images[:, 0].double()[:, brain] / template[brain]
    want = 1 - 0.3 * (s.metadata["age"] - 55) / 30
    np.testing.assert_allclose(ratio.numpy(), np.repeat(want[:, None], ratio.shape[1], 1), 1e-5)
    s = _small(**(OFF | {"diagnosis_effect": 0.5}))["train"]
    ratio = (s.images[:, 0].double()[:, brain] / template[brain]).numpy()
    sick, healthy = ratio[s.labels.numpy() == 1], ratio[s.labels.numpy() == 0]
    np.testing.assert_allclose(healthy, 1.0, rtol=1e-5)
    assert np.allclose(sick, sick[0], rtol=1e-5)  # the same fixed regional mask for everyone
    assert sick.min() < 0.7 and sick.max() > 0.999  # a strong local loss, none far away


def test_site_effects():
    template = load_gm_template(SHAPE)
    kw = OFF | {"site_scale": (1.0, 2.0)}
    img = _small(**kw)["train"]
    is_b = img.metadata["site"] == "siteB"
    torch.testing.assert_close(img.images[is_b, 0], 2 * template.expand(int(is_b.sum()), *SHAPE))
    # blur: scipy's Gaussian filter (nearest = replicate edges, same radius); sigma scales with
    # the volume side (2.0 voxels at 32³ is 1.0 at 16³)
    img = _small(**(OFF | {"site_blur": (0.0, 2.0)}))["train"]
    want = ndimage.gaussian_filter(template.double().numpy(), 1.0, mode="nearest", truncate=3.0)
    is_b = img.metadata["site"] == "siteB"
    np.testing.assert_allclose(img.images[is_b, 0][0].numpy(), want, atol=1e-5)
    torch.testing.assert_close(img.images[~is_b, 0][0], template)
    img = _small(**(OFF | {"site_noise": (0.0, 0.1)}), n_per_site=16)["train"]
    resid = img.images[:, 0] - template
    is_b = img.metadata["site"] == "siteB"
    assert float(resid[~is_b].abs().max()) == 0.0
    assert float(resid[is_b].std()) == pytest.approx(0.1, rel=0.03)
    # bias field: smooth and multiplicative, positive, not constant
    img = _small(**(OFF | {"site_bias": (0.0, 0.5)}))["train"]
    is_b = img.metadata["site"] == "siteB"
    field = img.images[is_b, 0][0][template > 0.2] / template[template > 0.2]
    assert float(field.min()) > 0 and float(field.max() - field.min()) > 0.1
    # the defaults: the sites differ in mean intensity and noise (outside the brain)
    d = make_multisite_mri_standin(n_per_site=6, n_eval_per_site=2, volume_shape=SHAPE)["train"]
    site = d.metadata["site"]
    means = [float(d.images[site == k].mean()) for k in ("siteA", "siteB", "siteC")]
    assert means[1] > 1.1 * means[0] > 1.1 * means[2]
    corner = d.images[:, 0, :2, :2, :2].flatten(1).std(1).numpy()
    sds = [corner[site == k].mean() for k in ("siteA", "siteB", "siteC")]
    assert sds[0] < sds[1] < sds[2]
