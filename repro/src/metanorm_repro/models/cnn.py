r"""The small CNN of the paper's synthetic experiment, with a choice of normalization.

Lu et al., "Metadata Normalization", CVPR 2021 (arXiv 2104.09052), §4.1::

    conv 1→16 (5×5) → [norm1] → ReLU → conv 16→32 (5×5) → [norm2] → ReLU → flatten
    → fc 84 → [norm3] → ReLU → fc 1 (a logit; the loss applies the sigmoid)

``norm1`` and ``norm2`` are hidden slots, ``norm3`` the features slot of the method named by
``norm`` (:mod:`metanorm_repro.models.methods`; the model's ``base`` is ``"none"``):

==============  ==============================  ==============================  ================
``norm``        after conv1                     after conv2                     after fc1
==============  ==============================  ==============================  ================
``none``        —                               —                               —
``batchnorm``   ``BatchNorm2d(16)``             ``BatchNorm2d(32)``             ``BatchNorm1d(84)``
``groupnorm``   ``GroupNorm(4, 16)``            ``GroupNorm(4, 32)``            ``GroupNorm(4, 84)``
``mdn-linear``  —                               —                               ``MetadataNorm(84)``
``mdn-conv``    ``MetadataNorm(16·28·28)``      ``MetadataNorm(32·24·24)``      ``MetadataNorm(84)``
==============  ==============================  ==============================  ================

``concat`` (:class:`~metanorm_repro.models.methods.Method`'s ``concat_metadata``) adds no layer:
the classifier fc2 takes ``[ReLU(fc1 features), c]``, ``c`` the batch's confounder columns of the
design rows (:func:`~metanorm_repro.models.norms.confounder_columns`, ``cf`` for ``[y, cf, 1]``;
never the kept label). The returned features stay fc1's (84 wide), where dcor² is measured.

``concat-input`` (:class:`~metanorm_repro.models.methods.Method`'s ``input_metadata``) feeds the
same columns to the first conv instead: each is a constant extra image channel, ``(c − mean) / std``
at every pixel (standardised with the training design's mean and standard deviation, so that the
channel has the scale of the image's pixels rather than cf's raw 1..6), so conv1 takes
``in_channels + 1`` channels for ``[y, cf, 1]``.

(``"mdn"`` and ``"mdn-all"`` build the same layers as ``"mdn-linear"`` and ``"mdn-conv"``.)
BatchNorm and GroupNorm sit where MDN-Conv puts MDN, so the comparison is slot for slot. A conv
map is flattened for MDN (one β column per channel × position), as in the paper. The model's
``forward(x, metadata)`` passes the batch's design rows to every slot that takes them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from metanorm_repro.models.methods import create_slot_norm, get_method
from metanorm_repro.models.norms import apply_norm, confounder_columns

__all__ = ["PaperCNN"]


class PaperCNN(nn.Module):
    r"""The synthetic experiment's CNN; returns logits and the fc1 features.

    Args:
        norm: a normalization method (:func:`metanorm_repro.models.methods.list_methods`). Default:
            ``"none"`` (the paper's baseline).
        design: the WHOLE training set's design (``(N, K)`` array/tensor or
            :class:`metanorm.design.Design`); required for the ``mdn-*`` norms, ignored otherwise.
        in_channels: image channels. Default: 1.
        image_size: side of the square input image. Default: 32.
        hidden: width of fc1. Default: 84.
        num_outputs: logits (1 for a binary task with a BCE loss). Default: 1.
        momentum: running-β momentum of the MDN layers. Default: 0.1.
        groups: groups of every GroupNorm. Default: 4.
        **mdn_kwargs: further keyword arguments for :class:`~metanorm.nn.MetadataNorm`
            (``keep``, ``ridge``, ...).

    Shape:
        - Input: :math:`(m, C, S, S)`; metadata :math:`(m, K)` design rows (needed by MDN).
        - Output: ``(logits (m, num_outputs), features (m, hidden))``, the features being fc1's
          output after its norm slot and before the ReLU (where the paper measures dcor²).

    Examples::

        >>> import torch
        >>> model = PaperCNN("batchnorm")
        >>> logits, feats = model(torch.randn(4, 1, 32, 32))
        >>> tuple(logits.shape), tuple(feats.shape)
        ((4, 1), (4, 84))
    """

    input_mean: Tensor
    input_std: Tensor

    def __init__(
        self,
        norm: str = "none",
        design: Any = None,
        *,
        in_channels: int = 1,
        image_size: int = 32,
        hidden: int = 84,
        num_outputs: int = 1,
        momentum: float | None = 0.1,
        groups: int = 4,
        **mdn_kwargs: Any,
    ) -> None:
        super().__init__()
        spec = get_method(norm)
        if spec.needs_design and design is None:
            raise ValueError(f"norm={norm!r} needs the training design (design=...), got None")
        if (spec.concat_metadata or spec.input_metadata) and design is None:
            raise ValueError(f"norm={norm!r} needs the training design (design=...), got None")
        if image_size < 9:
            raise ValueError(f"expected image_size >= 9 (two 5×5 convolutions), got {image_size}")
        self.norm = spec.name
        s1, s2 = image_size - 4, image_size - 8
        c1, c2 = 16, 32
        #: design columns added to the input as constant channels (``concat-input``)
        self.input_columns: tuple[int, ...] = (
            tuple(confounder_columns(design)) if spec.input_metadata else ()
        )
        self.conv1 = nn.Conv2d(in_channels + len(self.input_columns), c1, 5)
        if self.input_columns:
            matrix = torch.as_tensor(np.asarray(design.matrix), dtype=torch.float64)
            cols = matrix[:, list(self.input_columns)]
            self.register_buffer("input_mean", cols.mean(0).float())
            self.register_buffer("input_std", (cols.std(0, correction=0) + 1e-8).float())
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.fc1 = nn.Linear(c2 * s2 * s2, hidden)
        #: design columns appended to fc2's input (``concat``), empty otherwise
        self.concat_columns: tuple[int, ...] = (
            tuple(confounder_columns(design)) if spec.concat_metadata else ()
        )
        self.fc2 = nn.Linear(hidden + len(self.concat_columns), num_outputs)

        def slot(kind: str, shape: tuple[int, ...]) -> nn.Module:
            return create_slot_norm(
                norm,
                shape,
                slot=kind,
                design=design,
                base="none",
                groups=groups,
                momentum=momentum,
                **mdn_kwargs,
            )

        self.norm1 = slot("hidden", (c1, s1, s1))
        self.norm2 = slot("hidden", (c2, s2, s2))
        self.norm3 = slot("features", (hidden,))

    def forward(self, x: Tensor, metadata: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns ``(logits, fc1 features)``; see the class docstring."""
        if self.input_columns:
            meta = self._metadata(metadata)[:, list(self.input_columns)].to(x.dtype)
            meta = (meta - self.input_mean.to(x.dtype)) / self.input_std.to(x.dtype)
            planes = meta[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
            x = torch.cat([x, planes], dim=1)
        h = torch.relu(apply_norm(self.norm1, self.conv1(x), metadata))
        h = torch.relu(apply_norm(self.norm2, self.conv2(h), metadata))
        feats = apply_norm(self.norm3, self.fc1(h.flatten(1)), metadata)
        head = torch.relu(feats)
        if self.concat_columns:
            meta = self._metadata(metadata)[:, list(self.concat_columns)].to(head.dtype)
            head = torch.cat([head, meta], dim=1)
        return self.fc2(head), feats

    def _metadata(self, metadata: Tensor | None) -> Tensor:
        if metadata is None:
            where = "to the features" if self.concat_columns else "to the input as channels"
            raise ValueError(
                f"norm={self.norm!r} adds the metadata {where}: call the model as "
                "model(x, metadata) with the batch's design rows, got metadata=None"
            )
        return metadata

    def extra_repr(self) -> str:  # noqa: D102 (nn.Module hook)
        return f"norm={self.norm!r}"
