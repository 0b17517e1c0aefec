"""MONAI's 3-D ResNet-18 with MDN placed by :func:`metanorm.nn.convert_metadata_norm`.

The real-data experiments' volume model can be MONAI's 3-D ResNet-18 instead of the project's
:class:`~metanorm_repro.models.StandInCNN3d` (``metanorm reproduce multisite-mri-standin --option
model=monai-resnet18``). MONAI is an optional extra (``pip install 'metanorm[monai]'``), imported
only when such a model is built; nothing downloads (``pretrained=False``).

The model keeps the stand-ins' interface (``model(x, metadata) -> (logits, features)``, see
:mod:`metanorm_repro.models.stand_in`): MONAI's ResNet body (its conv stem, four residual stages
with BatchNorm3d, global average pooling) ends in its own ``fc``, here of width ``hidden``, whose
output is the *features* (after their normalization, before the ReLU); a linear ``head`` gives
the logits. Per method (names of :mod:`metanorm_repro.models.methods`):

==============  =============================================================================
``batchnorm``   MONAI's network as it is (BatchNorm3d in the body), BatchNorm1d on the features
``none``        every BatchNorm3d replaced by ``nn.Identity``, nothing on the features
``mdn``         the body as in ``batchnorm``; a MetadataNorm inserted after ``fc`` by
                ``convert_metadata_norm(net, design, after=["fc"], keep=design.keep)``
``mdn-all``     also every BatchNorm3d replaced by a *channel-wise* MetadataNorm (β of size K × C;
                a full per-position β of the first stage would be K × 262 144 at 32³)
``concat``      ``batchnorm`` with the design rows' confounder columns appended to the head's
                input
objectives      ``brnet``, ``brnet-cond``, ``dann``, ``dann-cond``, ``groupdro``: the
                ``batchnorm`` model; the experiment harness attaches the objective (it reads
                the features' width from ``model.fc``)
==============  =============================================================================

Examples::

    >>> import torch
    >>> from metanorm.design import Design
    >>> rows = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    >>> design = Design(rows.repeat(4, 1).numpy(), ("y", "site", "intercept"), keep=(0,))
    >>> model = MonaiResNet3d(1, 2, (16, 16, 16), "mdn", design, widen_factor=0.125)
    >>> logits, features = model(torch.randn(4, 1, 16, 16, 16), rows)
    >>> logits.shape, features.shape
    (torch.Size([4, 2]), torch.Size([4, 64]))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metanorm.design import Design
from metanorm.nn import MetadataModel, MetadataNorm, convert_metadata_norm
from metanorm_repro.models.methods import FEATURE_ALTERNATIVES, get_method
from metanorm_repro.models.norms import confounder_columns

__all__ = ["MONAI_METHODS", "MonaiResNet3d", "monai_resnet18"]

#: The methods :class:`MonaiResNet3d` builds (registered names).
MONAI_METHODS: tuple[str, ...] = (
    "batchnorm",
    "none",
    "mdn",
    "mdn-all",
    *FEATURE_ALTERNATIVES,
)


def _monai_resnet18(**kwargs: Any) -> nn.Module:
    try:
        from monai.networks.nets import resnet18
    except ModuleNotFoundError as exc:  # the optional extra
        raise ModuleNotFoundError(
            "model=monai-resnet18 needs MONAI: pip install 'metanorm[monai]' (or pip install monai)"
        ) from exc
    net: nn.Module = resnet18(pretrained=False, **kwargs)
    return net


class MonaiResNet3d(nn.Module):
    """MONAI's 3-D ResNet-18 body, a ``hidden``-wide feature layer and a linear head.

    See the module docstring for the methods.

    Args:
        in_channels: volume channels (1 for T1).
        num_classes: number of classes (≥ 2).
        volume_shape: ``(D, H, W)`` of the input (used to size the lazy MDN layers with one
            evaluation-mode forward pass of zeros, which changes no running statistic).
        norm: a method of :data:`MONAI_METHODS` (or a synonym such as ``"mdn-linear"``).
            Default: ``"batchnorm"``.
        design: the whole training set's :class:`metanorm.design.Design` (MDN and ``concat``).
        hidden: the feature layer's width (MONAI's ``fc``). Default: 64, as the stand-in CNN.
        widen_factor: MONAI's ``widen_factor``: channels ``64, 128, 256, 512`` × this.
            Default: 1 (the full ResNet-18: one training step of 16 volumes of 32³ took 29 s
            on a busy 2-core CPU, 3.5 s at ``0.25``; see
            ``docs/experiments/multisite-mri-standin.md``).
        momentum: MDN running-β momentum. Default: 0.1.

    Shape:
        - Input: ``(m, in_channels, D, H, W)``; metadata ``(m, K)`` (or ``None`` for methods
          that read no metadata).
        - Output: ``(logits (m, num_classes), features (m, hidden))``.
    """

    takes_metadata = True

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        volume_shape: Sequence[int],
        norm: str = "batchnorm",
        design: Design | None = None,
        *,
        hidden: int = 64,
        widen_factor: float = 1.0,
        momentum: float | None = 0.1,
    ) -> None:
        super().__init__()
        spec = get_method(norm)
        name = spec.canonical if spec.canonical in MONAI_METHODS else spec.name
        if name not in MONAI_METHODS:
            raise ValueError(
                f"model=monai-resnet18 builds the methods {MONAI_METHODS}, got norm={norm!r}"
            )
        needs = spec.needs_design or spec.concat_metadata
        if needs and not isinstance(design, Design):
            raise TypeError(
                f"norm={norm!r} needs design=, the whole training set's metanorm.design.Design; "
                f"got {type(design).__name__}"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"expected num_classes to be an int >= 2, got {num_classes!r}")
        shape = tuple(int(s) for s in volume_shape)
        if len(shape) != 3 or any(s < 8 for s in shape):
            raise ValueError(f"expected a (D, H, W) volume shape, each >= 8, got {shape}")
        if not widen_factor > 0:
            raise ValueError(f"expected widen_factor > 0, got {widen_factor!r}")
        self.norm = name
        self.num_classes = num_classes
        net = _monai_resnet18(
            spatial_dims=3,
            n_input_channels=in_channels,
            num_classes=hidden,
            widen_factor=float(widen_factor),
        )
        if name == "none":
            for qual, module in list(net.named_modules()):
                if isinstance(module, nn.BatchNorm3d):
                    parent, _, leaf = qual.rpartition(".")
                    setattr(net.get_submodule(parent) if parent else net, leaf, nn.Identity())
        self.body: nn.Module = net
        self.fc_norm: nn.Module = nn.Identity()
        if spec.needs_design:
            assert isinstance(design, Design)
            replace: list[Any] = [nn.BatchNorm3d] if name == "mdn-all" else []
            keep = list(design.keep)
            model = convert_metadata_norm(net, design, after=["fc"], keep=keep, momentum=momentum)
            if replace:
                convert_metadata_norm(
                    model, design, replace=replace, keep=keep, momentum=momentum, channelwise=True
                )
            self.body = model
            # size the lazy layers: eval mode uses (and changes) no running statistic
            rows = torch.as_tensor(design.matrix[:2], dtype=torch.float32)
            with torch.no_grad():
                self.eval()
                model(torch.zeros(2, in_channels, *shape), metadata=rows)
                self.train()
        elif name != "none":
            self.fc_norm = nn.BatchNorm1d(hidden)
        columns = confounder_columns(design) if spec.concat_metadata else []
        #: design columns appended to the head's input (``concat``), else empty
        self.concat_columns: tuple[int, ...] = tuple(columns)
        self.head = nn.Linear(hidden + len(self.concat_columns), num_classes)

    @property
    def net(self) -> nn.Module:
        """MONAI's ResNet (inside the :class:`~metanorm.nn.MetadataModel` for MDN methods)."""
        return self.body.module if isinstance(self.body, MetadataModel) else self.body

    @property
    def fc(self) -> nn.Linear:
        """The feature layer (MONAI's ``fc``, ``hidden`` outputs)."""
        fc = self.net.fc
        assert isinstance(fc, nn.Linear)
        return fc

    def forward(self, x: Tensor, metadata: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Returns ``(logits, features)``; see the class docstring."""
        if isinstance(self.body, MetadataModel):
            if metadata is None:
                raise ValueError(
                    f"norm={self.norm!r} has MetadataNorm layers: call model(x, metadata) with "
                    "the batch's design rows, got metadata=None"
                )
            features = self.body(x, metadata=metadata)
        else:
            features = self.fc_norm(self.body(x))
        head_in = torch.relu(features)
        if self.concat_columns:
            if metadata is None:
                raise ValueError("norm='concat' reads the design rows: got metadata=None")
            meta = metadata[:, list(self.concat_columns)].to(head_in.dtype)
            head_in = torch.cat([head_in, meta], dim=1)
        return self.head(head_in), features

    def mdn_layers(self) -> list[MetadataNorm]:
        """The model's MetadataNorm layers (empty without MDN)."""
        return [m for m in self.modules() if isinstance(m, MetadataNorm)]

    def extra_repr(self) -> str:  # noqa: D102 (nn.Module hook)
        return f"norm={self.norm!r}, num_classes={self.num_classes}"


def monai_resnet18(
    in_channels: int,
    num_classes: int,
    volume_shape: Sequence[int],
    norm: str = "batchnorm",
    design: Design | None = None,
    **kwargs: Any,
) -> MonaiResNet3d:
    """The :class:`MonaiResNet3d` that ``--option model=monai-resnet18`` builds."""
    return MonaiResNet3d(in_channels, num_classes, volume_shape, norm, design, **kwargs)
