r"""A regression variant of the paper's synthetic images, with exact error bounds.

The images are those of :mod:`metanorm_repro.datasets.synthetic` (the main effect ``mf`` scales the
top-left and bottom-right quadrants' Gaussian blob, the confounder ``cf`` the bottom-left one,
plus N(0, 0.01²) pixel noise); the target is continuous. The joint law, Gaussian so that the
bounds are in closed form:

.. math::
    t \sim N(\mu, s^2), \qquad mf = t + e_m,\ e_m \sim N(0, \sigma_m^2), \qquad
    cf = t + e_c,\ e_c \sim N(0, \sigma_c^2),

with ``t``, ``e_m``, ``e_c`` independent (defaults μ = 3.5, s = 1, σ_m = σ_c = 0.5). The target
is the main effect's true value; the image shows it measured with noise (``mf``), and the
confounder is a second, equally good measurement of it, which a model should not use. As in the
classification task, ``mf`` and ``cf`` are independent *given the target*: a confounder-free model
(a function of ``mf`` only) has features independent of ``cf`` given ``t``.

Exact minimal mean squared errors (the posterior variances of a Gaussian target):

- from ``mf`` alone: :math:`(1/s^2 + 1/\sigma_m^2)^{-1}` (0.2 by default, R² = 0.8);
- from ``mf`` and ``cf``: :math:`(1/s^2 + 1/\sigma_m^2 + 1/\sigma_c^2)^{-1}` (1/9 ≈ 0.111,
  R² ≈ 0.889);

see :func:`regression_bounds`. These bounds are for ``(mf, cf)`` known exactly; the image adds
pixel noise, so a model of the image can only do (slightly) worse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from metanorm_repro.datasets.synthetic import _rng, render_split

__all__ = [
    "RegressionBounds",
    "RegressionLaw",
    "RegressionSplit",
    "make_synthetic_regression",
    "regression_bounds",
]


@dataclass(frozen=True)
class RegressionLaw:
    """Parameters of the joint law of the module docstring.

    Attributes:
        mean: μ, the target's mean. Default: 3.5 (the middle of the classification task's 1–6).
        sd: s, the target's standard deviation. Default: 1.
        sd_mf: σ_m, the noise of the main effect shown in the image. Default: 0.5.
        sd_cf: σ_c, the noise of the confounder. Default: 0.5.
    """

    mean: float = 3.5
    sd: float = 1.0
    sd_mf: float = 0.5
    sd_cf: float = 0.5

    def __post_init__(self) -> None:
        for name in ("sd", "sd_mf", "sd_cf"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and np.isfinite(v) and v > 0):
                raise ValueError(f"expected {name} to be a finite number > 0, got {v!r}")
        if not np.isfinite(self.mean):
            raise ValueError(f"expected a finite mean, got {self.mean!r}")


@dataclass(frozen=True)
class RegressionBounds:
    """Exact minimal mean squared errors of the target, and the matching R².

    Attributes:
        mse_none: the target's variance (predicting its mean).
        mse_mf: the least MSE from the main effect alone (the confounder-free target).
        mse_mf_cf: the least MSE from the main effect and the confounder.
        r2_mf: ``1 − mse_mf / mse_none``.
        r2_mf_cf: ``1 − mse_mf_cf / mse_none``.
    """

    mse_none: float
    mse_mf: float
    mse_mf_cf: float
    r2_mf: float
    r2_mf_cf: float


def regression_bounds(law: RegressionLaw | None = None) -> RegressionBounds:
    """The exact minimal MSEs of the law (posterior variances of the Gaussian target).

    Examples::

        >>> b = regression_bounds()
        >>> round(b.mse_mf, 4), round(b.mse_mf_cf, 4), round(b.r2_mf, 3), round(b.r2_mf_cf, 3)
        (0.2, 0.1111, 0.8, 0.889)
    """
    law = law or RegressionLaw()
    p0, pm, pc = law.sd**-2, law.sd_mf**-2, law.sd_cf**-2
    var = law.sd**2
    mf, both = 1.0 / (p0 + pm), 1.0 / (p0 + pm + pc)
    return RegressionBounds(var, mf, both, 1 - mf / var, 1 - both / var)


@dataclass
class RegressionSplit:
    """One split of the synthetic regression task.

    Attributes:
        images: float32 tensor ``(N, 1, 32, 32)``.
        target: float64 array ``(N,)``, the target ``t``.
        metadata: ``{"mf": ..., "cf": ...}``, float64 arrays ``(N,)``.
        name: the split's name.
    """

    images: torch.Tensor
    target: np.ndarray
    metadata: dict[str, np.ndarray] = field(default_factory=dict)
    name: str = "train"

    def __len__(self) -> int:
        return int(self.images.shape[0])


def make_synthetic_regression(
    n: int = 1000,
    *,
    random_state: Any,
    law: RegressionLaw | None = None,
    name: str = "train",
) -> RegressionSplit:
    """Generates one split of the synthetic regression task.

    Args:
        n: number of images. Default: 1000.
        random_state: int seed, ``numpy.random.Generator`` or ``SeedSequence`` (required).
        law: the :class:`RegressionLaw`. Default: its defaults.
        name: the split's name. Default: ``"train"``.

    Returns:
        A :class:`RegressionSplit`.

    Examples::

        >>> s = make_synthetic_regression(8, random_state=0)
        >>> tuple(s.images.shape), s.target.shape, sorted(s.metadata)
        ((8, 1, 32, 32), (8,), ['cf', 'mf'])
    """
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise TypeError(f"expected n to be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"expected n >= 1, got {n}")
    law = law or RegressionLaw()
    rng = _rng(random_state)
    t = rng.normal(law.mean, law.sd, int(n))
    mf = t + rng.normal(0.0, law.sd_mf, int(n))
    cf = t + rng.normal(0.0, law.sd_cf, int(n))
    images = render_split(mf, cf, np.zeros(int(n), dtype=np.int64), rng, name).images
    return RegressionSplit(images=images, target=t, metadata={"mf": mf, "cf": cf}, name=name)
