r"""The synthetic task with a confounder whose association with the label shifts (continual stages).

The images are the paper's synthetic images (:mod:`metanorm_repro.datasets.synthetic`: the main
effect ``mf`` in two quadrants, the confounder ``cf`` in a third, the same blob and pixel noise).
``mf``
is drawn as in the paper: U(1, 4) for ``y = 0`` and U(3, 6) for ``y = 1``. The confounder's
association with the label is a number ``a`` in [−1, 1]:

.. math::
    cf \mid y \sim U(c_y - 1.5,\ c_y + 1.5), \qquad c_0 = 3.5 - a, \quad c_1 = 3.5 + a

so ``a = 1`` is the paper's confounder (U(1, 4) and U(3, 6)), ``a = 0`` a confounder independent
of the label (U(2, 5) for both) and ``a = −1`` the paper's association reversed. ``cf`` stays in
[1, 6] for every ``a``. The Bayes accuracy from ``mf`` alone is 83.3 % at every stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from metanorm.datasets._base import DataSplit
from metanorm_repro.datasets.synthetic import RANGES, _rng, render_split

__all__ = ["CONTINUAL_ASSOCIATIONS", "make_shifted_synthetic", "make_shifting_stages"]

#: The default schedule of the association ``a``, stage by stage: from the paper's confounder
#: to its reverse, in equal steps.
CONTINUAL_ASSOCIATIONS: tuple[float, ...] = (1.0, 0.5, 0.0, -0.5, -1.0)


def make_shifted_synthetic(
    n_per_class: int, *, association: float, random_state: Any, name: str = "train"
) -> DataSplit:
    """One split of the synthetic task with confounder association ``association``.

    Args:
        n_per_class: images per label (label 0 first).
        association: ``a`` in [−1, 1] (see the module docstring).
        random_state: int seed, ``numpy.random.Generator`` or ``SeedSequence``.
        name: the split's name.

    Returns:
        A :class:`~metanorm.datasets.DataSplit` like those of
        :func:`~metanorm_repro.datasets.synthetic.make_synthetic` (metadata ``{"mf", "cf"}``).

    Examples::

        >>> s = make_shifted_synthetic(200, association=-1.0, random_state=0)
        >>> bool(s.metadata["cf"][:200].mean() > s.metadata["cf"][200:].mean())
        True
    """
    if isinstance(n_per_class, bool) or not isinstance(n_per_class, int) or n_per_class < 1:
        raise ValueError(f"expected n_per_class to be a positive int, got {n_per_class!r}")
    if isinstance(association, bool) or not isinstance(association, int | float):
        raise TypeError(f"expected association to be a number, got {association!r}")
    if not -1.0 <= association <= 1.0:
        raise ValueError(f"expected association in [-1, 1], got {association}")
    rng = _rng(random_state)
    n = n_per_class
    labels = np.repeat([0, 1], n)
    low = np.array([RANGES[int(y)][0] for y in labels])
    high = np.array([RANGES[int(y)][1] for y in labels])
    mf = rng.uniform(low, high)
    centre = np.where(labels == 1, 3.5 + association, 3.5 - association)
    cf = rng.uniform(centre - 1.5, centre + 1.5)
    return render_split(mf, cf, labels, rng, name)


def make_shifting_stages(
    n_per_class: int,
    *,
    associations: Sequence[float] = CONTINUAL_ASSOCIATIONS,
    seed: int = 0,
    n_per_class_eval: int | None = None,
) -> list[tuple[DataSplit, DataSplit]]:
    """``(train, val)`` of every stage, from independent seeds derived from ``seed``.

    Args:
        n_per_class: training images per label and stage.
        associations: the association ``a`` of each stage. Default:
            :data:`CONTINUAL_ASSOCIATIONS`.
        seed: the base seed. Default: 0.
        n_per_class_eval: validation images per label and stage. Default: ``n_per_class``.
    """
    if len(associations) < 1:
        raise ValueError("expected at least one stage (associations is empty)")
    n_eval = n_per_class if n_per_class_eval is None else n_per_class_eval
    seqs = np.random.SeedSequence(seed).spawn(2 * len(associations))
    return [
        (
            make_shifted_synthetic(
                n_per_class, association=a, random_state=seqs[2 * i], name=f"train{i + 1}"
            ),
            make_shifted_synthetic(
                n_eval, association=a, random_state=seqs[2 * i + 1], name=f"val{i + 1}"
            ),
        )
        for i, a in enumerate(associations)
    ]
