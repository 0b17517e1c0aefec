"""Normalization methods by name: one table, :data:`METHODS`, for models, experiments and CLI.

A *method* (``"none"``, ``"batchnorm"``, ``"mdn-conv"``, ...) says which normalization layer of
:data:`metanorm_repro.models.norms.NORM_LAYERS` goes into each norm slot of a model, and what else
the method changes. A model has two kinds of slot: ``"hidden"`` (after each conv or hidden linear
layer) and ``"features"`` (after the layer whose output is the model's features, the one before
the classifier). :func:`create_slot_norm` builds the layer of one slot.

======================  ===============  =================================  ====================
name                    display name     hidden slots                       features slot
======================  ===============  =================================  ====================
``"none"``              Baseline         —                                  —
``"batchnorm"``         BatchNorm        BatchNorm                          BatchNorm
``"groupnorm"``         GroupNorm        GroupNorm                          GroupNorm
``"mdn"``               MDN              the model's ``base``               MetadataNorm
``"mdn-linear"``        MDN-Linear       the model's ``base``               MetadataNorm
``"mdn-all"``           MDN-all          MetadataNorm                       MetadataNorm
``"mdn-conv"``          MDN-Conv         MetadataNorm                       MetadataNorm
``"rmdn"``              R-MDN            the model's ``base``               RecursiveMetadataNorm
``"rmdn-all"``          R-MDN-all        RecursiveMetadataNorm              RecursiveMetadataNorm
``"rmdn-conv"``         R-MDN-Conv       RecursiveMetadataNorm              RecursiveMetadataNorm
``"pmdn"``              PMDN             the model's ``base``               PenaltyMetadataNorm
``"pmdn-all"``          PMDN-all         PenaltyMetadataNorm                PenaltyMetadataNorm
``"pmdn-conv"``         PMDN-Conv        PenaltyMetadataNorm                PenaltyMetadataNorm
``"concat"``            Concat           the model's ``base``               — (metadata appended)
``"concat-input"``      Concat-input     the model's ``base``               — (metadata as input)
``"brnet"``             BR-Net           the model's ``base``               — (objective)
``"brnet-cond"``        BR-Net-cond      the model's ``base``               — (objective)
``"dann"``              DANN             the model's ``base``               — (objective)
``"dann-cond"``         DANN-cond        the model's ``base``               — (objective)
``"groupdro"``          GroupDRO         the model's ``base``               — (objective)
``"mdn-cw"``            MDN-channelwise  channel-wise MetadataNorm          MetadataNorm
``"mdn-poly"``          MDN-poly         the model's ``base``               PolynomialMetadataNorm
``"mdn-scale"``         MDN-scale        MetadataScaleNorm, then ``base``   MetadataNorm
``"mdn+brnet-cond"``    MDN+BR-Net-cond  the model's ``base``               MetadataNorm (and
                                                                            the objective)
``"mdn-ls"``            MDN-LS           MetadataLocationScaleNorm, then    MetadataNorm
                                         ``base``
======================  ===============  =================================  ====================

The alternatives to MDN (:data:`ALTERNATIVES`, ``docs/alternatives.md``) add no norm layer
(``needs_design`` is ``False``: that flag means MetadataNorm layers); what they change is carried
by three fields of their :class:`Method`: ``concat_metadata`` (the model appends the batch's
confounder columns of the design, those neither kept nor the intercept, to the features before
its classifier; :class:`~metanorm_repro.models.PaperCNN` reads it), ``input_metadata`` (the model
adds the same columns to its input as constant extra channels) and ``objective`` (the name of a
training objective, an adversary, a bias predictor or group weights, of the experiment harness's
table :data:`metanorm_repro.experiments.alternatives.OBJECTIVES`, which the training loop calls in
place of the plain task loss). The models never import the harness: they only carry the name.
The last five rows are the candidate fixes of ``docs/failures.md``
(:mod:`metanorm_repro.models.interaction_norms`, ``FAILURE_METHODS``) and the location-scale
layer (``docs/estimators.md``).

``base`` is the model's usual normalization, used where a method adds no MDN layer: ``"none"``
for :class:`~metanorm_repro.models.PaperCNN` (the paper's baseline has no norm layer),
``"batchnorm"`` for the stand-in models. ``"mdn-linear"`` and ``"mdn-conv"`` are the paper's names
(its synthetic experiment); they build the same layers as ``"mdn"`` and ``"mdn-all"``, their
canonical names (:func:`canonical_method`). On the command line ``"baseline"``, ``"bn"`` and
``"gn"`` are accepted for ``"none"``, ``"batchnorm"`` and ``"groupnorm"`` (:data:`METHOD_ALIASES`).

:func:`register_method` adds a method of your own.

Examples::

    >>> type(create_slot_norm("batchnorm", (16, 28, 28), slot="hidden")).__name__
    'BatchNorm2d'
    >>> create_slot_norm("mdn-linear", (16, 28, 28), slot="hidden", base="none")
    Identity()
    >>> method_display_name("mdn-conv"), get_method("bn").display_name
    ('MDN-Conv', 'BatchNorm')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from metanorm.nn import MetadataSequential
from metanorm_repro.models.interaction_norms import FAILURE_METHODS
from metanorm_repro.models.norms import NORM_LAYERS, SLOTS, create_norm

__all__ = [
    "ALTERNATIVES",
    "BASE",
    "FAILURE_METHODS",
    "FEATURE_ALTERNATIVES",
    "METHODS",
    "METHOD_ALIASES",
    "Method",
    "canonical_method",
    "create_slot_norm",
    "get_method",
    "list_methods",
    "method_display_name",
    "register_method",
    "resolve_method",
]

#: The model's own normalization (its ``base``) in a method's ``hidden`` layers.
BASE = "base"


@dataclass(frozen=True)
class Method:
    """A normalization method: which layers go where, and what else it changes.

    Attributes:
        name: the method's name (its key in the table of methods).
        display_name: its name in reports and plots.
        hidden: the layers of each hidden slot, in order (names of
            :data:`~metanorm_repro.models.norms.NORM_LAYERS`, or ``"base"`` for the model's own
            normalization); several are chained in a :class:`~metanorm.nn.MetadataSequential`.
            Default: ``("base",)``.
        features: the layer of the features slot. Default: ``"none"``.
        needs_design: ``True`` when the method builds MetadataNorm layers (it needs the training
            design, and the model the batch's design rows).
        canonical: the method this one is a synonym of (``"mdn"`` for ``"mdn-linear"``), or
            ``None``.
        objective: the name of the method's training objective
            (:data:`metanorm_repro.experiments.alternatives.OBJECTIVES`), or ``None`` for the
            plain task loss.
        concat_metadata: the model appends the confounder columns of the batch's design rows to
            the features before its classifier.
        input_metadata: the model adds the confounder columns of the batch's design rows to
            its input as constant extra channels (one per column).
    """

    name: str
    display_name: str
    hidden: tuple[str, ...] = (BASE,)
    features: str = "none"
    needs_design: bool = False
    canonical: str | None = None
    objective: str | None = None
    concat_metadata: bool = False
    input_metadata: bool = False


_MDN = "metadatanorm"
_RMDN = "recursive-metadatanorm"
_PMDN = "penalty-metadatanorm"

#: The methods by name (see the module docstring), in report order.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("none", "Baseline", ("none",), "none"),
        Method("batchnorm", "BatchNorm", ("batchnorm",), "batchnorm"),
        Method("groupnorm", "GroupNorm", ("groupnorm",), "groupnorm"),
        Method("mdn", "MDN", (BASE,), _MDN, needs_design=True),
        Method("mdn-linear", "MDN-Linear", (BASE,), _MDN, needs_design=True, canonical="mdn"),
        Method("mdn-all", "MDN-all", (_MDN,), _MDN, needs_design=True),
        Method("mdn-conv", "MDN-Conv", (_MDN,), _MDN, needs_design=True, canonical="mdn-all"),
        Method("rmdn", "R-MDN", (BASE,), _RMDN, needs_design=True),
        Method("rmdn-all", "R-MDN-all", (_RMDN,), _RMDN, needs_design=True),
        Method("rmdn-conv", "R-MDN-Conv", (_RMDN,), _RMDN, needs_design=True, canonical="rmdn-all"),
        Method("pmdn", "PMDN", (BASE,), _PMDN, needs_design=True),
        Method("pmdn-all", "PMDN-all", (_PMDN,), _PMDN, needs_design=True),
        Method("pmdn-conv", "PMDN-Conv", (_PMDN,), _PMDN, needs_design=True, canonical="pmdn-all"),
        Method("concat", "Concat", concat_metadata=True),
        Method("concat-input", "Concat-input", input_metadata=True),
        Method("brnet", "BR-Net", objective="brnet"),
        Method("brnet-cond", "BR-Net-cond", objective="brnet-cond"),
        Method("dann", "DANN", objective="dann"),
        Method("dann-cond", "DANN-cond", objective="dann-cond"),
        Method("groupdro", "GroupDRO", objective="groupdro"),
        Method("mdn-cw", "MDN-channelwise", ("channelwise-metadatanorm",), _MDN, needs_design=True),
        Method("mdn-poly", "MDN-poly", (BASE,), "polynomial-metadatanorm", needs_design=True),
        Method("mdn-scale", "MDN-scale", ("metadata-scalenorm", BASE), _MDN, needs_design=True),
        Method(
            "mdn+brnet-cond",
            "MDN+BR-Net-cond",
            (BASE,),
            _MDN,
            needs_design=True,
            objective="brnet-cond",
        ),
        Method("mdn-ls", "MDN-LS", ("metadata-location-scalenorm", BASE), _MDN, needs_design=True),
    )
}

#: Other spellings accepted for a method name (the command line's), → the method's name.
METHOD_ALIASES: dict[str, str] = {"baseline": "none", "bn": "batchnorm", "gn": "groupnorm"}

#: The alternatives to MDN (``docs/alternatives.md``), in report order: every experiment that
#: compares them with MDN runs this list (synthetic-compare, the real-data experiments).
ALTERNATIVES: tuple[str, ...] = (
    "concat",
    "concat-input",
    "brnet",
    "brnet-cond",
    "dann",
    "dann-cond",
    "groupdro",
)
#: The alternatives that need nothing of the model's input, which every model takes (the MLPs
#: of the regression study and the failures study, MONAI's ResNet).
FEATURE_ALTERNATIVES: tuple[str, ...] = (
    "concat",
    "brnet",
    "brnet-cond",
    "dann",
    "dann-cond",
    "groupdro",
)


def resolve_method(name: str) -> str:
    """The name in :data:`METHODS` of ``name`` or of its alias (``"bn"`` → ``"batchnorm"``).

    Raises:
        ValueError: ``name`` is not a method (the message lists them).
    """
    key = METHOD_ALIASES.get(name, name) if isinstance(name, str) else None
    if key not in METHODS:
        raise ValueError(f"expected a normalization method in {list_methods()}, got {name!r}")
    return str(key)


def get_method(name: str) -> Method:
    """The :class:`.Method` of ``name`` (or of one of its aliases, ``"bn"`` for ``"batchnorm"``).

    Raises:
        ValueError: ``name`` is not a method (the message lists them).
    """
    return METHODS[resolve_method(name)]


def list_methods() -> list[str]:
    """The method names, in table order."""
    return list(METHODS)


def canonical_method(name: str) -> str:
    """The canonical name of a method: ``"mdn-linear"`` → ``"mdn"``, ``"bn"`` → ``"batchnorm"``."""
    key = resolve_method(name)
    return METHODS[key].canonical or key


def method_display_name(name: str) -> str:
    """The display name of a method (``"none"`` → ``"Baseline"``); unknown names as they are."""
    method = METHODS.get(METHOD_ALIASES.get(name, name))
    return name if method is None else method.display_name


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Adds ``method`` to the table of methods (``METHODS``) under its name.

    Args:
        method: the :class:`.Method` (its ``name`` is what ``--methods`` and the models' ``norm``
            take); its layers must be in
            :data:`~metanorm_repro.models.norms.NORM_LAYERS`
            (:func:`~metanorm_repro.models.norms.register_norm_layer` adds one).
        replace: replace an existing method. Default: ``False`` (a ``ValueError``).

    Returns:
        ``method``.

    Raises:
        TypeError: ``method`` is not a :class:`.Method` or its name not a non-empty string.
        ValueError: the name is taken (or is an alias), a layer is unknown, or ``canonical`` is
            not a method.

    Examples::

        >>> from torch import nn
        >>> from metanorm_repro.models.norms import NORM_LAYERS, register_norm_layer
        >>> register_norm_layer("layernorm", lambda shape, **kw: nn.LayerNorm(list(shape)))
        >>> _ = register_method(Method("ln", "LayerNorm", ("layernorm",), "layernorm"))
        >>> create_slot_norm("ln", 8, slot="features").normalized_shape
        (8,)
        >>> del METHODS["ln"], NORM_LAYERS["layernorm"]
    """
    if not isinstance(method, Method):
        raise TypeError(f"expected a Method, got {type(method).__name__}")
    name = method.name
    if not isinstance(name, str) or not name:
        raise TypeError(f"expected a non-empty str name, got {name!r}")
    if (name in METHODS or name in METHOD_ALIASES) and not replace:
        raise ValueError(f"a normalization method named {name!r} is already registered")
    unknown = [n for n in (*method.hidden, method.features) if n not in NORM_LAYERS and n != BASE]
    if unknown or method.features == BASE or not method.hidden:
        raise ValueError(
            f"expected hidden layers (one or more) and a features layer among "
            f"{list(NORM_LAYERS)} (hidden may also hold {BASE!r}), got hidden={method.hidden!r}, "
            f"features={method.features!r}"
        )
    if method.canonical is not None and method.canonical not in METHODS:
        raise ValueError(
            f"canonical={method.canonical!r} is not a registered method: {list_methods()}"
        )
    METHODS[name] = method
    return method


def create_slot_norm(
    method: str,
    shape: int | Sequence[int],
    *,
    slot: str = "features",
    design: Any = None,
    base: str = "none",
    groups: int = 4,
    momentum: float | None = 0.1,
    **mdn_kwargs: Any,
) -> nn.Module:
    """Builds the normalization layer of one slot of a model, for ``method``.

    Args:
        method: the method (see :func:`list_methods`).
        shape: the per-sample shape of the slot's input: ``C`` or ``(C,)`` after a linear layer,
            ``(C, H, W)`` after a 2-D conv, ``(C, D, H, W)`` after a 3-D conv.
        slot: ``"hidden"`` or ``"features"`` (see the module docstring). Default: ``"features"``.
        design: the WHOLE training set's design (``(N, K)`` array/tensor or
            :class:`metanorm.design.Design`), for methods that build MetadataNorm layers.
        base: the model's usual method, for the slots a method leaves alone (a method without
            MDN layers). Default: ``"none"``.
        groups: groups of a GroupNorm. Default: 4.
        momentum: running-β momentum of a MetadataNorm. Default: 0.1.
        **mdn_kwargs: further keyword arguments of :class:`~metanorm.nn.MetadataNorm`
            (``keep``, ``ridge``, ...).

    Returns:
        The layer (:func:`~metanorm_repro.models.norms.create_norm`), or a
        :class:`~metanorm.nn.MetadataSequential` of the slot's layers when there are several.

    Raises:
        ValueError: unknown method, slot or base, or a bad shape.
        TypeError: an MDN layer without a design.
    """
    if slot not in SLOTS:
        raise ValueError(f"expected slot in {SLOTS}, got {slot!r}")
    m = get_method(method)
    names = m.hidden if slot == "hidden" else (m.features,)
    layers = []
    for name in names:
        if name == BASE:
            b = get_method(base)
            if b.needs_design or BASE in b.hidden:
                raise ValueError(f"expected a base method without MDN layers, got {base!r}")
            if len(b.hidden) != 1:
                raise ValueError(f"expected a base method of one hidden layer, got {base!r}")
            name = b.hidden[0]
        kwargs = {"design": design, "groups": groups, "momentum": momentum, **mdn_kwargs}
        layers.append(create_norm(name, shape, **kwargs))
    return layers[0] if len(layers) == 1 else MetadataSequential(*layers)
