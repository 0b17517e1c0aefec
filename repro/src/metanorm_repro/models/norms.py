"""Normalization layers by name: one table, :data:`NORM_LAYERS`, read by :func:`create_norm`.

As timm's ``create_norm_layer``, a name gives a layer factory and nothing else: the layer for a
per-sample shape (and, for the MetadataNorm layers, the whole training set's design). Which
layer goes into which slot of a model is a *method*'s business
(:mod:`metanorm_repro.models.methods`).

=================================  ===============================================================
name                               layer
=================================  ===============================================================
``"none"``                         ``nn.Identity``
``"batchnorm"``                    ``BatchNorm1d`` / ``2d`` / ``3d`` (by the shape's dimension)
``"groupnorm"``                    ``nn.GroupNorm(groups, C)``
``"metadatanorm"``                 :class:`~metanorm.nn.MetadataNorm` over the flattened shape
``"recursive-metadatanorm"``       :class:`~metanorm.nn.RecursiveMetadataNorm`
``"penalty-metadatanorm"``         :class:`~metanorm.nn.PenaltyMetadataNorm`
``"channelwise-metadatanorm"``     ``MetadataNorm(C, channelwise=True)`` on a conv map (β of K×C);
                                   the flattened MetadataNorm on a vector
``"polynomial-metadatanorm"``      ``PolynomialMetadataNorm`` (:mod:`.interaction_norms`)
``"metadata-scalenorm"``           :class:`~metanorm.nn.MetadataScaleNorm` (per channel)
``"metadata-location-scalenorm"``  :class:`~metanorm.nn.MetadataLocationScaleNorm` (per channel)
=================================  ===============================================================

A MetadataNorm layer gets ``MetadataNorm(prod(shape), design, momentum=momentum, **mdn_kwargs)``:
a conv map is flattened, one β column per channel × position, as in the paper. The recursive and
penalty estimators take only the design's width K and its ``keep`` columns from ``design`` (no Σ,
no N); ``momentum`` and ``ridge`` do not apply to them, and ``mdn_kwargs`` may hold their own
arguments (``forgetting``, ``delta``, ``reg``; ``lr``, ``optimizer``); arguments of the other
estimators are dropped. The channel-wise, polynomial, scale and location-scale layers take the
design as a :class:`metanorm.design.Design` and ignore ``mdn_kwargs``.

:func:`register_norm_layer` adds a layer of your own to the table.

Examples::

    >>> type(create_norm("batchnorm", (16, 28, 28))).__name__
    'BatchNorm2d'
    >>> create_norm("none", 84)
    Identity()
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor, nn

from metanorm.design import Design
from metanorm.nn import (
    MetadataLocationScaleNorm,
    MetadataNorm,
    MetadataScaleNorm,
    takes_metadata,
)
from metanorm.nn.penalty import PenaltyMetadataNorm
from metanorm.nn.recursive import RecursiveMetadataNorm
from metanorm_repro.models.interaction_norms import PolynomialMetadataNorm

__all__ = [
    "NORM_LAYERS",
    "SLOTS",
    "NormFactory",
    "NormSpec",
    "apply_norm",
    "confounder_columns",
    "create_norm",
    "list_norm_layers",
    "register_norm_layer",
]

#: The kinds of norm slot a model has (see :mod:`metanorm_repro.models.methods`).
SLOTS: tuple[str, ...] = ("hidden", "features")

#: ``factory(shape, *, design, groups, momentum, **mdn_kwargs) -> nn.Module``; ``shape`` is the
#: per-sample shape as a tuple of 1 to 4 positive sizes.
NormFactory = Callable[..., nn.Module]


# ---------------------------------------------------------------------------- the layers


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
    groups: int = 4,
    **mdn_kwargs: Any,
) -> nn.Module:
    if design is None:
        raise TypeError(
            "a MetadataNorm layer needs design=, the whole training set's design "
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
                f"a {cls.__name__} layer needs design= (the training design, or any (n, K) "
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


def _design_of(design: Any, layer: str) -> Design:
    if not isinstance(design, Design):
        raise TypeError(
            f"the {layer!r} layer needs design=, the whole training set's metanorm.design.Design; "
            f"got {type(design).__name__}"
        )
    return design


def _channelwise(
    shape: tuple[int, ...], *, design: Any = None, momentum: float | None = 0.1, **_: Any
) -> nn.Module:
    d = _design_of(design, "channelwise-metadatanorm")
    if len(shape) > 1:
        return MetadataNorm(shape[0], d, momentum=momentum, channelwise=True)
    return MetadataNorm(int(np.prod(shape)), d, momentum=momentum)


def _polynomial(
    shape: tuple[int, ...], *, design: Any = None, momentum: float | None = 0.1, **_: Any
) -> nn.Module:
    d = _design_of(design, "polynomial-metadatanorm")
    return PolynomialMetadataNorm(int(np.prod(shape)), d, momentum=momentum)


def _scale(
    shape: tuple[int, ...], *, design: Any = None, momentum: float | None = 0.1, **_: Any
) -> nn.Module:
    return MetadataScaleNorm(shape[0], _design_of(design, "metadata-scalenorm"), momentum=momentum)


def _location_scale(
    shape: tuple[int, ...], *, design: Any = None, momentum: float | None = 0.1, **_: Any
) -> nn.Module:
    d = _design_of(design, "metadata-location-scalenorm")
    return MetadataLocationScaleNorm(
        shape[0], d, momentum=momentum, num_positions=int(np.prod(shape[1:]))
    )


#: The normalization layers by name (see the module docstring).
NORM_LAYERS: dict[str, NormFactory] = {
    "none": _identity,
    "batchnorm": _batchnorm,
    "groupnorm": _groupnorm,
    "metadatanorm": _metadatanorm,
    "recursive-metadatanorm": _online(RecursiveMetadataNorm),
    "penalty-metadatanorm": _online(PenaltyMetadataNorm),
    "channelwise-metadatanorm": _channelwise,
    "polynomial-metadatanorm": _polynomial,
    "metadata-scalenorm": _scale,
    "metadata-location-scalenorm": _location_scale,
}


# ---------------------------------------------------------------------------- the functions


def register_norm_layer(name: str, factory: NormFactory, *, replace: bool = False) -> None:
    """Adds a layer to the table of layers (``NORM_LAYERS``) under ``name``.

    Args:
        name: the layer's name (what a method's ``hidden`` and ``features`` take).
        factory: ``factory(shape, *, design, groups, momentum, **mdn_kwargs)`` returning the
            layer for the per-sample ``shape`` (a tuple); it may ignore any argument.
        replace: replace an existing layer. Default: ``False`` (a ``ValueError``).

    Raises:
        TypeError: ``name`` is not a non-empty string or ``factory`` is not callable.
        ValueError: ``name`` is taken (or is ``"base"``, which a method's slots use for the
            model's own normalization).

    Examples::

        >>> register_norm_layer("layernorm", lambda shape, **kw: nn.LayerNorm(list(shape)))
        >>> create_norm("layernorm", (4, 2)).normalized_shape
        (4, 2)
        >>> del NORM_LAYERS["layernorm"]
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"expected a non-empty str name, got {name!r}")
    if not callable(factory):
        raise TypeError(f"expected a callable factory, got {type(factory).__name__}")
    if name == "base":
        raise ValueError("'base' names the model's own normalization in a method; pick another")
    if name in NORM_LAYERS and not replace:
        raise ValueError(f"a norm layer named {name!r} is already registered")
    NORM_LAYERS[name] = factory


