"""Models for the experiments, by name: :func:`create_model` / :func:`list_models`.

Every model's ``forward(x, metadata=None)`` returns ``(logits, features)``: the features are what
the bias metric (dcor²) is measured on. ``paper-cnn``: the synthetic experiment's CNN
(:mod:`metanorm_repro.models.cnn`); ``stand-in-cnn``, ``stand-in-mlp``, ``stand-in-cnn3d``: the
real-data experiments' models (:mod:`metanorm_repro.models.stand_in`); ``monai-resnet18``: MONAI's
3-D ResNet-18 with MDN placed by :func:`metanorm.nn.convert_metadata_norm`
(:mod:`metanorm_repro.models.monai_models`; needs the ``monai`` extra). Every model takes its
normalization by name, from the one registry of :mod:`metanorm_repro.models.norms`
(:func:`create_norm`, :func:`register_norm`, :func:`list_norms`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from metanorm_repro.models.cnn import PaperCNN as PaperCNN
from metanorm_repro.models.norms import create_norm as create_norm
from metanorm_repro.models.norms import list_norms as list_norms
from metanorm_repro.models.norms import norm_display_name as norm_display_name
from metanorm_repro.models.norms import register_norm as register_norm
from metanorm_repro.models.stand_in import StandInCNN as StandInCNN
from metanorm_repro.models.stand_in import StandInCNN3d as StandInCNN3d
from metanorm_repro.models.stand_in import StandInMLP as StandInMLP

__all__ = [
    "PaperCNN",
    "StandInCNN",
    "StandInCNN3d",
    "StandInMLP",
    "create_model",
    "create_norm",
    "list_models",
    "list_norms",
    "norm_display_name",
    "register_model",
    "register_norm",
]


def _monai_resnet18(*args: Any, **kwargs: Any) -> nn.Module:
    # MONAI is an optional extra: imported when the model is built, not with this package
    from metanorm_repro.models.monai_models import monai_resnet18

    return monai_resnet18(*args, **kwargs)


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "paper-cnn": PaperCNN,
    "stand-in-cnn": StandInCNN,
    "stand-in-mlp": StandInMLP,
    "stand-in-cnn3d": StandInCNN3d,
    "monai-resnet18": _monai_resnet18,
}


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
    """Registers a model factory under ``name`` (an existing name is a ``ValueError``)."""
    if name in _REGISTRY:
        raise ValueError(f"a model named {name!r} is already registered")
    _REGISTRY[name] = factory


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds the model registered as ``name`` with ``kwargs``.

    Examples::

        >>> create_model("paper-cnn", norm="groupnorm").norm
        'groupnorm'
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {list_models()}")
    return _REGISTRY[name](**kwargs)
