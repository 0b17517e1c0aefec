"""Putting MDN layers into an existing model (MONAI, timm, your own), whose ``forward(x)`` is kept.

The paper (Lu et al., "Metadata Normalization", CVPR 2021, arXiv 2104.09052) puts MDN into an
ImageNet VGG16 and a 3-D ResNet-18. :func:`convert_metadata_norm` does that to a network you
already have: it replaces named modules or modules of a type (e.g. the BatchNorm of the last
stage) by lazy MDN layers, inserts MDN layers after named modules (e.g. the pooled features before
the classifier), and returns the model wrapped in a :class:`~metanorm.nn.MetadataModel`, called as
``model(x, metadata=rows)``.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from metanorm.design import Design
from metanorm.nn._base import _check_keep
from metanorm.nn.location_scale import (
    LazyMetadataLocationScaleNorm,
    MetadataLocationScaleNorm,
)
from metanorm.nn.metadata_norm import LazyMetadataNorm, MetadataNorm
from metanorm.nn.penalty import LazyPenaltyMetadataNorm, PenaltyMetadataNorm
from metanorm.nn.recursive import LazyRecursiveMetadataNorm, RecursiveMetadataNorm
from metanorm.nn.scale import LazyMetadataScaleNorm, MetadataScaleNorm
from metanorm.nn.scope import MetadataModel, _ApplyInserted

__all__ = ["convert_metadata_norm"]


def convert_metadata_norm(
    model: nn.Module,
    design: Any,
    *,
    replace: Iterable[str | type[nn.Module]] | str | type[nn.Module] = (),
    after: Iterable[str] | str = (),
    layer: type[nn.Module] | Callable[..., nn.Module] = LazyMetadataNorm,
    **layer_options: Any,
) -> MetadataModel:
    r"""Puts MDN layers into ``model`` and wraps it to be called as ``model(x, metadata=rows)``.

    Each new layer is a :class:`~metanorm.nn.LazyMetadataNorm` built with ``design`` and
    ``layer_options``, sized at its first call (run one batch before building the optimizer or
    compiling). The model's own ``forward`` is not changed: a replaced module's slot now holds
    an MDN layer, called with one argument, and an inserted layer runs as a forward hook on the
    module it follows; both take the metadata in scope of the returned
    :class:`~metanorm.nn.MetadataModel`. ``model`` is changed in place.

    Where to put MDN (the paper): in late layers, after a linear or conv op and before the
    nonlinearity, where BatchNorm sits; or on the features before the classifier.

    Args:
        model: the network, or a :class:`~metanorm.nn.MetadataModel` to convert further.
        design: the whole training set's design (see :class:`~metanorm.nn.MetadataNorm`).
        replace: qualified module names (as in ``model.named_modules()``, e.g.
            ``"layer4.1.bn2"``) and module types (e.g. ``nn.BatchNorm3d``: every instance, by
            ``isinstance``); each match is replaced by an MDN layer.
        after: qualified module names; an MDN layer is inserted after each (applied to its
            output, which must be a tensor). A module called several times in one forward
            pass is followed by the layer each time.
        layer: the estimator: an MDN layer class (:class:`~metanorm.nn.MetadataNorm`,
            :class:`~metanorm.nn.RecursiveMetadataNorm`, :class:`~metanorm.nn.PenaltyMetadataNorm`,
            :class:`~metanorm.nn.MetadataScaleNorm`,
            :class:`~metanorm.nn.MetadataLocationScaleNorm`, or their lazy classes: each is
            built lazy, the recursive and penalty layers with ``num_metadata`` and ``keep`` from the
            design), or a factory called as ``layer(design, **layer_options)`` that returns a
            module taking ``(input, metadata)``. Default: :class:`~metanorm.nn.LazyMetadataNorm`.
        **layer_options: passed to the layer (for :class:`~metanorm.nn.LazyMetadataNorm`: ``keep``,
            ``momentum``, ``channelwise``, ``ridge``, ``on_nonfinite``, ...). By default each
            layer's buffers are put on the device of the module it replaces or follows.

    Returns:
        The model wrapped in a :class:`~metanorm.nn.MetadataModel`: ``wrapped.module`` is
        ``model``, ``wrapped.inserted`` holds the inserted layers (keys: the module names with
        ``-`` for ``.``).

    Raises:
        ValueError: a name that is not a module of ``model`` or a type that matches none (the
            message lists close names), the root module, or nothing to convert.
        TypeError: an entry that is neither a name nor a module type.

    Examples::

        >>> import torch
        >>> from torch import nn
        >>> design = torch.cat([torch.randn(100, 1), torch.ones(100, 1)], dim=1)
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> model = convert_metadata_norm(net, design, replace=[nn.BatchNorm2d], after=["4"],
        ...                               keep=())
        >>> model(torch.randn(8, 1, 6, 6), metadata=design[:8]).shape
        torch.Size([8, 2])
        >>> type(net[1]).__name__, model.inserted["4"].num_features
        ('MetadataNorm', 4)
    """
    if isinstance(model, MetadataModel):
        wrapped, target = model, model.module
    elif isinstance(model, nn.Module):
        wrapped, target = None, model
    else:
        raise TypeError(f"expected model to be a torch.nn.Module, got {type(model).__name__}")
    replace_list = [replace] if isinstance(replace, str | type) else list(replace)
    after_list = [after] if isinstance(after, str) else list(after)
    if not replace_list and not after_list:
        raise ValueError("nothing to convert: pass replace= (names or types) and/or after= (names)")

    build = _factory(layer)
    modules = dict(target.named_modules(remove_duplicate=False))
    to_replace: dict[str, nn.Module] = {}
    for entry in replace_list:
        if isinstance(entry, str):
            _check_name(entry, modules, "replace")
            to_replace[entry] = modules[entry]
        elif isinstance(entry, type) and issubclass(entry, nn.Module):
            matches = {n: m for n, m in modules.items() if n and isinstance(m, entry)}
            if not matches:
                raise ValueError(_no_type_match(entry, modules))
            to_replace.update(matches)
        else:
            raise TypeError(
                "expected replace entries to be module names (str) or module types "
                f"(e.g. nn.BatchNorm2d), got {entry!r}"
            )
    for entry in after_list:
        if not isinstance(entry, str):
            raise TypeError(f"expected after entries to be module names (str), got {entry!r}")
        _check_name(entry, modules, "after")

    # a module nested in another replaced one disappears with it
    names = sorted(to_replace)
    names = [n for n in names if not any(n.startswith(p + ".") for p in names if p != n)]
    new_layers: dict[int, nn.Module] = {}  # a module shared by several slots stays shared
    for name in names:
        old = to_replace[name]
        if id(old) not in new_layers:
            new_layers[id(old)] = build(design, **_with_device(layer_options, old, target))
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name], child, new_layers[id(old)])

    if wrapped is None:
        wrapped = MetadataModel(target)
    modules = dict(target.named_modules(remove_duplicate=False))
    for name in after_list:
        if name not in modules:  # inside a module replaced above
            raise ValueError(f"after={name!r} names a module inside one replaced by an MDN layer")
        key = name.replace(".", "-")
        if key in wrapped.inserted:
            raise ValueError(f"an MDN layer is already inserted after {name!r}")
        module = modules[name]
        wrapped.inserted[key] = build(design, **_with_device(layer_options, module, target))
        module.register_forward_hook(_ApplyInserted(key, name))
    return wrapped


_LAZY: dict[type, type] = {
    MetadataNorm: LazyMetadataNorm,
    RecursiveMetadataNorm: LazyRecursiveMetadataNorm,
    PenaltyMetadataNorm: LazyPenaltyMetadataNorm,
    MetadataScaleNorm: LazyMetadataScaleNorm,
    MetadataLocationScaleNorm: LazyMetadataLocationScaleNorm,
}


def _factory(layer: Any) -> Callable[..., nn.Module]:
    """``build(design, **options)`` for ``layer=`` (a class or a factory)."""
    if isinstance(layer, type):
        lazy = _LAZY.get(layer, layer)
        if lazy in (LazyRecursiveMetadataNorm, LazyPenaltyMetadataNorm):

            def online(design: Any, **options: Any) -> nn.Module:
                if design is None or isinstance(design, Design):  # restore, or the roles
                    return lazy(
                        options.pop("num_metadata", None) if design is None else design, **options
                    )
                keep, _ = _check_keep(design, options.pop("keep", None))
                width = design.shape[1] if hasattr(design, "shape") else len(design[0])
                return lazy(int(width), keep=keep, **options)

            return online
        if lazy in _LAZY.values():
            return lazy
        raise TypeError(
            f"expected layer= to be an MDN layer class ({', '.join(c.__name__ for c in _LAZY)}) "
            f"or a factory layer(design, **options), got the class {layer.__name__}"
        )
    if callable(layer):
        return layer
    raise TypeError(f"expected layer= to be an MDN layer class or a factory, got {layer!r}")


def _check_name(name: str, modules: dict[str, nn.Module], argument: str) -> None:
    if name == "":
        raise ValueError(
            f"{argument}='' names the whole model; name a submodule (see model.named_modules())"
        )
    if name not in modules:
        close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.6)
        hint = (
            f"close names: {', '.join(repr(c) for c in close)}"
            if close
            else "see [name for name, _ in model.named_modules()]"
        )
        raise ValueError(f"{argument}={name!r}: no module of that name in the model; {hint}")


def _no_type_match(kind: type, modules: dict[str, nn.Module]) -> str:
    present = sorted({type(m).__name__ for n, m in modules.items() if n})
    close = difflib.get_close_matches(kind.__name__, present, n=5, cutoff=0.6)
    return (
        f"replace={kind.__name__}: no module of that type in the model; "
        + (f"close types: {', '.join(close)}; " if close else "")
        + f"its module types are {', '.join(present)}"
    )


def _with_device(options: dict[str, Any], *modules: nn.Module) -> dict[str, Any]:
    if "device" in options:
        return options
    for module in modules:  # the device of the first with a tensor
        tensor = next(itertools.chain(module.parameters(), module.buffers()), None)
        if tensor is not None:
            return {**options, "device": tensor.device}
    return dict(options)
