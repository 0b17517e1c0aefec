"""Small models for the real-data experiments: a 2-D CNN, a feature MLP and a 3-D CNN.

Every model here has the same interface, so one training loop serves them all:

- ``model(x, metadata) -> (logits, features)``: ``metadata`` is the batch's design rows
  ``(m, K)`` (ignored, and may be ``None``, unless the model has MDN layers); ``logits`` is
  ``(m, num_classes)`` (cross-entropy; 2 columns for a binary task); ``features`` is the
  penultimate layer's output **after** its normalization and **before** the nonlinearity, the
  ``(m, hidden)`` matrix the bias metric (dcor² with the metadata) is computed on.
- ``norm`` picks the normalization method (:mod:`metanorm_repro.models.methods`); the conv / first
  hidden layers are hidden slots, the penultimate layer the features slot, and the models'
  ``base`` is ``"batchnorm"``:

  ===============  ============================================================================
  ``"none"``       no normalization layer
  ``"batchnorm"``  BatchNorm after every conv/linear layer (the usual model)
  ``"groupnorm"``  GroupNorm after every conv/linear layer
  ``"mdn"``        the usual model with MetadataNorm instead of BatchNorm on the penultimate
                   layer (the paper's GS-PPB / HVU / MRI placement: MDN before the classifier)
  ``"mdn-all"``    MetadataNorm after every conv/linear layer (as the paper's "MDN-Conv")
  ===============  ============================================================================

  The synthetic experiment's names are synonyms: ``"mdn-linear"`` builds ``"mdn"``,
  ``"mdn-conv"`` builds ``"mdn-all"``; the model's ``norm`` attribute holds the canonical name.
  Every other registered method works too: the alternatives to MDN
  (``docs/alternatives.md``) and the candidate fixes of ``docs/failures.md``
  (:mod:`metanorm_repro.models.interaction_norms`: ``"mdn-cw"``, ``"mdn-poly"``, ``"mdn-scale"``,
  ``"mdn+brnet-cond"``).
- Methods that feed the metadata to the model take ``design`` too and read the design rows'
  confounder columns (:func:`~metanorm_repro.models.norms.confounder_columns`: neither kept nor the
  intercept; never the label): ``"concat"`` appends them to the classifier's input,
  ``[ReLU(features), c]`` (the returned features stay the penultimate layer's, without them);
  ``"concat-input"`` adds them to the input, as constant extra channels of an image or volume
  and as extra columns of an MLP's input. The objective methods (``"brnet"``, ``"dann"``,
  ...) build the same layers as the base model; the experiment harness attaches their
  objective (:func:`metanorm_repro.experiments.alternatives.attach_objective`).

  MDN models take ``design``: the **whole** training set's :class:`metanorm.design.Design` (label
  columns kept, metadata and intercept removed), from which each MDN layer stores Σ⁻¹ and N.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metanorm.design import Design
from metanorm.nn import MetadataScaleNorm
from metanorm_repro.models.methods import create_slot_norm, get_method
from metanorm_repro.models.norms import apply_norm, confounder_columns

__all__ = ["StandInCNN", "StandInCNN3d", "StandInMLP"]


class _StandIn(nn.Module):
    """Shared plumbing: builds the norm layer of each slot, applies it with metadata."""

    takes_metadata = True
    fc: nn.Linear
    fc_norm: nn.Module
    head: nn.Linear

    def __init__(
        self, norm: str, design: Design | None, num_classes: int, momentum: float | None
    ) -> None:
        super().__init__()
        spec = get_method(norm)
        concat = spec.concat_metadata
        to_input = spec.input_metadata
        if (spec.needs_design or concat or to_input) and not isinstance(design, Design):
            raise TypeError(
                f"norm={norm!r} needs design=, the whole training set's metanorm.design.Design; "
                f"got {type(design).__name__}"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"expected num_classes to be an int >= 2, got {num_classes!r}")
        self.norm = spec.canonical or spec.name
        self.num_classes = num_classes
        self._design = design
        self._momentum = momentum
        columns = tuple(confounder_columns(design)) if concat or to_input else ()
        #: design columns appended to the classifier's input (``concat``), else empty
        self.concat_columns: tuple[int, ...] = columns if concat else ()
        #: design columns added to the model's input (``concat-input``), else empty
        self.input_columns: tuple[int, ...] = columns if to_input else ()

    def _make_norm(
        self, slot: str, shape: tuple[int, ...], layer: nn.Module | None = None
    ) -> nn.Module:
        """The layer of a ``"hidden"`` or ``"features"`` slot of per-sample ``shape``.

        When the slot divides out a scale (``MetadataScaleNorm``, ``"mdn-scale"``), the
        ``layer`` before it loses its bias: a
        multiplicative effect on the input, ``s · x``, then reaches the slot as exactly
        ``s · (W x)`` (with the bias, the division would leave ``b / s``, a metadata-dependent
        offset); the BatchNorm after the scale layer has its own shift.
        """
        norm = create_slot_norm(
            self.norm,
            shape,
            slot=slot,
            design=self._design,
            base="batchnorm",
            momentum=self._momentum,
        )
        scaled = any(isinstance(m, MetadataScaleNorm) for m in norm.modules())
        if scaled and layer is not None and getattr(layer, "bias", None) is not None:
            layer.register_parameter("bias", None)
        return norm

    def _head(self, hidden: int) -> nn.Linear:
        """The classifier, for ``hidden`` features plus any appended metadata columns."""
        return nn.Linear(hidden + len(self.concat_columns), self.num_classes)

    def _columns(self, metadata: Tensor | None, columns: tuple[int, ...], like: Tensor) -> Tensor:
        if metadata is None:
            raise ValueError(
                f"norm={self.norm!r} feeds the metadata to the model: call it as "
                "model(x, metadata) with the batch's design rows, got metadata=None"
            )
        return metadata[:, list(columns)].to(like.dtype)

    def _with_input_metadata(self, x: Tensor, metadata: Tensor | None) -> Tensor:
        """``x`` with the input metadata columns as constant channels (or columns)."""
        if not self.input_columns:
            return x
        meta = self._columns(metadata, self.input_columns, x)
        if x.dim() == 2:
            return torch.cat([x, meta], dim=1)
        planes = meta.reshape(*meta.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        return torch.cat([x, planes], dim=1)

    def _classify(self, h: Tensor, metadata: Tensor | None) -> tuple[Tensor, Tensor]:
        features = apply_norm(self.fc_norm, self.fc(h), metadata)
        head_in = torch.relu(features)
        if self.concat_columns:
            meta = self._columns(metadata, self.concat_columns, head_in)
            head_in = torch.cat([head_in, meta], dim=1)
        return self.head(head_in), features

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}, num_classes={self.num_classes}"


class StandInCNN(_StandIn):
    """A small 2-D CNN: two conv blocks, a hidden linear layer, a linear classifier.

    ``conv(5×5) → norm → ReLU → maxpool 2`` twice, then ``fc(hidden) → norm → ReLU → fc(classes)``.
    With ``norm="mdn"`` the convs keep BatchNorm and the hidden layer gets MetadataNorm.

    Args:
        in_channels: image channels (1 grey, 3 RGB).
        num_classes: number of classes (≥ 2; logits have this many columns).
        image_size: image side, or ``(H, W)``; both divisible by 4.
        norm: a normalization method (see the module docstring). Default: ``"batchnorm"``.
        design: the whole training set's design (required for MDN norms).
        channels: channels of the two conv blocks. Default: ``(16, 32)``.
        hidden: width of the hidden (feature) layer. Default: 84, as in the paper's CNN.
        momentum: MDN running-β momentum. Default: 0.1.

    Shape:
        - Input: ``(m, in_channels, H, W)``; metadata ``(m, K)`` or ``None``.
        - Output: ``(logits (m, num_classes), features (m, hidden))``.

    Examples::

        >>> model = StandInCNN(1, 2, 28)
        >>> logits, features = model(torch.randn(4, 1, 28, 28), None)
        >>> logits.shape, features.shape
        (torch.Size([4, 2]), torch.Size([4, 84]))
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int | Sequence[int],
        norm: str = "batchnorm",
        design: Design | None = None,
        *,
        channels: Sequence[int] = (16, 32),
        hidden: int = 84,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__(norm, design, num_classes, momentum)
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if h % 4 or w % 4 or h < 4 or w < 4:
            raise ValueError(f"expected an image size divisible by 4, got {(h, w)}")
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels + len(self.input_columns), c1, 5, padding=2)
        self.norm1 = self._make_norm("hidden", (c1, h, w), self.conv1)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2)
        self.norm2 = self._make_norm("hidden", (c2, h // 2, w // 2), self.conv2)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(c2 * (h // 4) * (w // 4), hidden)
        self.fc_norm = self._make_norm("features", (hidden,))
        self.head = self._head(hidden)

    def forward(self, x: Tensor, metadata: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns ``(logits, features)``; see the class docstring."""
        x = self._with_input_metadata(x, metadata)
        h = self.pool(torch.relu(apply_norm(self.norm1, self.conv1(x), metadata)))
        h = self.pool(torch.relu(apply_norm(self.norm2, self.conv2(h), metadata)))
        return self._classify(h.flatten(1), metadata)


class StandInMLP(_StandIn):
    """A feature-level MLP (clip features → actions): ``fc → norm → ReLU → fc → norm → ReLU → fc``.

    With ``norm="mdn"`` the first layer keeps BatchNorm and the second (feature) layer gets
    MetadataNorm.

    Args:
        in_features: input feature width.
        num_classes: number of classes (≥ 2).
        norm: a normalization method (see the module docstring). Default: ``"batchnorm"``.
        design: the whole training set's design (required for MDN norms).
        hidden: widths of the two hidden layers. Default: ``(256, 128)``.
        dropout: dropout after the first hidden layer. Default: 0.
        momentum: MDN running-β momentum. Default: 0.1.

    Shape:
        - Input: ``(m, in_features)``; metadata ``(m, K)`` or ``None``.
        - Output: ``(logits (m, num_classes), features (m, hidden[1]))``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        norm: str = "batchnorm",
        design: Design | None = None,
        *,
        hidden: Sequence[int] = (256, 128),
        dropout: float = 0.0,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__(norm, design, num_classes, momentum)
        h1, h2 = hidden
        self.fc1 = nn.Linear(in_features + len(self.input_columns), h1)
        self.norm1 = self._make_norm("hidden", (h1,), self.fc1)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(h1, h2)
        self.fc_norm = self._make_norm("features", (h2,))
        self.head = self._head(h2)

    def forward(self, x: Tensor, metadata: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns ``(logits, features)``; see the class docstring."""
        x = self._with_input_metadata(x, metadata)
        h = self.drop(torch.relu(apply_norm(self.norm1, self.fc1(x), metadata)))
        return self._classify(h, metadata)


class StandInCNN3d(_StandIn):
    """A small 3-D CNN for volumes (MRI): three conv blocks, global pooling, two linear layers.

    ``conv3d(3³) → norm → ReLU → maxpool 2`` three times, global average pooling, then
    ``fc(hidden) → norm → ReLU → fc(classes)``. With ``norm="mdn"`` the convs keep BatchNorm and
    the hidden layer gets MetadataNorm.

    Args:
        in_channels: volume channels (1 for T1).
        num_classes: number of classes (≥ 2).
        volume_shape: ``(D, H, W)`` of the input, each divisible by 8.
        norm: a normalization method (see the module docstring). Default: ``"batchnorm"``.
        design: the whole training set's design (required for MDN norms).
        channels: channels of the three conv blocks. Default: ``(8, 16, 32)``.
        hidden: width of the hidden (feature) layer. Default: 64.
        momentum: MDN running-β momentum. Default: 0.1.

    Shape:
        - Input: ``(m, in_channels, D, H, W)``; metadata ``(m, K)`` or ``None``.
        - Output: ``(logits (m, num_classes), features (m, hidden))``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        volume_shape: Sequence[int],
        norm: str = "batchnorm",
        design: Design | None = None,
        *,
        channels: Sequence[int] = (8, 16, 32),
        hidden: int = 64,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__(norm, design, num_classes, momentum)
        shape = tuple(int(s) for s in volume_shape)
        if len(shape) != 3 or any(s % 8 or s < 8 for s in shape):
            raise ValueError(f"expected a (D, H, W) volume shape, each divisible by 8, got {shape}")
        blocks: list[nn.Module] = []
        c_in = in_channels + len(self.input_columns)
        for i, c in enumerate(channels):
            size = tuple(s // 2**i for s in shape)
            conv = nn.Conv3d(c_in, c, 3, padding=1)
            blocks.append(conv)
            blocks.append(self._make_norm("hidden", (c, *size), conv))
            c_in = c
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.MaxPool3d(2)
        self.fc = nn.Linear(c_in, hidden)
        self.fc_norm = self._make_norm("features", (hidden,))
        self.head = self._head(hidden)

    def forward(self, x: Tensor, metadata: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns ``(logits, features)``; see the class docstring."""
        h = self._with_input_metadata(x, metadata)
        for conv, norm in zip(self.blocks[0::2], self.blocks[1::2], strict=True):
            h = self.pool(torch.relu(apply_norm(norm, conv(h), metadata)))
        return self._classify(h.mean(dim=(2, 3, 4)), metadata)
