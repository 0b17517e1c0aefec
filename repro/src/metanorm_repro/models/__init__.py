"""Models for the experiments, by name: :func:`create_model` / :func:`list_models`.

Every model's ``forward(x, metadata=None)`` returns ``(logits, features)``: the features are what
the bias metric (dcor²) is measured on. ``paper-cnn``: the synthetic experiment's CNN
(:mod:`metanorm_repro.models.cnn`); ``stand-in-cnn``, ``stand-in-mlp``, ``stand-in-cnn3d``: the
real-data experiments' models (:mod:`metanorm_repro.models.stand_in`); ``monai-resnet18``: MONAI's
3-D ResNet-18 with MDN placed by :func:`metanorm.nn.convert_metadata_norm`
(:mod:`metanorm_repro.models.monai_models`; needs the ``monai`` extra); the table
:data:`MODELS`, :func:`register_model` adds one. Every model takes its normalization *method* by
name, from the table of :mod:`metanorm_repro.models.methods` (:func:`list_methods`,
:func:`register_method`), whose layers come from the table of
:mod:`metanorm_repro.models.norms` (:func:`create_norm`, :func:`register_norm_layer`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from metanorm_repro.models.cnn import PaperCNN as PaperCNN
from metanorm_repro.models.methods import Method as Method
from metanorm_repro.models.methods import get_method as get_method
from metanorm_repro.models.methods import list_methods as list_methods
from metanorm_repro.models.methods import method_display_name as method_display_name
from metanorm_repro.models.methods import register_method as register_method
from metanorm_repro.models.norms import create_norm as create_norm
from metanorm_repro.models.norms import register_norm_layer as register_norm_layer
from metanorm_repro.models.stand_in import StandInCNN as StandInCNN
from metanorm_repro.models.stand_in import StandInCNN3d as StandInCNN3d
from metanorm_repro.models.stand_in import StandInMLP as StandInMLP

__all__ = [
    "MODELS",
    "Method",
    "PaperCNN",
    "StandInCNN",
    "StandInCNN3d",
    "StandInMLP",
    "create_model",
    "create_norm",
    "get_method",
    "list_methods",
    "list_models",
    "method_display_name",
    "register_method",
    "register_model",
    "register_norm_layer",
]


def _monai_resnet18(*args: Any, **kwargs: Any) -> nn.Module:
    # MONAI is an optional extra: imported when the model is built, not with this package
    from metanorm_repro.models.monai_models import monai_resnet18

    return monai_resnet18(*args, **kwargs)


#: The models by name, each a ``factory(**kwargs) -> nn.Module``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "paper-cnn": PaperCNN,
    "stand-in-cnn": StandInCNN,
    "stand-in-mlp": StandInMLP,
    "stand-in-cnn3d": StandInCNN3d,
    "monai-resnet18": _monai_resnet18,
}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Adds a model factory to :data:`MODELS` under ``name`` (a taken name is a ``ValueError``)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"expected a non-empty str name, got {name!r}")
    if not callable(factory):
        raise TypeError(f"expected a callable factory, got {type(factory).__name__}")
    if name in MODELS:
        raise ValueError(f"a model named {name!r} is already registered")
    MODELS[name] = factory


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds the model registered as ``name`` with ``kwargs``.

    Examples::

        >>> create_model("paper-cnn", norm="groupnorm").norm
        'groupnorm'
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered: {list_models()}")
    return MODELS[name](**kwargs)


# old name -> the new name in metanorm_repro.models.methods
_MOVED = {
    "list_norms": "list_methods",
    "norm_display_name": "method_display_name",
    "register_norm": "register_method",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(
            f"metanorm_repro.models.{name} is deprecated: use "
            f"metanorm_repro.models.{_MOVED[name]} (register_norm: metanorm_repro.models."
            "norms.register_norm keeps the old signature, deprecated too)",
            DeprecationWarning,
            stacklevel=2,
        )
        from metanorm_repro.models import norms

        return norms._register_norm if name == "register_norm" else globals()[_MOVED[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
