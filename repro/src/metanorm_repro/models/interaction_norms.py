r"""Candidate layers for metadata effects that a linear removal cannot reach.

MDN removes the part of a layer's features that is *linear* in the design's metadata columns.
An effect of the form metadata × content — a contrast change ``x · s(c)``, a scanner's style —
is not of that form: after a convolution the features are ``s(c) · g(x)`` (plus a bias), whose
dependence on ``c`` varies with the content ``g(x)`` the network computes. Two layers here try
to reach such effects; ``docs/failures.md`` measures them.

- :class:`metanorm.nn.MetadataScaleNorm` (re-exported here): the multiplicative analogue of
  MDN, which divides out the metadata's part of each channel's scale (``log σ`` regressed on
  the design rows with the paper's batch estimator).
- :class:`PolynomialMetadataNorm`: a :class:`~metanorm.nn.MetadataNorm` whose design is the
  given one with the square of each non-binary removed column appended (removed too), so that
  an effect quadratic in the metadata is regressed out as well. The layer squares the batch's
  rows itself, so the model passes the usual ``(m, K)`` rows.

Why not metadata × label columns: the only content known before training is the label, and a
``c × y`` column cannot be *removed* (the label is unknown at evaluation; the kept columns are
multiplied by nothing there), while *keeping* it only moves the removed slope from the pooled
within-class slope to class 0's (or, centred, to the class average): the class-specific part of
the effect stays in the features either way.

Examples::

    >>> import numpy as np, torch
    >>> from metanorm.design import make_design
    >>> rng = np.random.default_rng(0)
    >>> d = make_design({"y": rng.integers(0, 2, 64), "c": rng.uniform(1, 6, 64)}, keep=["y"])
    >>> layer = MetadataScaleNorm(4, d)
    >>> layer(torch.randn(8, 4, 5, 5), d.tensor()[:8]).shape
    torch.Size([8, 4, 5, 5])
    >>> PolynomialMetadataNorm(6, d).design_columns
    ('y', 'c', 'intercept', 'c^2')
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from metanorm.design import Design
from metanorm.nn import MetadataNorm
from metanorm.nn import MetadataScaleNorm as MetadataScaleNorm

__all__ = ["FAILURE_METHODS", "PolynomialMetadataNorm", "squared_columns"]


def _check_design(design: Any) -> Design:
    if not isinstance(design, Design):
        raise TypeError(
            f"expected the training design as a metanorm.design.Design, got {type(design).__name__}"
        )
    return design


def _metadata_columns(design: Design) -> list[int]:
    """Removed columns other than the intercept (the metadata)."""
    return [k for k in design.remove if design.columns[k] != "intercept"]


def squared_columns(design: Design) -> list[int]:
    """The metadata columns of ``design`` whose square is not collinear with the column itself.

    That is every removed, non-intercept column with more than two distinct values (a one-hot or
    binary column equals its square).

    Examples::

        >>> d = Design(np.array([[0, 1.5, 1, 1], [1, 2.0, 0, 1], [1, 3.0, 1, 1]]),
        ...            ("y", "c", "site=b", "intercept"), keep=(0,))
        >>> squared_columns(d)
        [1]
    """
    _check_design(design)
    return [k for k in _metadata_columns(design) if len(np.unique(design.matrix[:, k])) > 2]


class PolynomialMetadataNorm(nn.Module):
    r"""MetadataNorm over the design with the squares of its continuous metadata columns added.

    Args:
        num_features: D, the flattened per-sample size (as :class:`~metanorm.nn.MetadataNorm`).
        design: the WHOLE training set's :class:`~metanorm.design.Design` (``[y, c, 1]``, ...).
        momentum: running-β momentum. Default: 0.1.
        **kwargs: further keyword arguments of :class:`~metanorm.nn.MetadataNorm`.

    Shape:
        - Input: ``(m, *)`` features and ``(m, K)`` design rows of the ORIGINAL design.
        - Output: same shape as the features.

    Raises:
        TypeError: ``design`` is not a :class:`~metanorm.design.Design`.
    """

    takes_metadata = True

    def __init__(
        self, num_features: int, design: Design, momentum: float | None = 0.1, **kwargs: Any
    ) -> None:
        super().__init__()
        design = _check_design(design)
        self.squared: tuple[int, ...] = tuple(squared_columns(design))
        names = tuple(f"{design.columns[k]}^2" for k in self.squared)
        matrix = np.hstack([design.matrix, design.matrix[:, list(self.squared)] ** 2])
        expanded = Design(matrix, design.columns + names, keep=design.keep)
        self.design_columns: tuple[str, ...] = expanded.columns
        self.num_columns = design.shape[1]
        self.mdn = MetadataNorm(num_features, expanded, momentum=momentum, **kwargs)

    def expand(self, metadata: Tensor) -> Tensor:
        """The batch's rows with the squared columns appended, ``(m, K + len(squared))``."""
        if metadata.dim() != 2 or metadata.shape[1] != self.num_columns:
            raise ValueError(
                f"expected design rows of shape (m, {self.num_columns}), got "
                f"{tuple(metadata.shape)}"
            )
        if not self.squared:
            return metadata
        return torch.cat([metadata, metadata[:, list(self.squared)] ** 2], dim=1)

    def forward(self, input: Tensor, metadata: Tensor) -> Tensor:
        """Returns the residual of ``input`` (see the class docstring)."""
        out: Tensor = self.mdn(input, self.expand(metadata))
        return out

    def extra_repr(self) -> str:  # noqa: D102 (nn.Module hook)
        return f"squared={list(self.squared)}"


#: The candidate fixes of ``docs/failures.md``, methods of :mod:`metanorm_repro.models.methods`
#: (the failures study and the real-data experiments run them):
#:
#: ====================  ==========================================  =======================
#: name                  hidden slots (convs / first MLP layer)      features slot
#: ====================  ==========================================  =======================
#: ``"mdn-cw"``          MetadataNorm(C, channelwise=True) on conv   MetadataNorm
#:                       maps (β of K×C); flattened MDN on vectors
#: ``"mdn-poly"``        the model's base                            PolynomialMetadataNorm
#: ``"mdn-scale"``       MetadataScaleNorm, then the model's base    MetadataNorm
#: ``"mdn+brnet-cond"``  the model's base                            MetadataNorm, and the
#:                                                                   BR-Net-cond objective
#: ====================  ==========================================  =======================
#:
#: ``"mdn-ls"`` (MetadataLocationScaleNorm, then the model's base; MetadataNorm on the features)
#: is a method of every experiment too, but not one of these (no study runs it by default).
FAILURE_METHODS: tuple[str, ...] = ("mdn-cw", "mdn-poly", "mdn-scale", "mdn+brnet-cond")