def list_norm_layers() -> list[str]:
    """The names of :data:`NORM_LAYERS`, in table order."""
    return list(NORM_LAYERS)


def _shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    dims = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    if not 1 <= len(dims) <= 4 or any(d < 1 for d in dims):
        raise ValueError(f"expected a per-sample shape of 1 to 4 positive sizes, got {shape!r}")
    return dims


def create_norm(
    name: str,
    shape: int | Sequence[int],
    *,
    design: Any = None,
    groups: int = 4,
    momentum: float | None = 0.1,
    slot: str | None = None,
    base: str = "none",
    **mdn_kwargs: Any,
) -> nn.Module:
    """Builds the normalization layer ``name`` (a name of the table ``NORM_LAYERS``).

    Args:
        name: the layer (see the module docstring).
        shape: the per-sample shape of the layer's input: ``C`` or ``(C,)`` after a linear
            layer, ``(C, H, W)`` after a 2-D conv, ``(C, D, H, W)`` after a 3-D conv.
        design: the WHOLE training set's design (``(N, K)`` array/tensor or
            :class:`metanorm.design.Design`), for the MetadataNorm layers.
        groups: groups of a GroupNorm. Default: 4.
        momentum: running-β momentum of a MetadataNorm. Default: 0.1.
        slot: deprecated, with a *method* as ``name``: the layer of that slot of the method
            (use :func:`metanorm_repro.models.methods.create_slot_norm`). Ignored for a layer.
        base: deprecated, with a method as ``name``: the model's usual method.
        **mdn_kwargs: further keyword arguments of :class:`~metanorm.nn.MetadataNorm`
            (``keep``, ``ridge``, ...).

    Returns:
        The layer.

    Raises:
        ValueError: unknown layer or slot, or a bad shape.
        TypeError: a MetadataNorm layer without a design.
    """
    if slot is not None and slot not in SLOTS:
        raise ValueError(f"expected slot in {SLOTS}, got {slot!r}")
    dims = _shape(shape)
    if name not in NORM_LAYERS:
        from metanorm_repro.models import methods

        if not isinstance(name, str) or methods.METHOD_ALIASES.get(name, name) not in (
            methods.METHODS
        ):
            raise ValueError(
                f"expected a normalization layer in {list_norm_layers()}, got {name!r}"
            )
        warnings.warn(
            f"create_norm({name!r}, ...) with a method name is deprecated: create_norm builds a "
            "layer of metanorm_repro.models.norms.NORM_LAYERS; use "
            "metanorm_repro.models.methods.create_slot_norm for a method's slot",
            DeprecationWarning,
            stacklevel=2,
        )
        return methods.create_slot_norm(
            name,
            dims,
            slot=slot or "features",
            design=design,
            base=base,
            groups=groups,
            momentum=momentum,
            **mdn_kwargs,
        )
    return NORM_LAYERS[name](dims, design=design, groups=groups, momentum=momentum, **mdn_kwargs)


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


