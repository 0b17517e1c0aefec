"""Models whose MDN layers receive each batch's metadata.

``nn.Sequential`` passes one tensor from layer to layer, so it cannot hand metadata to a
:class:`~metanorm.nn.MetadataNorm`. :class:`MetadataSequential` can: its ``forward(input,
metadata)`` passes the metadata, explicitly, to every child that takes it. For models that are not
a plain chain, write ``forward(self, x, metadata)`` and call each MDN layer as ``mdn(h, metadata)``.
"""

from __future__ import annotations

from torch import Tensor, nn

from metanorm.nn.metadata_norm import MetadataNorm

__all__ = ["MetadataSequential", "takes_metadata"]


def takes_metadata(module: nn.Module) -> bool:
    """True for modules whose ``forward`` is ``forward(input, metadata)``.

    That is :class:`MetadataNorm`, :class:`MetadataSequential`, and any module with a true class
    attribute ``takes_metadata``.

    Examples::

        >>> import torch
        >>> from metanorm.nn import MetadataNorm
        >>> takes_metadata(MetadataNorm(4, num_metadata=2)), takes_metadata(torch.nn.ReLU())
        (True, False)
    """
    return isinstance(module, MetadataNorm | MetadataSequential) or bool(
        getattr(module, "takes_metadata", False)
    )


class MetadataSequential(nn.Sequential):
    r"""A sequential container that routes the batch's metadata to its MDN layers.

    Children that take metadata (see :func:`takes_metadata`) are called as
    ``child(x, metadata)``; every other child as ``child(x)``.

    Shape:
        - Input: whatever the first child takes, with batch size m.
        - Metadata: :math:`(m, K)` design rows of the batch; omitted: the rows in scope.
        - Output: whatever the last child returns.

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> from metanorm.nn import MetadataNorm, MetadataSequential
        >>> design = torch.cat([torch.randn(500, 1), torch.ones(500, 1)], dim=1)
        >>> model = MetadataSequential(
        ...     nn.Linear(10, 32), MetadataNorm(32, design, keep=()), nn.ReLU(), nn.Linear(32, 1))
        >>> model(torch.randn(8, 10), design[:8]).shape
        torch.Size([8, 1])
    """

    takes_metadata = True

    def forward(self, input: Tensor, metadata: Tensor | None = None) -> Tensor:
        """Runs the children in order, passing ``metadata`` to those that take it.

        ``metadata=None`` (omitted): the MDN children take the rows in scope (see
        :class:`metanorm.nn.MetadataModel`), so the container can sit in a converted model.
        """
        for module in self:
            input = module(input, metadata) if takes_metadata(module) else module(input)
        return input
