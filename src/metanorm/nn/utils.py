"""Utilities for models with MDN layers: refitting the evaluation β after training."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from metanorm._validation import describe
from metanorm.nn._base import _MetadataNormBase
from metanorm.nn.scope import MetadataModel

__all__ = ["RefitResult", "refit_running_beta"]


class RefitResult(int):
    """The number of layers :func:`refit_running_beta` refitted, with the rows each one used.

    An ``int`` (the count of layers, as before), with ``samples``: the qualified module name
    of each refitted layer → the number of design rows its refit summed over (on this
    process, under :mod:`torch.distributed`).
    """

    samples: dict[str, int]

    def __new__(cls, samples: dict[str, int]) -> RefitResult:
        """A count of ``len(samples)`` layers."""
        out = super().__new__(cls, len(samples))
        out.samples = dict(samples)
        return out

    def __repr__(self) -> str:
        """As an int (doctests and logs show the count)."""
        return int.__repr__(self)


_CALL_HINT = (
    "pass call= to run other batches, e.g. call=lambda model, batch: "
    "model(batch['image'], metadata=batch['rows']) (a MetadataModel) or "
    "call=lambda model, batch: model(batch[0], batch[1]) (rows in the middle)"
)


def _default_call(
    model: nn.Module, batch: Any, device: torch.device | str | None, widths: set[int]
) -> None:
    if not isinstance(batch, list | tuple) or len(batch) < 2:
        raise TypeError(
            "refit_running_beta's default call: expected each batch to be a tuple (input, ..., "
            f"design_rows), the design rows last, got {describe(batch)}; {_CALL_HINT}"
        )
    x, rows = batch[0], batch[-1]
    if not isinstance(rows, torch.Tensor) or rows.dim() != 2 or rows.shape[1] not in widths:
        want = " or ".join(str(k) for k in sorted(widths))
        raise ValueError(
            "refit_running_beta's default call takes the last element of each batch as the "
            f"design rows, (m, K) with K = {want} (the MDN layers' columns); the last of this "
            f"batch of {len(batch)} is {describe(rows)}. Put the rows last, (input, ..., "
            f"design_rows), or {_CALL_HINT}"
        )
    if device is not None:
        x, rows = x.to(device), rows.to(device)
    if isinstance(model, MetadataModel):
        model(x, metadata=rows)
    else:
        model(x, rows)


def _forward_order(
    model: nn.Module,
    layers: list[_MetadataNormBase],
    batch: Any,
    run: Callable[[nn.Module, Any], Any],
) -> list[_MetadataNormBase]:
    """The layers in the order one evaluation-mode call on ``batch`` reaches them."""
    order: list[_MetadataNormBase] = []

    def record(module: nn.Module, args: Any) -> None:
        if isinstance(module, _MetadataNormBase) and module not in order:
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
    estimators: type[nn.Module] | tuple[type[nn.Module], ...] | None = None,
    check_design: bool = True,
) -> int:
    r"""Refits the evaluation β of every MDN layer by least squares over a data set.

    The counterpart of :func:`torch.optim.swa_utils.update_bn` for MDN: after training (or after
    each epoch), one pass over the training data with the final weights gives each layer the
    full-data least-squares β of the features it sees, instead of an average over batches taken
    while the weights were still changing. Each layer sums :math:`X^\top X` and
    :math:`X^\top F` over the pass (float64) and sets its state in closed form:
    :class:`~metanorm.nn.MetadataNorm` and :class:`~metanorm.nn.MetadataScaleNorm` (on
    :math:`\log\sigma`) the running β :math:`(N/S)\,\Sigma^{-1}X^\top F` (S rows seen: the
    cumulative average of the batch estimates), :class:`~metanorm.nn.RecursiveMetadataNorm`
    :math:`P = (X^\top X + (\delta + S\rho) I)^{-1}` and :math:`\beta = P X^\top F` (one pass
    with λ = 1), :class:`~metanorm.nn.PenaltyMetadataNorm` β the least-squares solution (its
    optimiser's moments reset). Under :mod:`torch.distributed` the sums are all-reduced over
    the layer's process group (the world by default), so every process gets the same state;
    every process must then call this with its shard of the data.

    With ``layer_by_layer`` (the default) the layers are refitted one at a time, in the order the
    forward pass calls them (found by one evaluation-mode call on the first batch): each layer
    accumulates its sums over one pass while every module is in evaluation mode, so the MDN
    layers before it already use their refitted β, as they will at evaluation. This costs one
    pass per MDN layer; ``layer_by_layer=False`` refits all of them in a single pass (each then
    sees features that the layers before it residualised with their old β). Layers the forward
    pass does not call are left as they are.

    Nothing trainable changes; BatchNorm and dropout stay in evaluation mode during the passes;
    the training flags of all modules are restored on return. The batch order does not matter.

    Args:
        model: the model.
        loader: the training data, e.g. a :class:`~torch.utils.data.DataLoader`.
        call: ``call(model, batch)`` runs the model on one batch. Default: each batch is a tuple
            ``(input, ..., design_rows)``, the design rows **last**, and the model is called as
            ``model(input, design_rows)``, or ``model(input, metadata=design_rows)`` for a
            :class:`~metanorm.nn.MetadataModel`; other batches (a dict, the rows elsewhere)
            need ``call=``, and the default call says so.
        device: where to move ``input`` and ``design_rows`` (default call only).
        layer_by_layer: refit the layers one at a time (see above). Default: ``True``.
        estimators: refit only layers of these classes (``isinstance``), e.g.
            ``MetadataNorm`` to leave a recursive layer's forgetting memory as it is. Default:
            every MDN estimator.
        check_design: check that the rows of the pass describe each batch layer's design
            (:class:`~metanorm.nn.MetadataNorm`, :class:`~metanorm.nn.MetadataScaleNorm`):
            with at least 10·K rows, their mean outer product :math:`X^\top X/S` must be within
            a relative gap of 0.25 (plus the sampling noise) of the design's :math:`\Sigma/N`.
            Default: ``True``.

    Raises:
        ValueError: the rows of the pass do not describe a layer's design (the message names
            the columns that differ most); the layer's state is left as it was.

    The loader must be re-iterable (a :class:`~torch.utils.data.DataLoader`, a list): each
    layer takes its own pass. A one-shot iterator (a generator, ``iter(loader)``) would feed the
    first pass only, so it is refused with a ``TypeError``; pass ``list(...)`` of it. Every pass
    must see the same rows: a pass that sees another number of rows than the first raises a
    ``RuntimeError`` (the layers refitted before it keep their new state). Skipped non-finite
    training batches are reported (a warning per layer) before the counters restart.

    Returns:
        A :class:`RefitResult`: an ``int``, the number of MDN layers refitted (0 leaves the
        model untouched: no MDN layer with a running β, an empty loader, or no such layer
        called), whose ``samples`` maps each refitted layer's qualified name to the number of
        rows it used.

    Raises:
        TypeError: ``loader`` is a one-shot iterator.
        RuntimeError: the passes saw different numbers of rows.

    Examples::

        >>> import torch
        >>> from metanorm.nn import MetadataNorm, MetadataSequential
        >>> design = torch.cat([torch.randn(40, 1), torch.ones(40, 1)], dim=1)
        >>> model = MetadataSequential(torch.nn.Linear(3, 5), MetadataNorm(5, design, keep=()))
        >>> data = [(torch.randn(20, 3), design[:20]), (torch.randn(20, 3), design[20:])]
        >>> refit_running_beta(model, data)
        1
    """
    layers = [
        m
        for m in model.modules()
        if isinstance(m, _MetadataNormBase)
        and m._refittable()
        and (estimators is None or isinstance(m, estimators))
    ]
    if not layers:
        return RefitResult({})
    if isinstance(loader, Iterator) or iter(loader) is loader:
        raise TypeError(
            f"expected a re-iterable loader (a DataLoader, a list of batches), got a one-shot "
            f"{type(loader).__name__}: the refit takes one pass per layer, so every layer but "
            "the first would see no batch. Pass list(loader) (it holds the batches in memory) "
            "or the DataLoader itself"
        )
    names = {module: name for name, module in model.named_modules()}
    used: dict[str, int] = {}
    widths = {layer.num_metadata for layer in layers}
    run = call if call is not None else (lambda mdl, b: _default_call(mdl, b, device, widths))
    flags = {module: module.training for module in model.modules()}
    # the refit gives the layers their state: no "never trained" warning from this eval()
    warned = {layer: getattr(layer, "_untrained_warned", False) for layer in layers}
    try:
        for layer in layers:
            layer._untrained_warned = True
        model.eval()
        first = next(iter(loader), None)
        if first is None:
            return RefitResult({})
        layers = _forward_order(model, layers, first, run)
        groups = [[layer] for layer in layers] if layer_by_layer else [layers]
        for group in groups:
            # a two-stage estimator (location then scale) takes a second pass
            for stage in range(max(layer._refit_passes for layer in group)):
                active = [layer for layer in group if stage < layer._refit_passes]
                for layer in active:
                    layer._begin_refit(stage, check_design)
                try:
                    for batch in loader:
                        run(model, batch)
                finally:
                    counts = [
                        0 if lyr._refit_sums is None else lyr._refit_sums[2] for lyr in active
                    ]
                    for layer in active:
                        layer._end_refit()
                for layer, count in zip(active, counts, strict=True):
                    used[names.get(layer, type(layer).__name__)] = int(count)
                if len(set(used.values())) > 1:
                    raise RuntimeError(
                        f"the refit's passes over the loader saw different numbers of rows "
                        f"({used}): the loader does not give the same data on each pass (a "
                        "sampler without replacement of a varying size, or an iterable that is "
                        "consumed); pass a list of the batches"
                    )
    finally:
        for layer, was in warned.items():
            layer._refit_sums = None
            if layer.num_batches_tracked is None or int(layer.num_batches_tracked) == 0:
                layer._untrained_warned = was
        for module, flag in flags.items():
            module.training = flag
    return RefitResult({k: v for k, v in used.items() if v > 0})
