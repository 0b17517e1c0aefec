"""Models for the experiments, by name: :func:`create_model` / :func:`list_models`.

Every model's ``forward(x, metadata=None)`` returns ``(logits, features)``: the features are what
the bias metric (dcor²) is measured on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from metanorm.models.cnn import NORMS as NORMS
from metanorm.models.cnn import PaperCNN as PaperCNN

__all__ = ["NORMS", "PaperCNN", "create_model", "list_models", "register_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {"paper-cnn": PaperCNN}


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
