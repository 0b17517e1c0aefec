"""Normalization methods by name: one registry for the models, the experiments and the CLI.

A *method* (``"none"``, ``"batchnorm"``, ``"mdn-conv"``, ...) says which normalization layer goes
into each norm slot of a model. A model has two kinds of slot: ``"hidden"`` (after each conv or
hidden linear layer) and ``"features"`` (after the layer whose output is the model's features, the
one before the classifier). :func:`create_norm` builds the layer of one slot, for the slot's
per-sample shape and, for MDN, the whole training set's design (as timm's ``create_norm_layer``
builds a norm layer by name).

======================  ===============  ======================  =================================
name                    display name     hidden slots            features slot
======================  ===============  ======================  =================================
``"none"``              Baseline         —                       —
``"batchnorm"``         BatchNorm        BatchNorm               BatchNorm
``"groupnorm"``         GroupNorm        GroupNorm               GroupNorm
``"mdn"``               MDN              the model's ``base``    MetadataNorm
``"mdn-linear"``        MDN-Linear       the model's ``base``    MetadataNorm
``"mdn-all"``           MDN-all          MetadataNorm            MetadataNorm
``"mdn-conv"``          MDN-Conv         MetadataNorm            MetadataNorm
``"rmdn"``              R-MDN            the model's ``base``    RecursiveMetadataNorm
``"rmdn-all"``          R-MDN-all        RecursiveMetadataNorm   RecursiveMetadataNorm
``"rmdn-conv"``         R-MDN-Conv       RecursiveMetadataNorm   RecursiveMetadataNorm
``"pmdn"``              PMDN             the model's ``base``    PenaltyMetadataNorm
``"pmdn-all"``          PMDN-all         PenaltyMetadataNorm     PenaltyMetadataNorm
``"pmdn-conv"``         PMDN-Conv        PenaltyMetadataNorm     PenaltyMetadataNorm
``"concat"``            Concat           the model's ``base``    — (metadata appended to it)
``"concat-input"``      Concat-input     the model's ``base``    — (metadata as input channels)
``"brnet"``             BR-Net           the model's ``base``    — (objective ``"brnet"``)
``"brnet-cond"``        BR-Net-cond      the model's ``base``    — (objective ``"brnet-cond"``)
``"dann"``              DANN             the model's ``base``    — (objective ``"dann"``)
``"dann-cond"``         DANN-cond        the model's ``base``    — (objective ``"dann-cond"``)
``"groupdro"``          GroupDRO         the model's ``base``    — (objective ``"groupdro"``)
======================  ===============  ======================  =================================

The last seven are the alternatives to MDN that the comparison runs through the same engine.
They add no norm layer (``needs_design`` is ``False``: that flag means MetadataNorm layers);
what they change is carried by three :class:`NormSpec` fields: ``concat_metadata`` (the model
appends the batch's confounder columns of the design, those neither kept nor the intercept, to
the features before its classifier;
:class:`~metanorm_repro.models.PaperCNN` reads it), ``input_metadata`` (the model adds the same
columns to its input image as constant extra channels; PaperCNN's first conv takes them) and
``objective`` (the name of a training
objective — an adversary, a bias predictor or group weights — that the experiment harness builds,
:mod:`metanorm_repro.experiments.alternatives`, and the training loop calls in place of the plain
task loss). The library and the models never import the harness: they only carry the name.

``base`` is the model's usual normalization, used where a method adds no MDN layer: ``"none"``
for :class:`~metanorm_repro.models.PaperCNN` (the paper's baseline has no norm layer),
``"batchnorm"``
for the stand-in models. ``"mdn-linear"`` and ``"mdn-conv"`` are the paper's names (its synthetic
experiment); they build the same layers as ``"mdn"`` and ``"mdn-all"``, their canonical names
(:func:`canonical_norm`). On the command line ``"baseline"``, ``"bn"`` and ``"gn"`` are accepted
for ``"none"``, ``"batchnorm"`` and ``"groupnorm"`` (:data:`NORM_ALIASES`).

A MetadataNorm slot gets ``MetadataNorm(prod(shape), design, momentum=momentum, **mdn_kwargs)``:
a conv map is flattened, one β column per channel × position, as in the paper. The recursive and
penalty estimators (:class:`~metanorm.nn.RecursiveMetadataNorm`,
:class:`~metanorm.nn.PenaltyMetadataNorm`) take only the design's width K and its ``keep``
columns from ``design`` (no Σ, no N); ``momentum`` and ``ridge`` do not apply to them, and
``mdn_kwargs`` may hold their own arguments (``forgetting``, ``delta``, ``reg``; ``lr``,
``optimizer``); arguments of the other estimators are dropped.

Examples::

    >>> from metanorm_repro.models.norms import create_norm, norm_display_name
    >>> type(create_norm("batchnorm", (16, 28, 28), slot="hidden")).__name__
    'BatchNorm2d'
    >>> create_norm("mdn-linear", (16, 28, 28), slot="hidden", base="none")
    Identity()
    >>> norm_display_name("mdn-conv")
    'MDN-Conv'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from metanorm.design import Design
from metanorm.nn import MetadataNorm, takes_metadata
from metanorm.nn.penalty import PenaltyMetadataNorm
from metanorm.nn.recursive import RecursiveMetadataNorm

__all__ = [
    "ALTERNATIVES",
    "FEATURE_ALTERNATIVES",
    "NORM_ALIASES",
    "SLOTS",
    "NormSpec",
    "apply_norm",
    "canonical_norm",
    "confounder_columns",
    "create_norm",
    "get_norm",
    "list_norms",
    "norm_display_name",
    "register_norm",
]

#: The kinds of norm slot a model has.
SLOTS: tuple[str, ...] = ("hidden", "features")

#: Other spellings accepted for a method name (the command line's), → the registered name.
NORM_ALIASES: dict[str, str] = {"baseline": "none", "bn": "batchnorm", "gn": "groupnorm"}

#: ``factory(shape, *, slot, design, base, groups, momentum, **mdn_kwargs) -> nn.Module``.
NormFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class NormSpec:
    """A registered normalization method.

    Attributes:
        name: the method's name.
        display_name: its name in reports and plots.
        factory: builds the layer of one slot (see :func:`create_norm` for the arguments).
        needs_design: ``True`` when the method builds MetadataNorm layers (it needs the training
            design, and the model the batch's design rows).
        canonical: the name of the method that builds the same layers (itself unless the name is
            a synonym, as ``"mdn-linear"`` is of ``"mdn"``).
        objective: the name of the method's training objective
            (:mod:`metanorm_repro.experiments.alternatives`), or ``None`` for the plain task loss.
        concat_metadata: the model appends the confounder columns of the batch's design rows to
            the features before its classifier.
        input_metadata: the model adds the confounder columns of the batch's design rows to
            its input as constant extra channels (one per column).
    """

    name: str
    display_name: str
    factory: NormFactory
    needs_design: bool = False
    canonical: str = ""
    objective: str | None = None
    concat_metadata: bool = False
    input_metadata: bool = False


_NORMS: dict[str, NormSpec] = {}


def register_norm(
    name: str,
    factory: NormFactory,
    *,
    display_name: str | None = None,
    needs_design: bool = False,
    canonical: str | None = None,
    objective: str | None = None,
    concat_metadata: bool = False,
    input_metadata: bool = False,
    replace: bool = False,
) -> NormSpec:
    """Registers a normalization method under ``name``.

    Args:
        name: the method's name (what ``--methods`` and the models' ``norm`` take).
        factory: ``factory(shape, *, slot, design, base, groups, momentum, **mdn_kwargs)``
            returning the layer of one slot; it may ignore any argument.
        display_name: the name in reports. Default: ``name``.
        needs_design: the method builds MetadataNorm layers. Default: ``False``.
        canonical: the registered method this one is a synonym of. Default: ``name``.
        objective: the name of a training objective of the harness. Default: ``None``.
        concat_metadata: the model appends the metadata to its classifier's input. Default:
            ``False``.
        input_metadata: the model adds the metadata to its input as constant channels.
            Default: ``False``.
        replace: replace an existing registration. Default: ``False`` (a ``ValueError``).

    Returns:
        The :class:`.NormSpec`.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"expected a non-empty str name, got {name!r}")
    if (name in _NORMS or name in NORM_ALIASES) and not replace:
        raise ValueError(f"a normalization method named {name!r} is already registered")
    if canonical is not None and canonical not in _NORMS:
        raise ValueError(f"canonical={canonical!r} is not a registered method: {list_norms()}")
    spec = NormSpec(
        name,
        display_name or name,
        factory,
        needs_design,
        canonical or name,
        objective=objective,
        concat_metadata=bool(concat_metadata),
        input_metadata=bool(input_metadata),
    )
    _NORMS[name] = spec
    return spec


