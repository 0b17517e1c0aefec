"""Utilities for models with MDN layers: refitting the evaluation β after training."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from metanorm.nn.metadata_norm import MetadataNorm
from metanorm.nn.scope import MetadataModel

__all__ = ["refit_running_beta"]


def _default_call(model: nn.Module, batch: Any, device: torch.device | str | None) -> None:
    if not isinstance(batch, list | tuple) or len(batch) < 2:
        raise TypeError(
            "expected each batch to be a tuple (input, ..., design_rows), got "
            f"{type(batch).__name__}; pass call=lambda model, batch: ... to run other batches"
        )
    x, rows = batch[0], batch[-1]
    if device is not None:
        x, rows = x.to(device), rows.to(device)
    if isinstance(model, MetadataModel):
        model(x, metadata=rows)
    else:
        model(x, rows)


def _forward_order(
    model: nn.Module, layers: list[MetadataNorm], batch: Any, run: Callable[[nn.Module, Any], Any]
) -> list[MetadataNorm]:
    """The layers in the order one evaluation-mode call on ``batch`` reaches them."""
    order: list[MetadataNorm] = []

    def record(module: nn.Module, args: Any) -> None:
        if isinstance(module, MetadataNorm) and module not in order:
            order.append(module)

    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    try:
        run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return order


@torch.no_grad()
def refit_running_beta(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    call: Callable[[nn.Module, Any], Any] | None = None,
    device: torch.device | str | None = None,
    layer_by_layer: bool = True,
) -> int:
    r"""Recomputes the running β of every :class:`~metanorm.nn.MetadataNorm` from a data set.

    The counterpart of :func:`torch.optim.swa_utils.update_bn` for MDN: after training (or after
    each epoch), one pass over the training data with the final weights gives each layer the
    full-data least-squares β of the features it sees, :math:`\Sigma^{-1} X^\top F`, instead of
    an average over batches taken while the weights were still changing.

    With ``layer_by_layer`` (the default) the layers are refitted one at a time, in the order the
    forward pass calls them (found by one evaluation-mode call on the first batch): each layer is
    reset and accumulates a cumulative average (``momentum=None``) over one pass in training
    mode while every other module is in evaluation mode, so the MDN layers before it already
    use their refitted β, as they will at evaluation. This costs one pass per MDN layer;
    ``layer_by_layer=False`` refits all of them in a single pass (each then sees features that
    the layers before it residualised with batch estimates). Layers the forward pass does not
    call are left as they are.

    Nothing trainable changes; BatchNorm and dropout stay in evaluation mode during the passes;
    the training flags of all modules are restored on return. The batch order does not matter.

    Args:
        model: the model.
        loader: the training data, e.g. a :class:`~torch.utils.data.DataLoader`.
        call: ``call(model, batch)`` runs the model on one batch. Default: each batch is a tuple
            ``(input, ..., design_rows)`` and the model is called as ``model(input, design_rows)``,
            or ``model(input, metadata=design_rows)`` for a :class:`~metanorm.nn.MetadataModel`.
        device: where to move ``input`` and ``design_rows`` (default call only).
        layer_by_layer: refit the layers one at a time (see above). Default: ``True``.

    Returns:
        The number of MDN layers refitted (0 leaves the model untouched: no MDN layer with a
        running β, an empty loader, or no such layer called).

    Examples::

        >>> import torch
        >>> from metanorm.nn import MetadataNorm, MetadataSequential
        >>> design = torch.cat([torch.randn(40, 1), torch.ones(40, 1)], dim=1)
        >>> model = MetadataSequential(torch.nn.Linear(3, 5), MetadataNorm(5, design))
        >>> data = [(torch.randn(20, 3), design[:20]), (torch.randn(20, 3), design[20:])]
        >>> refit_running_beta(model, data)
        1
    """
    layers = [
        m for m in model.modules() if isinstance(m, MetadataNorm) and m.running_beta is not None
    ]
    if not layers:
        return 0
    run = call if call is not None else (lambda mdl, batch: _default_call(mdl, batch, device))
    flags = {module: module.training for module in model.modules()}
    momenta = {layer: layer.momentum for layer in layers}
    try:
        model.eval()
        first = next(iter(loader), None)
        if first is None:
            return 0
        layers = _forward_order(model, layers, first, run)
        groups = [[layer] for layer in layers] if layer_by_layer else [layers]
        for group in groups:
            for layer in group:
                layer.reset_running_stats()
                layer.momentum = None
                layer.train()
            for batch in loader:
                run(model, batch)
            for layer in group:
                layer.momentum = momenta[layer]
                layer.eval()
    finally:
        for layer, momentum in momenta.items():
            layer.momentum = momentum
        for module, flag in flags.items():
            module.training = flag
    return len(layers)
