import numpy as np
import pytest
from standin_layouts import needs_two_sites

from metanorm_repro.datasets import make_two_site_digits


@needs_two_sites
def test_two_site_digits_design():
    s = make_two_site_digits(classes=(4, 9), association=0.9, test_per_cell=30, seed=1)
    assert set(s) == {"train", "val", "test", "test_reversed"}
    tr = s["train"]
    assert tr.images.shape[1:] == (1, 28, 28)
    y, site = tr.labels.numpy(), tr.metadata["site"]
    np.testing.assert_array_equal(np.bincount(y), [len(y) // 2] * 2)
    assert abs((site[y == 0] == 0).mean() - 0.9) < 0.03
    assert abs((site[y == 1] == 1).mean() - 0.9) < 0.03
    np.testing.assert_array_equal(tr.metadata["digit"], np.where(y == 0, 4, 9))
    te = s["test"]
    cells = np.bincount(te.labels.numpy() * 2 + te.metadata["site"])
    np.testing.assert_array_equal(cells, [30, 30, 30, 30])
    rv = s["test_reversed"]
    assert len(rv) == 60 and (rv.metadata["site"] != rv.labels.numpy()).all()
    assert float(tr.images.min()) >= 0 and float(tr.images.max()) <= 1
    # both sites are drawn in MNIST's 20x20 box: the 4-pixel margin is empty
    for sp in (tr, te):
        assert float(sp.images[..., :3, :].abs().max()) == 0.0
    # sites are a real scanner difference: optdigits are blurrier (fewer saturated pixels)
    sat = (tr.images.flatten(1) > 0.95).float().mean(1).numpy()
    assert sat[site == 1].mean() > 2 * sat[site == 0].mean()


@needs_two_sites
def test_two_site_digits_multiclass_grid_and_errors():
    s = make_two_site_digits(classes=range(10), image_size=16, noise=0.1, test_per_cell=20)
    tr = s["train"]
    assert tr.images.shape[1:] == (1, 16, 16)
    np.testing.assert_array_equal(np.bincount(s["test"].labels.numpy()), [40] * 10)
    major = (tr.labels.numpy() >= 5).astype(int)
    assert abs((tr.metadata["site"] == major).mean() - 0.9) < 0.03
    with pytest.raises(ValueError, match="association"):
        make_two_site_digits(association=1.0)
    with pytest.raises(ValueError, match="digits"):
        make_two_site_digits(classes=(1,))
    with pytest.raises(ValueError, match="test_per_cell"):
        make_two_site_digits(test_per_cell=400)