def confounder_columns(design: Any) -> list[int]:
    """The columns of a design that a method removes or adjusts for: neither kept nor intercept.

    For the synthetic design ``[y, cf, 1]`` (``y`` kept) that is ``[1]``, the ``cf`` column.

    Raises:
        TypeError: ``design`` is not a :class:`metanorm.design.Design`.

    Examples::

        >>> import numpy as np
        >>> d = Design(np.ones((2, 3)), ("y", "cf", "intercept"), keep=(0,))
        >>> confounder_columns(d)
        [1]
    """
    if not isinstance(design, Design):
        raise TypeError(f"expected a metanorm.design.Design, got {type(design).__name__}")
    return [k for k, c in enumerate(design.columns) if k not in design.keep and c != "intercept"]


def list_norms() -> list[str]:
    """The registered method names, in registration order."""
    return list(_NORMS)


def get_norm(name: str) -> NormSpec:
    """The :class:`.NormSpec` of ``name`` (or of one of its :data:`NORM_ALIASES`).

    Raises:
        ValueError: ``name`` is not registered (the message lists the registered names).
    """
    spec = _NORMS.get(NORM_ALIASES.get(name, name)) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"expected a normalization method in {list_norms()}, got {name!r}")
    return spec


def canonical_norm(name: str) -> str:
    """The canonical name of a method: ``"mdn-linear"`` → ``"mdn"``, ``"bn"`` → ``"batchnorm"``."""
    return get_norm(name).canonical


