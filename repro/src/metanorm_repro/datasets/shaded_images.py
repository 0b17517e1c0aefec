"""The shaded-images stand-in for GS-PPB.

The shaded-images stand-in for GS-PPB: a hard binary pair of real images with an injected
*shade* confounder that agrees with the label in training and validation, is independent of it
at test, and (optionally) reversed in a second test set.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from metanorm.datasets._base import DataSplit, to_float_images
from metanorm.datasets._files import split_indices
from metanorm_repro.datasets.fashion_mnist import load_fashion_mnist
from metanorm_repro.datasets.mnist_5k import load_mnist_5k

__all__ = [
    "SHADE_MODES",
    "SHADE_RANGES",
    "apply_shade",
    "draw_shades",
    "make_shaded_images",
]

#: Shade ranges (low, high) of the recipe: class 0, class 1, and the independent test range.
SHADE_RANGES = {"class0": (1.0, 4.0), "class1": (3.0, 6.0), "independent": (1.0, 6.0)}
_SHADE_MODES = ("associated", "independent", "reversed")


def draw_shades(labels: np.ndarray, mode: str, rng: np.random.Generator) -> np.ndarray:
    """Draws the shade confounder c for each label (the recipe of the synthetic experiment).

    Args:
        labels: ``(n,)`` array of 0/1 labels.
        mode: ``"associated"``: c ~ U(1, 4) for y = 0 and U(3, 6) for y = 1 (train/validation);
            ``"independent"``: c ~ U(1, 6) whatever y (test); ``"reversed"``: c ~ U(3, 6) for
            y = 0 and U(1, 4) for y = 1 (the shortcut now points the wrong way).
        rng: the random generator.

    Returns:
        float64 ``(n,)`` shades in [1, 6].
    """
    if mode not in _SHADE_MODES:
        raise ValueError(f"expected mode in {_SHADE_MODES}, got {mode!r}")
    y = np.asarray(labels)
    if y.ndim != 1 or not np.isin(y, (0, 1)).all():
        raise ValueError(f"expected a 1-D array of 0/1 labels, got shape {y.shape}")
    lo0, hi0 = SHADE_RANGES["class0"]
    lo1, hi1 = SHADE_RANGES["class1"]
    if mode == "independent":
        lo, hi = SHADE_RANGES["independent"]
        return np.asarray(rng.uniform(lo, hi, size=y.shape[0]))
    if mode == "reversed":
        (lo0, hi0), (lo1, hi1) = (lo1, hi1), (lo0, hi0)
    u = rng.uniform(0.0, 1.0, size=y.shape[0])
    return np.where(y == 0, lo0 + u * (hi0 - lo0), lo1 + u * (hi1 - lo1))


SHADE_MODES = ("contrast", "patch")


def apply_shade(
    images: torch.Tensor, shade: np.ndarray, strength: float = 0.15, mode: str = "contrast"
) -> torch.Tensor:
    """Lets the shade c ∈ [1, 6] act on each image's intensity.

    - ``"contrast"``: darkens the whole image, ``x · (1 − strength · (c − 1))``: a global,
      multiplicative intensity change, as a darker skin shade under the same lighting. The
      factor runs from 1 (c = 1) down to ``1 − 5·strength`` (0.25 at the default).
    - ``"patch"``: adds a shade swatch in the top-left corner (empty in these images), a
      Gaussian blob (σ = 2 px, centre 3 px from both edges) of peak ``c / 6``, then clips to
      [0, 1]: an additive, localised effect like the synthetic experiment's confounder quadrant.

    Either way a per-image, label-independent transformation that a model *can* ignore.

    Args:
        images: float ``(n, C, H, W)`` in [0, 1].
        shade: ``(n,)`` shades.
        strength: darkening per unit of shade for ``"contrast"``, in (0, 0.2). Default: 0.15.
        mode: ``"contrast"`` or ``"patch"``. Default: ``"contrast"``.

    Returns:
        The shaded images, same shape and dtype.
    """
    if mode not in SHADE_MODES:
        raise ValueError(f"expected mode in {SHADE_MODES}, got {mode!r}")
    if not 0.0 < strength < 0.2:
        raise ValueError(f"expected strength in (0, 0.2) (factor > 0 at c = 6), got {strength}")
    c = torch.as_tensor(np.asarray(shade), dtype=images.dtype)
    if c.shape != (images.shape[0],):
        raise ValueError(f"expected {images.shape[0]} shades, got shape {tuple(c.shape)}")
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (n, C, H, W), got {tuple(images.shape)}")
    if mode == "contrast":
        factor = 1.0 - strength * (c - 1.0)
        return images * factor.view(-1, 1, 1, 1)
    h, w = images.shape[-2:]
    yy = torch.arange(h, dtype=images.dtype).view(-1, 1)
    xx = torch.arange(w, dtype=images.dtype).view(1, -1)
    blob = torch.exp(-((yy - 3.0) ** 2 + (xx - 3.0) ** 2) / (2 * 2.0**2))
    return (images + (c / 6.0).view(-1, 1, 1, 1) * blob).clamp(0.0, 1.0)


def _shade_bins(shade: np.ndarray) -> np.ndarray:
    """Shade bins 1..5: [1, 2), [2, 3), [3, 4), [4, 5), [5, 6]."""
    return np.clip(np.floor(shade), 1, 5).astype(np.int64)


def _pick(labels: np.ndarray, cls: int, n: int, rng: np.random.Generator, what: str) -> np.ndarray:
    idx = np.flatnonzero(labels == cls)
    if n > idx.size:
        raise ValueError(f"{what}: asked for {n} images of class {cls}, only {idx.size} available")
    return np.sort(rng.choice(idx, size=n, replace=False))


def make_shaded_images(
    *,
    source: str = "fashion-mnist",
    classes: Sequence[int] | None = None,
    n_train: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    reversed_test: bool = True,
    shade_mode: str = "patch",
    strength: float = 0.15,
    seed: int = 0,
    path: str | os.PathLike[str] | None = None,
) -> dict[str, DataSplit]:
    """The shaded-images stand-in for GS-PPB: real images, a binary label, a shade confounder.

    Two classes that a small CNN finds hard to tell apart (Fashion-MNIST shirt vs T-shirt by
    default) get label 0 and 1. Each image is darkened by a shade c (:func:`.apply_shade`) drawn as
    in the synthetic experiment: associated with the label in train and validation (c ~ U(1, 4)
    for y = 0, U(3, 6) for y = 1: shade alone predicts y 83 % of the time), independent at test
    (U(1, 6)), and reversed in ``"test_reversed"``. Classes are balanced in every split. A model
    that learns the shade as a shortcut loses accuracy on the independent test set and more on
    the reversed one.

    Args:
        source: ``"fashion-mnist"`` (train/validation from its training file, test from its test
            file) or ``"mnist-5k"`` (one file, split disjointly).
        classes: ``(class of y=0, class of y=1)`` in the source's labels. Default: ``(0, 6)``
            (T-shirt/top vs Shirt) for Fashion-MNIST, ``(4, 9)`` for MNIST.
        n_train: training images (even: half per class). Default: 4000 for Fashion-MNIST, 500
            for MNIST 5k (which has 500 images per digit).
        n_val: validation images. Default: 1000 (Fashion-MNIST), 200 (MNIST 5k).
        n_test: test images. Default: 2000 (Fashion-MNIST, its whole test file for the pair),
            300 (MNIST 5k).
        reversed_test: also return ``"test_reversed"`` (the same test images, reversed shades).
        shade_mode: how the shade acts, ``"patch"`` (an additive corner swatch of intensity
            c/6) or ``"contrast"`` (global darkening); see :func:`.apply_shade`. Default:
            ``"patch"``. Note: MDN removes the *linear* effect of c from the features; the
            multiplicative ``"contrast"`` shade makes the features depend on c × content,
            which a linear removal at one layer only partly removes (see the README).
        strength: darkening per unit of shade for ``"contrast"``, see :func:`.apply_shade`.
        seed: seed of every random choice (images, shades).
        path: the source's files: the Fashion-MNIST folder or the MNIST 5k CSV (default: where
            their packages install them; :mod:`~metanorm_repro.datasets.fashion_mnist`,
            :mod:`~metanorm_repro.datasets.mnist_5k`).

    Returns:
        ``{"train", "val", "test"[, "test_reversed"]}`` → :class:`~metanorm.datasets.DataSplit`
        with images float32 ``(n, 1, 28, 28)`` in [0, 1], labels 0/1 and metadata
        ``{"shade": float64 c, "shade_bin": int64 bin 1..5 ([1,2), …, [5,6])}``.

    Raises:
        DataNotFoundError: the source's files are missing (the message names the install).

    Examples::

        >>> splits = make_shaded_images(n_train=200, n_val=100, n_test=100)  # doctest: +SKIP
        >>> splits["train"].metadata["shade"][:3]  # doctest: +SKIP
    """
    if source == "fashion-mnist":
        default: tuple[int, ...] = (0, 6)
        sizes = (4000, 1000, 2000)
    elif source == "mnist-5k":
        default = (4, 9)
        sizes = (500, 200, 300)
    else:
        raise ValueError(f"expected source 'fashion-mnist' or 'mnist-5k', got {source!r}")
    if shade_mode not in SHADE_MODES:
        raise ValueError(f"expected shade_mode in {SHADE_MODES}, got {shade_mode!r}")
    n_train = sizes[0] if n_train is None else n_train
    n_val = sizes[1] if n_val is None else n_val
    n_test = sizes[2] if n_test is None else n_test
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 2 or n % 2:
            raise ValueError(f"expected {name} to be an even int >= 2, got {n!r}")
    pair = tuple(int(c) for c in (default if classes is None else classes))
    if len(pair) != 2 or pair[0] == pair[1] or not all(0 <= c <= 9 for c in pair):
        raise ValueError(f"expected two different classes in 0..9, got {classes!r}")
    rng = np.random.default_rng(seed)

    if source == "fashion-mnist":
        tr_x, tr_y = load_fashion_mnist("train", path)
        te_x, te_y = load_fashion_mnist("test", path)
        fit_pools = [
            _pick(tr_y, c, (n_train + n_val) // 2, rng, "Fashion-MNIST train") for c in pair
        ]
        test_pools = [_pick(te_y, c, n_test // 2, rng, "Fashion-MNIST test") for c in pair]
        fit_x, test_x = tr_x, te_x
    else:
        all_x, all_y = load_mnist_5k(path)
        half = (n_train + n_val + n_test) // 2
        pools = [_pick(all_y, c, half, rng, "MNIST 5k") for c in pair]
        fit_pools = [p[: (n_train + n_val) // 2] for p in (rng.permutation(q) for q in pools)]
        used = [set(p.tolist()) for p in fit_pools]
        test_pools = [
            np.array(sorted(set(q.tolist()) - u)) for q, u in zip(pools, used, strict=True)
        ]
        fit_x = test_x = all_x

    def build(
        x: np.ndarray,
        per_class: list[np.ndarray],
        mode: str,
        name: str,
        shade_rng: np.random.Generator,
    ) -> tuple[DataSplit, torch.Tensor]:
        idx = np.concatenate(per_class)
        y = np.concatenate([np.full(len(p), k, dtype=np.int64) for k, p in enumerate(per_class)])
        order = shade_rng.permutation(len(idx))
        idx, y = idx[order], y[order]
        clean = to_float_images(x[idx], 255.0)
        shade = draw_shades(y, mode, shade_rng)
        split = DataSplit(
            apply_shade(clean, shade, strength, shade_mode),
            torch.as_tensor(y),
            {"shade": shade, "shade_bin": _shade_bins(shade)},
            name,
        )
        return split, clean

    # train/validation partition per class, then one shade stream per split
    tr_parts, va_parts = [], []
    for p in fit_pools:
        a, b = split_indices(len(p), (n_train / (n_train + n_val), n_val / (n_train + n_val)), rng)
        tr_parts.append(p[a])
        va_parts.append(p[b])
    seeds = rng.integers(0, 2**63 - 1, size=4)
    out: dict[str, DataSplit] = {}
    out["train"], _ = build(fit_x, tr_parts, "associated", "train", np.random.default_rng(seeds[0]))
    out["val"], _ = build(fit_x, va_parts, "associated", "val", np.random.default_rng(seeds[1]))
    test, clean = build(test_x, test_pools, "independent", "test", np.random.default_rng(seeds[2]))
    out["test"] = test
    if reversed_test:
        shade = draw_shades(test.labels.numpy(), "reversed", np.random.default_rng(seeds[3]))
        out["test_reversed"] = DataSplit(
            apply_shade(clean, shade, strength, shade_mode),
            test.labels.clone(),
            {"shade": shade, "shade_bin": _shade_bins(shade)},
            "test_reversed",
        )
    return out
