r"""The paper's synthetic confounded images (Lu et al., CVPR 2021, §4.1; arXiv 2104.09052).

Each 32×32 one-channel image carries copies of the same fixed 16×16 Gaussian blob ``k``:

- the **main effect** ``mf`` scales the top-left and bottom-right quadrants (``mf·k``),
- the **confounder** ``cf`` scales the bottom-left quadrant (``cf·k``),
- the top-right quadrant is empty,

plus N(0, 0.01²) pixel noise. For label ``y = 0`` both ``mf`` and ``cf`` are drawn from U(1, 4),
for ``y = 1`` from U(3, 6), independently. So both variables separate the classes equally well:
a classifier using ``mf`` alone reaches the Bayes accuracy 1 − ½·⅓ ≈ 83.3 %, one that also uses
the confounder reaches 1 − ½·(⅓)² ≈ 94.4 %. A confounder-free model should sit near 83 %.

The blob. The reference implementation builds a 16-pixel blob "over ±5 standard deviations":
the interval [−5σ, 5σ] is cut into 16 equal pixels (each 10σ/16 = 0.625σ wide) and a pixel's
weight is the standard normal probability mass of its interval. Equivalently, with a pixel as the
unit, σ = 16/10 = 1.6 pixels and the blob spans ±8 pixels = ±5σ around the centre of the
quadrant (which lies on a pixel boundary). The 2-D blob is the outer product of the 1-D one,
normalised to sum 1; its peak is about 0.055, so an image's largest value is about 6 × 0.055 ≈ 0.33.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from metanorm.datasets._base import DataSplit

__all__ = [
    "BAYES_ACCURACY_MF",
    "BAYES_ACCURACY_MF_CF",
    "gaussian_blob",
    "make_synthetic",
    "make_synthetic_splits",
    "render_split",
]

IMAGE_SIZE = 32
BLOB_SIZE = 16
BLOB_NSIG = 5.0
NOISE_SD = 0.01
#: Bayes accuracy from the main effect alone (the confounder-free target), 1 − ½·⅓.
BAYES_ACCURACY_MF = 1 - 0.5 / 3
#: Bayes accuracy from main effect and confounder together, 1 − ½·(⅓)².
BAYES_ACCURACY_MF_CF = 1 - 0.5 / 9
#: Ranges of U(low, high) for mf and cf, per label.
RANGES = {0: (1.0, 4.0), 1: (3.0, 6.0)}


def gaussian_blob(size: int = BLOB_SIZE, nsig: float = BLOB_NSIG) -> np.ndarray:
    """The separable Gaussian blob of the data recipe, normalised to sum 1.

    Args:
        size: pixels per side. Default: 16.
        nsig: the blob spans ``[-nsig·σ, nsig·σ]`` (so σ = size / (2·nsig) pixels). Default: 5.

    Returns:
        float64 array ``(size, size)``: pixel ``(i, j)`` holds the product of the standard normal
        masses of the i-th and j-th of ``size`` equal intervals of ``[-nsig, nsig]``.
    """
    if size < 1 or nsig <= 0:
        raise ValueError(f"expected size >= 1 and nsig > 0, got size={size}, nsig={nsig}")
    edges = np.linspace(-nsig, nsig, size + 1)
    cdf = np.array([0.5 * (1.0 + math.erf(e / math.sqrt(2.0))) for e in edges])
    k1 = np.diff(cdf)
    k2 = np.outer(k1, k1)
    return k2 / k2.sum()


def _rng(random_state: Any) -> np.random.Generator:
    if isinstance(random_state, np.random.Generator):
        return random_state
    if random_state is None or isinstance(random_state, int | np.integer | np.random.SeedSequence):
        return np.random.default_rng(random_state)
    raise TypeError(
        f"expected random_state to be an int, a numpy Generator, a SeedSequence or None, "
        f"got {type(random_state).__name__}"
    )


def make_synthetic(n_per_class: int = 1000, *, random_state: Any, name: str = "train") -> DataSplit:
    """Generates one split of the synthetic experiment.

    Args:
        n_per_class: images per label (the split has ``2·n_per_class``, label 0 first).
            Default: 1000.
        random_state: int seed, ``numpy.random.Generator`` or ``SeedSequence`` (required: the
            splits must come from different seeds).
        name: the split's name. Default: ``"train"``.

    Returns:
        A :class:`~metanorm.datasets.DataSplit` with float32 images ``(2n, 1, 32, 32)``, int64
        labels ``(2n,)`` and metadata ``{"mf": ..., "cf": ...}`` (float64).

    Examples::

        >>> s = make_synthetic(5, random_state=0)
        >>> tuple(s.images.shape), sorted(s.metadata)
        ((10, 1, 32, 32), ['cf', 'mf'])
    """
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int | np.integer):
        raise TypeError(f"expected n_per_class to be an int, got {type(n_per_class).__name__}")
    if n_per_class < 1:
        raise ValueError(f"expected n_per_class >= 1, got {n_per_class}")
    rng = _rng(random_state)
    n = int(n_per_class)
    labels = np.repeat([0, 1], n)
    low = np.array([RANGES[int(y)][0] for y in labels])
    high = np.array([RANGES[int(y)][1] for y in labels])
    mf = rng.uniform(low, high)
    cf = rng.uniform(low, high)
    return render_split(mf, cf, labels, rng, name)


def render_split(
    mf: np.ndarray, cf: np.ndarray, labels: np.ndarray, rng: np.random.Generator, name: str
) -> DataSplit:
    """The synthetic images of given main effects and confounders, as a split.

    Each image is the blob scaled by ``mf`` in the top-left and bottom-right quadrants and by
    ``cf`` in the bottom-left one, plus N(0, ``NOISE_SD``²) pixel noise drawn from ``rng``.

    Args:
        mf: ``(n,)`` main effect per image.
        cf: ``(n,)`` confounder per image.
        labels: ``(n,)`` int labels.
        rng: the generator of the pixel noise.
        name: the split's name.
    """
    k = gaussian_blob()
    h = BLOB_SIZE
    images = np.zeros((len(labels), 1, IMAGE_SIZE, IMAGE_SIZE))
    images[:, 0, :h, :h] = mf[:, None, None] * k  # top-left: main effect
    images[:, 0, h:, h:] = mf[:, None, None] * k  # bottom-right: main effect
    images[:, 0, h:, :h] = cf[:, None, None] * k  # bottom-left: confounder
    images += rng.normal(0.0, NOISE_SD, size=images.shape)
    return DataSplit(
        images=torch.from_numpy(images.astype(np.float32)),
        labels=torch.from_numpy(labels.astype(np.int64)),
        metadata={"mf": mf, "cf": cf},
        name=name,
    )


def make_synthetic_splits(
    n_per_class: int = 1000, *, seed: int = 0, n_per_class_eval: int | None = None
) -> tuple[DataSplit, DataSplit, DataSplit]:
    """Train, validation and test splits from three independent seeds derived from ``seed``.

    The seeds are ``numpy.random.SeedSequence(seed).spawn(3)``: independent streams, so no split
    reuses another's draws (the reference code reused the training ``mf`` as validation ``cf``).

    Args:
        n_per_class: training images per label. Default: 1000.
        seed: the base seed. Default: 0.
        n_per_class_eval: validation and test images per label. Default: ``n_per_class``.

    Returns:
        ``(train, val, test)``.
    """
    n_eval = n_per_class if n_per_class_eval is None else n_per_class_eval
    seqs = np.random.SeedSequence(seed).spawn(3)
    return (
        make_synthetic(n_per_class, random_state=seqs[0], name="train"),
        make_synthetic(n_eval, random_state=seqs[1], name="val"),
        make_synthetic(n_eval, random_state=seqs[2], name="test"),
    )