def norm_display_name(name: str) -> str:
    """The display name of a method (``"none"`` → ``"Baseline"``); unknown names as they are."""
    spec = _NORMS.get(NORM_ALIASES.get(name, name))
    return name if spec is None else spec.display_name


def create_norm(
    name: str,
    shape: int | Sequence[int],
    *,
    slot: str = "features",
    design: Any = None,
    base: str = "none",
    groups: int = 4,
    momentum: float | None = 0.1,
    **mdn_kwargs: Any,
) -> nn.Module:
    """Builds the normalization layer of one slot of a model.

    Args:
        name: the method (see :func:`list_norms`).
        shape: the per-sample shape of the slot's input: ``C`` or ``(C,)`` after a linear layer,
            ``(C, H, W)`` after a 2-D conv, ``(C, D, H, W)`` after a 3-D conv.
        slot: ``"hidden"`` or ``"features"`` (see the module docstring). Default: ``"features"``.
        design: the WHOLE training set's design (``(N, K)`` array/tensor or
            :class:`metanorm.design.Design`), for methods that build MetadataNorm layers.
        base: the model's usual method, for the slots a method leaves alone. Default: ``"none"``.
        groups: groups of a GroupNorm. Default: 4.
        momentum: running-β momentum of a MetadataNorm. Default: 0.1.
        **mdn_kwargs: further keyword arguments of :class:`~metanorm.nn.MetadataNorm`
            (``keep``, ``ridge``, ...).

    Returns:
        The layer: ``nn.Identity``, a BatchNorm of the shape's dimension, ``nn.GroupNorm`` or
        :class:`~metanorm.nn.MetadataNorm` for the built-in methods.

    Raises:
        ValueError: unknown method or slot, or a bad shape.
        TypeError: an MDN layer without a design.
    """
    spec = get_norm(name)
    if slot not in SLOTS:
        raise ValueError(f"expected slot in {SLOTS}, got {slot!r}")
    dims = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    if not 1 <= len(dims) <= 4 or any(d < 1 for d in dims):
        raise ValueError(f"expected a per-sample shape of 1 to 4 positive sizes, got {shape!r}")
    return spec.factory(
        dims,
        slot=slot,
        design=design,
        base=base,
        groups=groups,
        momentum=momentum,
        **mdn_kwargs,
    )


def apply_norm(layer: nn.Module, x: Tensor, metadata: Tensor | None) -> Tensor:
    """Calls a slot's layer: ``layer(x, metadata)`` if it takes metadata, else ``layer(x)``.

    Raises:
        ValueError: the layer takes metadata and ``metadata`` is ``None``.
    """
    if takes_metadata(layer):
        if metadata is None:
            raise ValueError(
                "this model has MetadataNorm layers: call it as model(x, metadata) with the "
                "batch's design rows, got metadata=None"
            )
        out: Tensor = layer(x, metadata)
        return out
    out = layer(x)
    return out


# ---------------------------------------------------------------------------- built-in layers


def _identity(shape: tuple[int, ...], **_: Any) -> nn.Module:
    return nn.Identity()


def _batchnorm(shape: tuple[int, ...], **_: Any) -> nn.Module:
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm1d, 3: nn.BatchNorm2d, 4: nn.BatchNorm3d}[len(shape)]
    return bn(shape[0])


def _groupnorm(shape: tuple[int, ...], *, groups: int = 4, **_: Any) -> nn.Module:
    return nn.GroupNorm(groups, shape[0])


def _metadatanorm(
    shape: tuple[int, ...],
    *,
    design: Any = None,
    momentum: float | None = 0.1,
    slot: str = "features",
    base: str = "none",
    groups: int = 4,
    **mdn_kwargs: Any,
) -> nn.Module:
    if design is None:
        raise TypeError(
            "a MetadataNorm slot needs design=, the whole training set's design "
            "(an (N, K) array/tensor or a metanorm.design.Design), got None"
        )
    return MetadataNorm(math.prod(shape), design, momentum=momentum, **mdn_kwargs)