# ---------------------------------------------------------------------------- deprecated names


@dataclass(frozen=True)
class NormSpec:
    """Deprecated: the old registry's record of a method; use ``methods.Method``.

    :func:`metanorm_repro.models.methods.get_method` returns the new record.

    Attributes:
        name: the method's name.
        display_name: its name in reports and plots.
        factory: ``factory(shape, *, slot, design, base, groups, momentum, **mdn_kwargs)``,
            the layer of one slot.
        needs_design: the method builds MetadataNorm layers.
        canonical: the method that builds the same layers (itself unless a synonym).
        objective: the name of the method's training objective, or ``None``.
        concat_metadata: the model appends the metadata to its classifier's input.
        input_metadata: the model adds the metadata to its input as constant channels.
    """

    name: str
    display_name: str
    factory: NormFactory
    needs_design: bool = False
    canonical: str = ""
    objective: str | None = None
    concat_metadata: bool = False
    input_metadata: bool = False


def _norm_spec(name: str) -> NormSpec:
    from metanorm_repro.models import methods

    m = methods.get_method(name)
    key = m.name

    def factory(shape: tuple[int, ...], **kwargs: Any) -> nn.Module:
        return methods.create_slot_norm(key, shape, **kwargs)

    return NormSpec(
        key,
        m.display_name,
        factory,
        m.needs_design,
        m.canonical or key,
        m.objective,
        m.concat_metadata,
        m.input_metadata,
    )


def _register_norm(
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
    # the old factory builds the layer of a slot: one layer per slot, the model's base as "none"
    from metanorm_repro.models import methods

    if not isinstance(name, str) or not name:
        raise TypeError(f"expected a non-empty str name, got {name!r}")
    if (name in methods.METHODS or name in methods.METHOD_ALIASES) and not replace:
        raise ValueError(f"a normalization method named {name!r} is already registered")
    if canonical is not None and canonical not in methods.METHODS:
        raise ValueError(
            f"canonical={canonical!r} is not a registered method: {methods.list_methods()}"
        )

    def layer(slot: str) -> NormFactory:
        def build(shape: tuple[int, ...], **kwargs: Any) -> nn.Module:
            return factory(shape, slot=slot, base="none", **kwargs)

        return build

    for slot in SLOTS:
        register_norm_layer(f"{name}[{slot}]", layer(slot), replace=True)
    methods.register_method(
        methods.Method(
            name,
            display_name or name,
            hidden=(f"{name}[hidden]",),
            features=f"{name}[features]",
            needs_design=needs_design,
            canonical=canonical if canonical not in (None, name) else None,
            objective=objective,
            concat_metadata=bool(concat_metadata),
            input_metadata=bool(input_metadata),
        ),
        replace=replace,
    )
    return _norm_spec(name)


# old name -> (new name, where it is now, the object's getter)
_MOVED: dict[str, tuple[str, Callable[[], Any]]] = {
    "NORM_ALIASES": ("methods.METHOD_ALIASES", lambda: _methods().METHOD_ALIASES),
    "ALTERNATIVES": ("methods.ALTERNATIVES", lambda: _methods().ALTERNATIVES),
    "FEATURE_ALTERNATIVES": (
        "methods.FEATURE_ALTERNATIVES",
        lambda: _methods().FEATURE_ALTERNATIVES,
    ),
    "list_norms": ("methods.list_methods", lambda: _methods().list_methods),
    "canonical_norm": ("methods.canonical_method", lambda: _methods().canonical_method),
    "norm_display_name": ("methods.method_display_name", lambda: _methods().method_display_name),
    "get_norm": ("methods.get_method", lambda: _norm_spec),
    "register_norm": ("methods.register_method", lambda: _register_norm),
}


def _methods() -> Any:
    from metanorm_repro.models import methods

    return methods


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        new, get = _MOVED[name]
        warnings.warn(
            f"metanorm_repro.models.norms.{name} is deprecated: the methods are now in "
            f"metanorm_repro.models.{new} (norms holds the layers only)",
            DeprecationWarning,
            stacklevel=2,
        )
        return get()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
