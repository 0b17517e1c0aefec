import numpy as np
import pytest
import torch
from standin_layouts import needs_fashion, needs_mnist5k

from metanorm_repro.datasets.shaded_images import apply_shade, draw_shades, make_shaded_images


def test_draw_shades_recipe():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 20000)
    c = draw_shades(y, "associated", rng)
    assert c[y == 0].min() >= 1 and c[y == 0].max() <= 4
    assert c[y == 1].min() >= 3 and c[y == 1].max() <= 6
    assert abs(c[y == 0].mean() - 2.5) < 0.03 and abs(c[y == 1].mean() - 4.5) < 0.03
    # shade alone predicts the label with Bayes accuracy 1 - 1/2 * 1/3 = 5/6
    assert abs(((c > 3.5) == y).mean() - 5 / 6) < 0.01
    r = draw_shades(y, "reversed", rng)
    assert r[y == 0].min() >= 3 and r[y == 1].max() <= 4
    i = draw_shades(y, "independent", rng)
    assert abs(np.corrcoef(i, y)[0, 1]) < 0.03 and i.min() >= 1 and i.max() <= 6
    with pytest.raises(ValueError, match="mode"):
        draw_shades(y, "other", rng)
    with pytest.raises(ValueError, match="0/1"):
        draw_shades(np.array([0, 2]), "associated", rng)


def test_apply_shade_modes():
    x = torch.rand(3, 1, 28, 28) * 0.5
    x[:, :, :8, :8] = 0
    c = np.array([1.0, 3.5, 6.0])
    out = apply_shade(x, c, 0.15, "contrast")
    torch.testing.assert_close(out, x * torch.tensor([1.0, 0.625, 0.25]).view(-1, 1, 1, 1))
    p = apply_shade(x, c, mode="patch")
    torch.testing.assert_close(p[:, :, 3, 3], torch.tensor(c / 6, dtype=torch.float32)[:, None])
    far = (slice(None), slice(None), slice(14, None), slice(14, None))
    assert (p[far] - x[far]).abs().max() < 1e-6  # the swatch stays in its corner
    with pytest.raises(ValueError, match="shades"):
        apply_shade(x, c[:2])
    with pytest.raises(ValueError, match="strength"):
        apply_shade(x, c, 0.3)
    with pytest.raises(ValueError, match="mode"):
        apply_shade(x, c, mode="tint")


def _unshade(images: torch.Tensor) -> np.ndarray:
    """Undoes the contrast shade: every image scaled to max 1, rounded for hashing."""
    flat = images.flatten(1)
    return np.round((flat / flat.amax(1, keepdim=True)).numpy(), 3)


@needs_fashion
def test_shaded_fashion_mnist_splits():
    s = make_shaded_images(n_train=200, n_val=100, n_test=100, shade_mode="contrast", seed=3)
    assert set(s) == {"train", "val", "test", "test_reversed"}
    for name, n in (("train", 200), ("val", 100), ("test", 100), ("test_reversed", 100)):
        sp = s[name]
        assert sp.images.shape == (n, 1, 28, 28) and sp.images.dtype == torch.float32
        assert sp.labels.sum().item() == n // 2
        assert sp.images.min() >= 0 and sp.images.max() <= 1
        shade, y = sp.metadata["shade"], sp.labels.numpy()
        np.testing.assert_array_equal(sp.metadata["shade_bin"], np.clip(np.floor(shade), 1, 5))
        if name in ("train", "val"):
            assert shade[y == 0].max() <= 4 and shade[y == 1].min() >= 3
        if name == "test_reversed":
            assert shade[y == 0].min() >= 3 and shade[y == 1].max() <= 4
    # the reversed test holds the same images as the test, shaded otherwise
    np.testing.assert_allclose(_unshade(s["test"].images), _unshade(s["test_reversed"].images))
    torch.testing.assert_close(s["test"].labels, s["test_reversed"].labels)
    # no image is in two splits
    keys = {k: {r.tobytes() for r in _unshade(s[k].images)} for k in ("train", "val", "test")}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
    # seeded
    again = make_shaded_images(n_train=200, n_val=100, n_test=100, shade_mode="contrast", seed=3)
    torch.testing.assert_close(again["train"].images, s["train"].images)
    other = make_shaded_images(n_train=200, n_val=100, n_test=100, shade_mode="contrast", seed=4)
    assert not torch.equal(other["train"].images, s["train"].images)


@needs_fashion
def test_shaded_images_bad_arguments():
    with pytest.raises(ValueError, match="n_train"):
        make_shaded_images(n_train=201)
    with pytest.raises(ValueError, match="classes"):
        make_shaded_images(classes=(3, 3))
    with pytest.raises(ValueError, match="source"):
        make_shaded_images(source="cifar")
    with pytest.raises(ValueError, match="available"):
        make_shaded_images(n_test=4000)


@needs_mnist5k
def test_shaded_mnist_disjoint():
    s = make_shaded_images(source="mnist-5k", shade_mode="patch", reversed_test=False)
    assert set(s) == {"train", "val", "test"}
    assert [len(s[k]) for k in ("train", "val", "test")] == [500, 200, 300]
    corner = s["train"].images[:, 0, 3, 3].numpy()
    np.testing.assert_allclose(corner, np.minimum(s["train"].metadata["shade"] / 6, 1), atol=1e-6)
    # all 1000 digits of the pair used once: MNIST 5k has 500 per digit
    blank = [s[k].images.clone() for k in ("train", "val", "test")]
    for b in blank:
        b[:, :, :10, :10] = 0
    rows = [{r.numpy().tobytes() for r in b.flatten(1)} for b in blank]
    assert sum(len(r) for r in rows) == 1000
    assert len(rows[0] | rows[1] | rows[2]) == 1000