#: Keyword arguments each online estimator takes from ``mdn_kwargs`` (the rest are dropped).
_ONLINE_KWARGS: dict[type[nn.Module], tuple[str, ...]] = {
    RecursiveMetadataNorm: ("forgetting", "delta", "reg", "grad_through_beta", "dtype"),
    PenaltyMetadataNorm: ("lr", "optimizer", "betas", "eps", "dtype"),
}


def _online(cls: type[nn.Module]) -> NormFactory:
    """The factory of an estimator that keeps its own β (built from the design's width)."""

    def factory(shape: tuple[int, ...], *, design: Any = None, **kwargs: Any) -> nn.Module:
        if design is None:
            raise TypeError(
                f"a {cls.__name__} slot needs design= (the training design, or any (n, K) "
                "array/tensor: only its width K and keep columns are used), got None"
            )
        keep = kwargs.get("keep")
        if keep is None:
            keep = design.keep if isinstance(design, Design) else ()
        elif isinstance(design, Design):
            keep = [design.columns.index(c) if isinstance(c, str) else c for c in keep]
        width = (design.matrix if isinstance(design, Design) else design).shape[1]
        own = {k: v for k, v in kwargs.items() if k in _ONLINE_KWARGS[cls]}
        return cls(math.prod(shape), int(width), keep=keep, **own)

    return factory


_LAYERS: dict[str, NormFactory] = {
    "none": _identity,
    "batchnorm": _batchnorm,
    "groupnorm": _groupnorm,
    "mdn": _metadatanorm,
    "rmdn": _online(RecursiveMetadataNorm),
    "pmdn": _online(PenaltyMetadataNorm),
}


def _placement(hidden: str | None, features: str) -> NormFactory:
    """A method's factory: layer ``hidden`` in hidden slots (``None``: the model's base)."""

    def factory(
        shape: tuple[int, ...], *, slot: str, base: str = "none", **kwargs: Any
    ) -> nn.Module:
        if slot == "features":
            return _LAYERS[features](shape, slot=slot, base=base, **kwargs)
        if hidden is None:
            if get_norm(base).needs_design:
                raise ValueError(f"expected a base method without MDN layers, got {base!r}")
            return create_norm(base, shape, slot=slot, base="none", **kwargs)
        return _LAYERS[hidden](shape, slot=slot, base=base, **kwargs)

    return factory


register_norm("none", _placement("none", "none"), display_name="Baseline")
register_norm("batchnorm", _placement("batchnorm", "batchnorm"), display_name="BatchNorm")
register_norm("groupnorm", _placement("groupnorm", "groupnorm"), display_name="GroupNorm")
register_norm("mdn", _placement(None, "mdn"), display_name="MDN", needs_design=True)
register_norm(
    "mdn-linear",
    _placement(None, "mdn"),
    display_name="MDN-Linear",
    needs_design=True,
    canonical="mdn",
)
register_norm("mdn-all", _placement("mdn", "mdn"), display_name="MDN-all", needs_design=True)
register_norm(
    "mdn-conv",
    _placement("mdn", "mdn"),
    display_name="MDN-Conv",
    needs_design=True,
    canonical="mdn-all",
)
for _name, _display in (("rmdn", "R-MDN"), ("pmdn", "PMDN")):
    register_norm(_name, _placement(None, _name), display_name=_display, needs_design=True)
    register_norm(
        f"{_name}-all", _placement(_name, _name), display_name=f"{_display}-all", needs_design=True
    )
    register_norm(
        f"{_name}-conv",
        _placement(_name, _name),
        display_name=f"{_display}-Conv",
        needs_design=True,
        canonical=f"{_name}-all",
    )

register_norm("concat", _placement(None, "none"), display_name="Concat", concat_metadata=True)
register_norm(
    "concat-input", _placement(None, "none"), display_name="Concat-input", input_metadata=True
)
for _name, _display in (
    ("brnet", "BR-Net"),
    ("brnet-cond", "BR-Net-cond"),
    ("dann", "DANN"),
    ("dann-cond", "DANN-cond"),
    ("groupdro", "GroupDRO"),
):
    register_norm(_name, _placement(None, "none"), display_name=_display, objective=_name)

#: The alternatives to MDN (``docs/alternatives.md``), in report order.
ALTERNATIVES: tuple[str, ...] = (
    "concat",
    "concat-input",
    "brnet",
    "brnet-cond",
    "dann",
    "dann-cond",
    "groupdro",
)
#: The alternatives that need nothing of the model's input (every model takes them).
FEATURE_ALTERNATIVES: tuple[str, ...] = tuple(
    m for m in ALTERNATIVES if not _NORMS[m].input_metadata
)
